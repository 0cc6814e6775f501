"""onesim: a simulated OpenNebula oned for oneback's tests.

`Simulator.start(root, delay=..., version=...)` boots (or resumes) a cloud
under `root` and serves XML-RPC (pyone talks to `sim.endpoint` with
`sim.credentials`) and the hook manager's ZeroMQ events (`sim.events`).
`python -m tests.onesim serve --root DIR` does the same from a shell.
See STATUS.md for what is simulated and what is not.
"""

from __future__ import annotations

from tests.onesim.faults import Faults
from tests.onesim.simulator import Simulator

__all__ = ["Faults", "Simulator"]
