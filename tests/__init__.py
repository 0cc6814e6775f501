"""oneback test suite."""
