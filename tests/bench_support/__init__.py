"""Helpers for `python -m tests.bench` (make bench): the test image and the oneback driver."""
