"""A lease renewal that never answers (a hard NFS mount, an S3 endpoint
that accepts and hangs) must not keep the holder working past its lease:
the heartbeat gives up in time and another agent may then take the VM."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent import vmlease
from agent.store.local import LocalStore


def test_a_renewal_that_hangs_gives_the_lease_up_before_it_can_be_taken(
        tmp_path: Path) -> None:
    repo = LocalStore.init(tmp_path / "repo")
    ttl = 1.5
    held = vmlease.acquire(repo, 3, "agent-a", ttl)
    cancel, unhang = threading.Event(), threading.Event()
    real_now = repo.lease_now

    def hangs() -> float:
        unhang.wait(30)     # the repository stopped answering
        return real_now()

    with vmlease.Heartbeat(held, cancel):
        repo.lease_now = hangs   # type: ignore[method-assign]
        started = time.monotonic()
        assert cancel.wait(ttl), "the holder went on working past its lease"
        assert time.monotonic() - held.renewed_at < ttl   # before it ran out
        unhang.set()
    assert time.monotonic() - started < ttl
    assert held.lost and "renewal has not answered" in held.lost_message()
