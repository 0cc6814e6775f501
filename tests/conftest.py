"""Shared fixtures: `onesim` (a simulated cloud) and `one` (pyone as oneadmin).
Their bodies live in tests/onesim/testing.py with the helpers."""

from tests.onesim.testing import one, onesim  # noqa: F401

