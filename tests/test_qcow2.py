"""Persistent qcow2 disks, where oned never deletes snapshot 0
(Snapshots::test_delete: a persistent disk whose snapshots allow no orphans;
the qcow2 TM's ALLOW_ORPHANS="FORMAT" is NO for qcow2). Images are qcow2 on
the qcow2 TM, the operator has not opted in to base snapshots unless a test
says so; everything runs through the CLI or the agent process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agentkit import Cloud, MiB, make_cloud, pattern
from tests.agentproc import AgentProcess
from tests.onesim.testing import wait_until, wait_vm
from tests.test_backup import export, write_blocks

DISK = 4 * MiB
TMP = "oneback-tmp-0badc0de"   # an owner that is not running


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    with make_cloud(tmp_path, storage="qcow2-plain") as c:
        yield c


def snapshots(c: Cloud, vm: int) -> dict[int, list[tuple[int, str]]]:
    """disk id -> [(snapshot id, name)] as oned lists them."""
    return {int(s.DISK_ID): [(int(x.ID), x.NAME) for x in s.SNAPSHOT]
            for s in c.one.vm.info(vm).SNAPSHOTS or []}


def next_snapshot(c: Cloud, vm: int, disk: int) -> int:
    return next(int(s.NEXT_SNAPSHOT) for s in c.one.vm.info(vm).SNAPSHOTS
                if int(s.DISK_ID) == disk)


def persistent_vm(c: Cloud, name: str, seed: int, **kw: Any) -> int:
    """Disk 0 a persistent qcow2 image, disk 1 a non-persistent one."""
    p = c.image(f"{name}-p", pattern(DISK, seed), persistent=True)
    n = c.image(f"{name}-n", pattern(DISK, seed + 1))
    assert c.one.image.info(p).FORMAT == "qcow2"
    return c.vm(name, [p, n], **kw)


def test_running_vm_without_opt_in_skips_the_disk_and_leaves_nothing(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = persistent_vm(cloud, "run", 1)
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    disks = {d["disk_id"]: d for d in r.json()["disks"]}
    assert disks[0]["excluded"] and disks[0]["bytes_read"] == 0
    assert disks[1]["bytes_read"] == DISK
    why = [w for w in r.json()["warnings"] if w.startswith("disk 0 ")]
    assert len(why) == 1
    for part in ("persistent qcow2", "never deletes its snapshot 0", "powered off",
                 'ONEBACK_QCOW2_BASE="yes"', "qcow2_base = true"):
        assert part in why[0], (part, why[0])
    # no snapshot was ever taken of disk 0; disk 1's is gone again
    assert snapshots(cloud, vm).get(0) is None
    assert snapshots(cloud, vm).get(1) == []
    assert cloud.leftovers() == []
    shown = cloud.run("show", str(r.json()["backup_id"]), capsys=capsys)
    assert "disk 0 was not backed up" in shown.out


@pytest.mark.parametrize("who", ["owner", "operator"])
def test_opt_in_keeps_one_base_and_later_backups_leave_nothing_else(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], who: str) -> None:
    vm = persistent_vm(cloud, "base", 3)
    if who == "owner":
        cloud.one.vm.update(vm, 'ONEBACK_QCOW2_BASE="yes"', 1)
    else:
        cloud.config.write_text(cloud.config.read_text() + "[backup]\nqcow2_base = true\n")
    first = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert first.code == 0, first.err
    assert not [w for w in first.json()["warnings"] if w.startswith("disk 0")]
    at_first = cloud.disk_path(vm, 0).read_bytes()
    assert export(cloud, capsys, first.json()["backup_id"], 0) == at_first
    assert snapshots(cloud, vm)[0] == [(0, "oneback-base")]

    for round_ in (1, 2):
        write_blocks(cloud.disk_path(vm, 0), [round_, 3], seed=round_, unit=MiB)
        r = cloud.run("backup", str(vm), "--json", capsys=capsys)
        assert r.code == 0, r.err
        assert r.json()["kind"] == "incremental"
        assert r.json()["warnings"] == []
        d0 = next(d for d in r.json()["disks"] if d["disk_id"] == 0)
        assert d0["bytes_changed"] == 2 * MiB
        assert export(cloud, capsys, r.json()["backup_id"], 0) == \
            cloud.disk_path(vm, 0).read_bytes()
        # snapshot N > 0 was taken (a child of the base) and deleted again
        assert snapshots(cloud, vm)[0] == [(0, "oneback-base")]
        assert next_snapshot(cloud, vm, 0) == 1 + round_
    assert cloud.leftovers() == []
    assert cloud.run("cleanup", capsys=capsys).out.strip() == "nothing to clean up"


@pytest.mark.parametrize("state", ["POWEROFF", "SUSPENDED"])
def test_stopped_vm_is_saved_directly_without_a_snapshot(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], state: str) -> None:
    vm = persistent_vm(cloud, "off", 5)
    cloud.one.vm.action("poweroff" if state == "POWEROFF" else "suspend", vm)
    wait_vm(cloud.one, vm, state)
    published = len(cloud.sim.published())
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["warnings"] == []
    assert export(cloud, capsys, r.json()["backup_id"], 0) == cloud.disk_path(vm, 0).read_bytes()
    # disk 0 never had a snapshot: no DISK_SNAPSHOT state, no SNAPSHOTS for it
    assert snapshots(cloud, vm).get(0) is None
    states = [k for k, _ in cloud.sim.published()[published:] if k.startswith(f"EVENT VM {vm}/")]
    assert any("HOTPLUG_SAVEAS" in k for k in states)
    assert cloud.leftovers() == []
    wait_vm(cloud.one, vm, state)


def test_cleanup_reports_a_permanent_leftover_once_and_exits_0_twice(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.catalog import Catalog
    from agent.model import JournalKind

    vm = persistent_vm(cloud, "left", 7)
    # what a backup by an older oneback left: snapshot 0 of the persistent
    # disk, journaled by a run that died, and one removable leftover
    name = f"{TMP}-d0"
    assert cloud.one.vm.disksnapshotcreate(vm, 0, name) == 0
    wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    cloud.one.vm.disksnapshotcreate(vm, 1, f"{TMP}-d1")
    wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    assert cloud.run("list", capsys=capsys).code == 0   # creates the catalog
    with Catalog.open(cloud.tmp / "catalog.sqlite") as cat:
        entry = cat.journal_record(JournalKind.SNAPSHOT, name, "0badc0de", vm_id=vm, disk_id=0)
        cat.journal_created(entry.id, 0)

    first = cloud.run("cleanup", "--json", capsys=capsys)
    assert first.code == 0, first.err
    assert first.json()["failed"] == []
    assert first.json()["removed"] == [f"snapshot {TMP}-d1 of VM {vm}"]
    assert len(first.json()["kept"]) == 1
    assert name in first.json()["kept"][0]
    assert "never deletes its snapshot 0" in first.json()["kept"][0]

    second = cloud.run("cleanup", capsys=capsys)
    assert second.code == 0, second.err
    assert second.err == ""
    assert [line for line in second.out.splitlines() if line.startswith("kept")] == [
        f"kept {first.json()['kept'][0]}"]
    assert snapshots(cloud, vm)[0] == [(0, name)]


def test_snapshot_set_with_a_member_0_asks_first_then_deletes_what_it_can(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = persistent_vm(cloud, "set", 9)
    r = cloud.run("snapshot", "create", str(vm), "--name", "s", capsys=capsys)
    assert r.code == 2
    assert "--allow-permanent" in r.err and "disk 0" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert snapshots(cloud, vm) == {}   # nothing was taken

    r = cloud.run("snapshot", "create", str(vm), "--name", "s", "--allow-permanent", "--json",
                  capsys=capsys)
    assert r.code == 0, r.err
    assert [(d["disk_id"], d["snapshot_id"]) for d in r.json()["disks"]] == [(0, 0), (1, 0)]

    r = cloud.run("snapshot", "delete", str(vm), "s", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["deleted"] == [1]
    assert [(k["disk_id"], k["snapshot_id"]) for k in r.json()["kept"]] == [(0, 0)]
    assert "never deletes its snapshot 0" in r.json()["kept"][0]["reason"]
    assert snapshots(cloud, vm) == {0: [(0, "oneback-set:s")], 1: []}
    # asked again: the same answer, nothing tried, exit 0
    r = cloud.run("snapshot", "delete", str(vm), "s", capsys=capsys)
    assert r.code == 0 and "kept for good: disk 0 snapshot 0" in r.out


def test_expiry_deletes_what_it_can_reports_the_rest_once_and_never_loops(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = persistent_vm(cloud, "exp", 11)
    r = cloud.run("snapshot", "create", str(vm), "--name", "e", "--ttl", "1s",
                  "--allow-permanent", capsys=capsys)
    assert r.code == 0, r.err
    time.sleep(1.1)
    r = cloud.run("snapshot", "expire", "--json", capsys=capsys)
    assert r.code == 0, r.err
    [done] = r.json()
    assert done["name"] == "e" and done["deleted"] == [1] and done["failed"] == []
    assert [k["disk_id"] for k in done["kept"]] == [0]
    # the kept member lost its expiry: the next pass has nothing to do
    r = cloud.run("snapshot", "expire", capsys=capsys)
    assert r.code == 0 and r.out.strip() == "no snapshot set has expired"
    listed = cloud.run("snapshot", "list", str(vm), "--json", capsys=capsys).json()
    assert [(s["name"], s["expires"], [d["disk_id"] for d in s["disks"]]) for s in listed] == [
        ("e", None, [0])]


def test_agent_reports_the_skipped_disk_in_oneback_status(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = persistent_vm(cloud, "tagged", 13)
    agent(reconcile=60)
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    status = wait_until(lambda: (s := dict(cloud.one.vm.info(vm).USER_TEMPLATE)
                                 .get("ONEBACK_STATUS", "")).startswith("warning") and s, 30, 0.1)
    assert "disk 0 was not backed up" in status and "ONEBACK_QCOW2_BASE" in status
    assert snapshots(cloud, vm).get(0) is None
    assert cloud.leftovers() == []


# -- the pure decision, for every mode oned knows ----------------------------------


def _vm(state: int, disk_attrs: dict[str, str], persistent: bool = True,
        tree: tuple[str, int] | None = None, tags: dict[str, str] | None = None) -> Any:
    from agent.model import DiskInfo, DiskSnapshots, VmInfo

    disk = DiskInfo(0, 4, 1, "vda", "", "FILE", 1, persistent, False, disk_attrs)
    trees = {0: DiskSnapshots(0, *tree)} if tree else {}
    return VmInfo(3, "v", 0, 0, state, 3 if state == 3 else 0, (disk,), (), tags or {}, "",
                  "<VM/>", 0, trees)


@pytest.mark.parametrize(("attrs", "persistent", "tree", "permanent"), [
    ({"ALLOW_ORPHANS": "FORMAT", "FORMAT": "qcow2"}, True, None, True),
    ({"ALLOW_ORPHANS": "FORMAT", "FORMAT": "raw"}, True, None, False),
    ({"ALLOW_ORPHANS": "FORMAT", "FORMAT": "qcow2"}, False, None, False),
    ({"ALLOW_ORPHANS": "LINEAR", "FORMAT": "raw"}, True, None, True),
    ({"ALLOW_ORPHANS": "mixed", "FORMAT": "raw"}, True, None, False),
    ({"FORMAT": "raw"}, True, None, True),                          # no ALLOW_ORPHANS: NO
    ({"ALLOW_ORPHANS": "FORMAT", "FORMAT": "qcow2"}, True, ("NO", 3), False),  # has snapshots
    ({"ALLOW_ORPHANS": "FORMAT", "FORMAT": "raw"}, True, ("NO", 0), True),   # SNAPSHOTS wins
])
def test_which_first_snapshot_is_permanent(attrs: dict[str, str], persistent: bool,
                                           tree: tuple[str, int] | None, permanent: bool) -> None:
    from agent.model import ReadVia
    from agent.policy import first_snapshot_permanent, plan_disks

    running = _vm(3, attrs, persistent, tree)
    assert bool(first_snapshot_permanent(running, running.disks[0])) is permanent
    plan = plan_disks(running)
    assert [d.disk_id for d in plan.refused] == ([0] if permanent else [])
    assert plan.how(running.disks[0]) is ReadVia.SNAPSHOT
    for state in (5, 8):    # SUSPENDED, POWEROFF
        stopped = plan_disks(_vm(state, attrs, persistent, tree))
        assert stopped.how(stopped.read[0]) is (ReadVia.DIRECT if permanent
                                                else ReadVia.SNAPSHOT)
    opted = plan_disks(_vm(3, attrs, persistent, tree, {"ONEBACK_QCOW2_BASE": "yes"}))
    assert opted.how(opted.read[0]) is (ReadVia.BASE if permanent else ReadVia.SNAPSHOT)
    operator = plan_disks(running, qcow2_base=True)
    assert operator.how(operator.read[0]) is (ReadVia.BASE if permanent else ReadVia.SNAPSHOT)


def test_a_wrong_qcow2_base_setting_is_one_line_naming_the_key(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    cloud.config.write_text(cloud.config.read_text() + '[backup]\nqcow2_base = "yes"\n')
    r = cloud.run("backup", "1", capsys=capsys)
    assert r.code == 3 and "backup.qcow2_base must be true or false" in r.err
    assert len(r.err.strip().splitlines()) == 1
    cloud.config.write_text(cloud.config.read_text().replace('qcow2_base = "yes"', "base = 1"))
    r = cloud.run("backup", "1", capsys=capsys)
    assert r.code == 3 and "unknown key backup.base" in r.err
