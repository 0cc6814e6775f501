"""Shared fixtures: `onesim` (a simulated cloud) and `one` (pyone as oneadmin),
whose bodies live in tests/onesim/testing.py, `cloud` (onesim + a proxy
VM + a oneback configuration) and `repo_backend` (each repository backend
in turn), in tests/agentkit.py, and `agent` (the agent
as a child process), in tests/agentproc.py, and `s3server` (a real S3 server
on 127.0.0.1 for S3 repositories), in tests/s3server.py."""

from tests.agentkit import cloud, repo_backend  # noqa: F401
from tests.agentproc import agent  # noqa: F401
from tests.onesim.testing import one, onesim  # noqa: F401
from tests.s3server import s3server  # noqa: F401
