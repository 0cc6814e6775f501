"""Hostile review of issue 14's VM leases (agent.vmlease over a real
LocalStore directory): a holder must never work on a VM while another
agent may hold its lease."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from agent import vmlease
from agent.errors import LeaseBusy, LeaseLost, RepositoryError
from agent.store.local import LocalStore


def _two_agents(tmp_path: Path) -> tuple[LocalStore, LocalStore]:
    path = tmp_path / "repo"
    LocalStore.init(path)
    return LocalStore.open(path), LocalStore.open(path)


def _take_when_free(store: LocalStore, vm_id: int, owner: str, ttl: float,
                    within: float) -> vmlease.Held:
    deadline = time.monotonic() + within
    while True:
        try:
            return vmlease.acquire(store, vm_id, owner, ttl)
        except LeaseBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_a_holder_whose_renewals_fail_stops_before_its_lease_can_be_taken(
        tmp_path: Path) -> None:
    """The repository is unreachable for the holder (an NFS hiccup): its
    renewals fail, its lease runs out, and another agent takes the VM. The
    holder must have stopped by then, not go on backing the VM up beside it."""
    mine, other = _two_agents(tmp_path)
    ttl = 1.5
    held = vmlease.acquire(mine, 7, "agent-a", ttl)
    cancel = threading.Event()

    def unreachable() -> float:
        raise RepositoryError("cannot write in the repository: Input/output error")

    with vmlease.Heartbeat(held, cancel):
        mine.lease_now = unreachable  # type: ignore[method-assign]
        taken = _take_when_free(other, 7, "agent-b", ttl, within=10 * ttl)
        assert cancel.is_set(), ("agent-b took VM 7's lease while agent-a, whose renewals"
                                 " failed, was still working on the VM")
    assert taken.owner == "agent-b"
    assert held.lost and "renewals failed" in held.lost_message()


def test_work_does_not_start_under_a_lease_that_ran_out_before_the_heartbeat(
        tmp_path: Path) -> None:
    """The agent takes the lease, then syncs the VM's manifests and updates
    its status in oned before the backup (and its heartbeat) starts; if that
    took longer than the lease, another agent may have the VM by now."""
    mine, other = _two_agents(tmp_path)
    held = vmlease.acquire(mine, 8, "agent-a", 1.0)
    time.sleep(1.2)                                 # a slow sync / oned call
    vmlease.acquire(other, 8, "agent-b", 1.0)       # expired: taken over
    cancel = threading.Event()
    with pytest.raises(LeaseLost, match=r"passed to agent .*agent-b"):
        with vmlease.Heartbeat(held, cancel):
            pytest.fail("agent-a started backing up VM 8 under agent-b's lease")
    assert cancel.is_set()


def test_a_garbled_last_generation_does_not_block_the_vm_for_ever(tmp_path: Path) -> None:
    """A damaged or forged lease file named with the highest 12-digit
    generation: the next generation has 13 digits. It must still be taken
    over once the garbled record's lease time has passed."""
    store, _ = _two_agents(tmp_path)
    directory = store.path / "leases" / "vm-5"
    directory.mkdir(parents=True)
    (directory / "999999999999").write_bytes(b"\x00garbage{")
    with pytest.raises(LeaseBusy, match="unreadable lease record"):
        vmlease.acquire(store, 5, "agent-a", 1.0)
    held = _take_when_free(store, 5, "agent-a", 1.0, within=5.0)
    state, now = vmlease.read(store, 5, 1.0)
    assert state is not None and state.owner == "agent-a" and state.token == held.token
    held.renew()
    held.release()
    assert vmlease.acquire(store, 5, "agent-b", 1.0).owner == "agent-b"


def test_a_repository_clock_stepped_back_does_not_free_every_live_lease(
        tmp_path: Path) -> None:
    """The repository's clock (an NFS server's, stepped back 60 s by NTP)
    now reads earlier than the mtime of a lease its live holder just wrote.
    That lease is still held: another agent must not take the VM over
    (a record far in the future, a forged one, still holds no one up)."""
    mine, other = _two_agents(tmp_path)
    held = vmlease.acquire(mine, 3, "agent-a", 300.0)
    lease = mine.path / "leases" / "vm-3" / f"{int(held.version):012d}"
    ahead = time.time() + 60
    os.utime(lease, (ahead, ahead))
    with pytest.raises(LeaseBusy, match="being backed up by"):
        vmlease.acquire(other, 3, "agent-b", 300.0)
    held.renew()                                # the holder keeps it, on the new clock
    state, now = vmlease.read(other, 3, 300.0)
    assert state is not None and state.owner == "agent-a" and state.held_at(now)
    # forged: an hour and more ahead of a 300 s lease is not believed
    lease = mine.path / "leases" / "vm-3" / f"{int(held.version):012d}"
    os.utime(lease, (time.time() + 7200, time.time() + 7200))
    assert vmlease.acquire(other, 3, "agent-b", 300.0).owner == "agent-b"


def test_a_cloned_catalog_on_another_proxy_does_not_take_a_held_lease(
        tmp_path: Path) -> None:
    """An operator clones the proxy VM to add a second proxy: both catalogs
    have one catalog id. The lease's owner is that id (so that a restarted
    agent takes its own lease back at once); the clone on another proxy VM
    must not take a lease the original holds, or both back the VM up."""
    mine, other = _two_agents(tmp_path)
    held = vmlease.acquire(mine, 4, "cat-1", 30.0, agent="proxy VM 5")
    with pytest.raises(LeaseBusy, match="this catalog.s id"):
        vmlease.acquire(other, 4, "cat-1", 30.0, agent="proxy VM 6")
    held.renew()                                         # still the original's
    again = vmlease.acquire(mine, 4, "cat-1", 30.0, agent="proxy VM 5")   # a restart
    assert again.token != held.token
