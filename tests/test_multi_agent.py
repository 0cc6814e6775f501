"""Several agents, one repository: per-VM leases in the repository,
placement by cluster, and catalogs that see each other's backups.

The lease tests drive `agent.vmlease` over a real LocalStore directory
with real processes racing; the agent tests run two `oneback agent`
processes on two proxy VMs in two onesim clusters sharing one repository."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent import vmlease
from agent.errors import LeaseBusy, LeaseLost
from agent.store.local import LocalStore
from tests.agentkit import REPO, Cloud, MiB, pattern, write_config
from tests.agentproc import AgentProcess, agent_config
from tests.onesim.simulator import Simulator
from tests.onesim.testing import (
    FAST,
    client,
    create_cluster,
    create_image,
    create_proxy_vm,
    create_vm,
    wait_until,
)

DISK = 1 * MiB

# -- the lease, alone ---------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> LocalStore:
    return LocalStore.init(tmp_path / "repo")


def _race(path: str, vm_id: int, owner: str, barrier: Any, out: Any) -> None:
    store = LocalStore.open(Path(path))
    barrier.wait()
    try:
        vmlease.acquire(store, vm_id, owner, 30.0)
        out.put((vm_id, owner))
    except LeaseBusy:
        out.put((vm_id, None))


def test_two_processes_racing_for_a_lease_one_wins(repo: LocalStore) -> None:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    rounds, racers = 12, 4
    for vm in range(rounds):
        barrier = ctx.Barrier(racers)
        procs = [ctx.Process(target=_race, args=(str(repo.path), vm, f"agent{i}", barrier, out))
                 for i in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    results = [out.get(timeout=5) for _ in range(rounds * racers)]
    for vm in range(rounds):
        winners = [o for v, o in results if v == vm and o is not None]
        assert len(winners) == 1, (vm, results)
        state, _ = vmlease.read(repo, vm, 30.0)
        assert state is not None and state.owner == winners[0]


def test_expiry_steal_and_a_renewal_after_being_stolen(repo: LocalStore) -> None:
    a = vmlease.acquire(repo, 7, "agent-a", 1.0)
    with pytest.raises(LeaseBusy, match="VM 7 is being backed up by"):
        vmlease.acquire(repo, 7, "agent-b", 1.0)
    a.renew()                                   # the holder keeps it
    time.sleep(1.2)                             # ... until it stops renewing
    b = vmlease.acquire(repo, 7, "agent-b", 1.0)
    with pytest.raises(LeaseLost, match="passed to agent"):
        a.renew()
    a.release()                                 # a lost lease is not released by the loser
    state, now = vmlease.read(repo, 7, 1.0)
    assert state is not None and state.owner == "agent-b" and state.held_at(now)
    b.release()                                 # released: taken at once, no expiry wait
    c = vmlease.acquire(repo, 7, "agent-c", 1.0)
    assert c.owner == "agent-c"
    # only the newest generation stays on disk
    assert len(list((repo.path / "leases" / "vm-7").iterdir())) == 1


def test_a_garbled_or_forged_lease_holds_for_one_lease_time_at_most(repo: LocalStore) -> None:
    directory = repo.path / "leases" / "vm-9"
    directory.mkdir(parents=True)
    (directory / "000000000004").write_bytes(b"\x00garbage{")
    with pytest.raises(LeaseBusy, match="unreadable lease record"):
        vmlease.acquire(repo, 9, "agent-a", 1.0)
    time.sleep(1.2)
    held = vmlease.acquire(repo, 9, "agent-a", 1.0)
    assert held.version == "5"
    # forged: a record that claims a year, written (mtime) a day ahead
    forged = directory / "000000000006"
    forged.write_text(json.dumps({"v": 1, "vm": 9, "owner": "evil", "agent": "x",
                                  "token": "t", "ttl": 365 * 86400}))
    os.utime(forged, (time.time() + 86400, time.time() + 86400))
    with pytest.raises(LeaseLost):
        held.renew()                            # it is not ours any more...
    taken = vmlease.acquire(repo, 9, "agent-b", 1.0)   # ...but it does not block anyone
    assert taken.owner == "agent-b"
    # a record claiming more than MAX_TTL is cut to it
    (directory / "000000000008").write_text(json.dumps(
        {"v": 1, "vm": 9, "owner": "evil", "agent": "x", "token": "t", "ttl": 1e12}))
    state, now = vmlease.read(repo, 9, 1.0)
    assert state is not None and state.until - now <= vmlease.MAX_TTL + 1
    # a lease for another VM's record is not believed either
    (directory / "000000000009").write_text(json.dumps(
        {"v": 1, "vm": 10, "owner": "evil", "agent": "x", "token": "t", "ttl": 5}))
    state, _ = vmlease.read(repo, 9, 1.0)
    assert state is not None and "unreadable" in state.problem


# -- two agents, two clusters, one repository -------------------------------------------


@dataclass
class World:
    sim: Simulator
    one: Any
    a: Cloud
    b: Cloud
    only_a: int
    only_b: int
    shared: list[int]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    sim = Simulator.start(tmp_path / "onesim", delay=FAST)
    try:
        one = client(sim)
        ca, _, ds_a = create_cluster(one, "east")
        cb, _, ds_b = create_cluster(one, "west")
        # a datastore both clusters reach (CLUSTERS 100, 101)
        ds_s = int(one.datastore.allocate(
            'NAME="both"\nTYPE="IMAGE_DS"\nDS_MAD="fs"\nTM_MAD="local"', ca))
        one.cluster.adddatastore(cb, ds_s)
        proxy_a = create_proxy_vm(one, sim, "proxy-a", ds=ds_a)
        proxy_b = create_proxy_vm(one, sim, "proxy-b", ds=ds_b)
        work_a, work_b = tmp_path / "a", tmp_path / "b"
        work_a.mkdir()
        work_b.mkdir()
        cfg_a = write_config(work_a, sim, proxy_a)
        (work_b / "repo").symlink_to(work_a / "repo")   # the shared repository
        cfg_b = write_config(work_b, sim, proxy_b)
        a, b = Cloud(sim, one, proxy_a, cfg_a, work_a), Cloud(sim, one, proxy_b, cfg_b, work_b)

        def vm(name: str, ds: int, seed: int) -> int:
            img = create_image(one, sim, f"{name}-0", pattern(DISK, seed), ds=ds)
            return create_vm(one, sim, name, [img])
        yield World(sim, one, a, b, vm("only-a", ds_a, 1), vm("only-b", ds_b, 2),
                    [vm(f"both-{i}", ds_s, 10 + i) for i in range(2)])
    finally:
        sim.stop()


def _listed(c: Cloud) -> dict[int, list[dict[str, Any]]]:
    r = c.call("list", "--json")
    assert r.code == 0, r.err
    out: dict[int, list[dict[str, Any]]] = {}
    for b in r.json():
        out.setdefault(b["vm_id"], []).append(b)
    return out


def _ts(line: dict[str, Any]) -> float:
    return datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()


def _intervals(agent: AgentProcess, vm: int, end: float) -> list[tuple[float, float]]:
    """When `agent` held VM `vm`'s lease (one interval per acquisition)."""
    spans, start = [], None
    for line in agent.lines:
        if line.get("vm_id") != vm:
            continue
        if line.get("event") == "lease.acquired":
            start = _ts(line)
        elif line.get("event") in ("lease.released", "lease.lost") and start is not None:
            spans.append((start, _ts(line)))
            start = None
    if start is not None:
        spans.append((start, end))
    return spans


