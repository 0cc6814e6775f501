"""Per-VM leases (agent.vmlease) in an S3 repository: the conditional-write
form of the local `link` compare-and-swap (If-None-Match creates, If-Match
on the ETag replaces), against the tests' moto server."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent import repository, vmlease
from agent.config import load
from agent.errors import LeaseBusy, LeaseLost
from agent.store import Backend
from tests.agentkit import offline_config


@pytest.fixture
def s3_store(tmp_path: Path) -> Backend:
    cfg = load(str(offline_config(tmp_path, backend="s3")))
    return repository.init_store(cfg.storage)


def test_an_s3_store_is_a_lease_store(s3_store: Backend) -> None:
    assert isinstance(s3_store, vmlease.LeaseStore)
    assert s3_store.lease_names() == []


def test_racers_for_one_s3_lease_one_wins(s3_store: Backend) -> None:
    for vm in range(6):
        barrier = threading.Barrier(4)
        won: list[str] = []
        lost: list[str] = []

        def race(owner: str, vm: int = vm, barrier: threading.Barrier = barrier,
                 won: list[str] = won, lost: list[str] = lost) -> None:
            barrier.wait()
            try:
                vmlease.acquire(s3_store, vm, owner, 30.0)
                won.append(owner)
            except LeaseBusy:
                lost.append(owner)

        threads = [threading.Thread(target=race, args=(f"agent{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(won) == 1 and len(lost) == 3, (vm, won, lost)
        state, _ = vmlease.read(s3_store, vm, 30.0)
        assert state is not None and state.owner == won[0]
    assert s3_store.lease_names() == [f"vm-{vm}" for vm in range(6)]


def test_s3_lease_expiry_steal_and_a_renewal_after_being_stolen(s3_store: Backend) -> None:
    # S3's LastModified has whole seconds: a lease read back may look up to a
    # second shorter than it is, so the lease here lasts 3 s (300 s in use)
    ttl = 3.0
    a = vmlease.acquire(s3_store, 7, "agent-a", ttl)
    with pytest.raises(LeaseBusy, match="VM 7 is being backed up by"):
        vmlease.acquire(s3_store, 7, "agent-b", ttl)
    a.renew()
    time.sleep(ttl + 1.2)
    b = vmlease.acquire(s3_store, 7, "agent-b", ttl)
    with pytest.raises(LeaseLost, match="passed to agent"):
        a.renew()
    a.release()
    state, now = vmlease.read(s3_store, 7, ttl)
    assert state is not None and state.owner == "agent-b" and state.held_at(now)
    b.release()
    c = vmlease.acquire(s3_store, 7, "agent-c", ttl)
    assert c.owner == "agent-c"


def test_s3_lease_put_is_a_compare_and_swap(s3_store: Backend) -> None:
    """The storage side alone: create once, replace only the version read."""
    leases = s3_store
    assert isinstance(leases, vmlease.LeaseStore)
    first = leases.lease_put("vm-1", b"one", None)
    assert first is not None and leases.lease_put("vm-1", b"again", None) is None
    second = leases.lease_put("vm-1", b"two", first.version)
    assert second is not None and second.version != first.version
    assert leases.lease_put("vm-1", b"stale", first.version) is None   # an old version
    got = leases.lease_get("vm-1")
    assert got is not None and got.data == b"two" and got.version == second.version
    assert abs(got.written - leases.lease_now()) < 60
