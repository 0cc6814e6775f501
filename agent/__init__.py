"""oneback: backup and recovery agent for OpenNebula KVM clouds."""

__version__ = "0.1.0"