def test_two_agents_share_a_repository_and_take_over_a_dead_ones_vms(world: World) -> None:
    w, one = world, world.one
    slow = w.shared[0]
    lease = 'lease_time = 2\nsync_interval = 1\n'
    agent_config(w.a, reconcile=0.5, extra=lease)
    agent_config(w.b, reconcile=0.5, extra=lease)
    # A alone first: it takes VM `slow`, whose save-as the driver drags out
    w.sim.faults.slow_driver("saveas", 6.0, count=1, vm_id=slow)
    a = AgentProcess(w.a)
    b: AgentProcess | None = None
    a2: AgentProcess | None = None
    try:
        a.wait_event("agent.started")
        one.vm.update(slow, 'ONEBACK="yes"', 1)
        a.wait_event("lease.acquired", where=lambda x: x.get("vm_id") == slow)
        for vm in (w.only_a, w.only_b, w.shared[1]):
            one.vm.update(vm, 'ONEBACK="yes"', 1)
        b = AgentProcess(w.b)
        b.wait_event("agent.started")
        # A is inside the save-as of `slow`: kill -9
        wait_until(lambda: any(i.NAME.startswith("oneback-tmp")
                               for i in one.imagepool.info(-2, -1, -1).IMAGE), 20, 0.05)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        killed = time.time()

        # B: its own VM, the shared ones (the dead agent's after its lease
        # expired), never A's; A's VM is reported as not served here
        b.wait_event("job.done", timeout=60, where=lambda x: x.get("vm_id") == slow
                     and "backup_id" in str(x.get("result")))
        wait_until(lambda: {w.only_b, *w.shared} <= set(_listed(w.b)), 30, 0.2)
        assert w.only_a not in {j.get("vm_id") for j in b.events("job.started")}
        status = w.b.call("status", "--json")
        assert status.code == 0, status.err
        unserved = {n["vm_id"]: n["status"] for n in status.json()["not_served"]}
        assert set(unserved) == {w.only_a}
        assert unserved[w.only_a].startswith("not served here (datastore")
        assert "cluster(s) 101" in unserved[w.only_a]
        # the takeover waited for the lease: B took `slow` after A's last renewal ran out
        took = next(_ts(x) for x in b.events("lease.acquired") if x["vm_id"] == slow)
        assert took > killed
        # never two agents on one VM at once
        for vm in (w.only_a, w.only_b, *w.shared):
            for sa, ea in _intervals(a, vm, killed):
                for sb, eb in _intervals(b, vm, time.time()):
                    assert eb <= sa or ea <= sb, (vm, (sa, ea), (sb, eb))

        # A restarts: its start-up sweep removes what the killed run left
        a2 = AgentProcess(w.a)
        a2.wait_event("agent.started")
        wait_until(lambda: w.only_a in _listed(w.a), 30, 0.2)
        assert w.only_b not in {j.get("vm_id") for j in a2.events("job.started")}
        w.sim.wait_idle(20)
        wait_until(lambda: w.a.leftovers() == [] and w.b.leftovers() == [], 20, 0.2)

        # every VM has a backup, and either proxy lists them all
        for c in (w.a, w.b):
            listed = _listed(c)
            assert {w.only_a, w.only_b, *w.shared} <= set(listed), c.config
        # a backup B made restores from A's proxy
        made_by_b = max(x["backup_id"] for x in _listed(w.a)[slow])
        r = w.a.call("restore", str(made_by_b), "--name", "from-the-other-proxy", "--json")
        assert r.code == 0, r.err
        new = r.json()["vm_id"]
        restored = one.vm.info(new).TEMPLATE["DISK"]
        restored = restored if isinstance(restored, dict) else restored[0]
        path = w.a.disk_path(new, int(restored["DISK_ID"]))
        assert path.read_bytes() == pattern(DISK, 10)
        # forgetting it on A keeps B's manifest (and B's backup), and A's
        # next sync does not bring it back
        manifests = sorted(LocalStore.open(w.a.tmp / "repo").manifests())
        r = w.a.call("forget", str(made_by_b), "--json")
        assert r.code == 0, r.err
        # (the restored VM carries ONEBACK="yes" and may gain a manifest meanwhile)
        assert set(manifests) <= set(LocalStore.open(w.a.tmp / "repo").manifests())
        imported = w.a.call("catalog", "sync", "--json").json()["imported"]
        assert [x for x in imported if x["vm_id"] != new] == []   # only the restored VM's
        assert made_by_b not in [x["backup_id"] for x in _listed(w.a).get(slow, [])]
        assert _listed(w.b)[slow]
    finally:
        for p in (a2, b):
            if p is not None:
                p.stop()
        if a.proc.poll() is None:
            a.proc.kill()


