"""Shared fixtures: `onesim` (a simulated cloud) and `one` (pyone as oneadmin),
whose bodies live in tests/onesim/testing.py, `cloud` (onesim + a proxy
VM + a oneback configuration), in tests/agentkit.py, and `agent` (the agent
as a child process), in tests/agentproc.py."""

from tests.agentkit import cloud  # noqa: F401
from tests.agentproc import agent  # noqa: F401
from tests.onesim.testing import one, onesim  # noqa: F401
