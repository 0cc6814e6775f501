"""Shared fixtures: `onesim` (a simulated cloud) and `one` (pyone as oneadmin),
whose bodies live in tests/onesim/testing.py, and `cloud` (onesim + a proxy
VM + a oneback configuration), in tests/agentkit.py."""

from tests.agentkit import cloud  # noqa: F401
from tests.onesim.testing import one, onesim  # noqa: F401