def test_catalog_sync_imports_on_demand(world: World) -> None:
    """`oneback catalog sync` imports another catalog's backups once."""
    w = world
    r = w.a.call("backup", str(w.shared[0]), "--json")
    assert r.code == 0, r.err
    r = w.b.call("catalog", "sync", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert [i["vm_id"] for i in doc["imported"]] == [w.shared[0]]
    again = w.b.call("catalog", "sync", "--json").json()
    assert again["imported"] == [] and again["known"] == 1
    # attach refused across clusters, with oned's error: B's proxy cannot read A's VM
    r = w.b.call("backup", str(w.only_a))
    assert r.code != 0
    assert "is not part of cluster" in r.err
    assert w.b.leftovers() == []


def test_cleanup_on_one_proxy_spares_what_another_agent_is_doing(world: World) -> None:
    """A's backup is inside its save-as (its snapshot and image exist, its
    lease held): `oneback cleanup` on B removes none of it."""
    w = world
    w.sim.faults.slow_driver("saveas", 3.0, count=1, vm_id=w.shared[0])
    proc = w.a.spawn("backup", str(w.shared[0]), "--json")
    try:
        wait_until(lambda: any(i.NAME.startswith("oneback-tmp")
                               for i in w.one.imagepool.info(-2, -1, -1).IMAGE), 20, 0.05)
        r = w.b.call("cleanup", "--json")
        assert r.code == 0, r.err
        assert r.json()["removed"] == []
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["vm_id"] == w.shared[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert w.a.leftovers() == [] and w.b.leftovers() == []
    # the lease it held is released: B backs the VM up at once
    r = w.b.call("backup", str(w.shared[0]), "--json")
    assert r.code == 0, r.err


def test_backup_by_hand_waits_for_no_lease_but_refuses_a_held_one(world: World) -> None:
    """`oneback backup` takes the VM's lease too: while another agent holds
    it, the command is refused (exit 7) naming the holder."""
    w = world
    store = LocalStore.open(w.a.tmp / "repo")
    held = vmlease.acquire(store, w.shared[1], "someone-else", 30.0, agent="proxy VM 99")
    r = w.b.call("backup", str(w.shared[1]))
    assert r.code == 7, r.err
    assert f"VM {w.shared[1]} is being backed up by agent proxy VM 99" in r.err
    held.release()
    assert w.b.call("backup", str(w.shared[1])).code == 0


def test_placement_from_the_documents_and_agent_clusters(world: World, tmp_path: Path) -> None:
    """Which VMs a proxy serves, from its cluster or `agent.clusters`."""
    from agent import placement
    from agent.cloud import Cloud as OneCloud
    w = world
    one = OneCloud(w.sim.endpoint, w.sim.credentials)
    datastores = one.datastores()
    proxy_b = one.vm(w.b.proxy_id)
    mine = placement.proxy_clusters(proxy_b, None)
    assert mine == {proxy_b.cluster_id} and proxy_b.cluster_id >= 100
    assert placement.not_served(one.vm(w.only_b), mine, datastores) is None
    assert placement.not_served(one.vm(w.shared[0]), mine, datastores) is None
    why = placement.not_served(one.vm(w.only_a), mine, datastores)
    assert why is not None and "is in cluster(s)" in why
    # the operator's list replaces the proxy's cluster
    assert placement.proxy_clusters(proxy_b, (0,)) == {0}
    assert placement.not_served(one.vm(w.only_b), {0}, datastores) is not None
    assert placement.not_served(one.vm(w.only_b), set(), datastores) is not None
    # a bad agent.clusters is one line naming the fix
    text = w.b.config.read_text() + "\n[agent]\nclusters = [\"east\"]\n"
    bad = tmp_path / "bad.toml"
    bad.write_text(text)

    p = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(bad)],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 3, p.stderr
    assert "agent.clusters must be a list of cluster ids" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_an_agent_skips_a_vm_another_agent_just_backed_up(world: World) -> None:
    """B's catalog has not synced since A backed the VM up; B's job imports
    that VM's backups under the lease first and finds nothing due."""
    w = world
    vm = w.shared[0]
    agent_config(w.b, reconcile=60, extra="sync_interval = 3600\n")
    b = AgentProcess(w.b)
    try:
        b.wait_event("agent.started")
        r = w.a.call("backup", str(vm), "--json")     # A, by hand
        assert r.code == 0, r.err
        w.one.vm.update(vm, 'ONEBACK="yes"', 1)
        done = b.wait_event("job.done", timeout=30, where=lambda x: x.get("vm_id") == vm)
        assert "no longer due" in str(done["result"]), done
        assert [x["vm_id"] for x in json.loads(w.b.call("list", "--json").out)] == [vm]
        assert not b.events("job.failed")
    finally:
        b.stop()
