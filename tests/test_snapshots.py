"""Snapshot sets end to end through onesim, on 7.x and 6.8 (revert in
POWEROFF) and 6.6.2 (revert in SUSPENDED: oned refuses that from 6.6.3 on),
with raw images on the shared TM and qcow2 images on the qcow2 TM."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentkit import (  # noqa: F401  (cloud_per_storage: the `cloud` fixture)
    Cloud,
    MiB,
    cloud_per_storage,
    make_cloud,
    pattern,
)
from tests.onesim.testing import wait_vm
from tests.test_backup import write_blocks

DISK = 1 * MiB


@pytest.fixture(params=[("7.4.0", "shared-raw"), ("7.4.0", "qcow2"), ("6.8.0", "qcow2"),
                        ("6.6.2", "shared-raw")], ids=lambda p: "-".join(p))
def versioned(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    with make_cloud(tmp_path, *request.param) as c:
        yield c


def three_disk_vm(c: Cloud) -> int:
    return c.vm("snap", [c.image("s0", pattern(DISK, 1)), c.image("s1", pattern(DISK, 2)),
                         {"TYPE": "fs", "SIZE": 1}])


def events_of(c: Cloud, vm: int) -> list[str]:
    return [k for k, _ in c.sim.published() if k.startswith(f"EVENT VM {vm}/")]


def test_create_list_revert_delete(versioned: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = versioned
    vm = three_disk_vm(c)
    before = {i: c.disk_path(vm, i).read_bytes() for i in (0, 1)}
    r = c.run("snapshot", "create", str(vm), "--name", "before-upgrade", "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc = r.json()
    assert [d["disk_id"] for d in doc["disks"]] == [0, 1]
    assert any("disk 2 is volatile" in s for s in doc["skipped"])

    listed = c.run("snapshot", "list", str(vm), "--json", capsys=capsys).json()
    assert [s["name"] for s in listed] == ["before-upgrade"]
    assert listed[0]["size_mb"] == 2 and listed[0]["expires"] is None

    # the guest changes both disks
    write_blocks(c.disk_path(vm, 0), [0, 3], seed=9)
    write_blocks(c.disk_path(vm, 1), [15], seed=9)
    assert c.disk_path(vm, 0).read_bytes() != before[0]

    published = len(c.sim.published())
    r = c.run("snapshot", "revert", str(vm), "before-upgrade", "--json", capsys=capsys)
    assert r.code == 0, r.err
    info = c.one.vm.info(vm)
    assert (info.STATE, info.LCM_STATE) == (3, 3)
    assert {i: c.disk_path(vm, i).read_bytes() for i in (0, 1)} == before
    states = [k.split("/", 1)[1].strip() for k, _ in c.sim.published()[published:]
              if k.startswith(f"EVENT VM {vm}/")]
    if c.sim.version == "6.6.2":
        assert r.json()["stopped_as"] == "suspend"
        assert "SUSPENDED/LCM_INIT" in states and "POWEROFF/LCM_INIT" not in states
    else:
        assert r.json()["stopped_as"] == "poweroff-hard"
        assert "POWEROFF/LCM_INIT" in states and "SUSPENDED/LCM_INIT" not in states
    assert states[-1] == "ACTIVE/RUNNING"

    r = c.run("snapshot", "delete", str(vm), "before-upgrade", capsys=capsys)
    assert r.code == 0, r.err
    assert c.run("snapshot", "list", str(vm), "--json", capsys=capsys).json() == []
    # oned keeps an empty SNAPSHOTS element per disk once its snapshots are gone
    assert all(not s.SNAPSHOT for s in c.one.vm.info(vm).SNAPSHOTS or [])


def test_poweroff_vm_is_reverted_without_a_state_change(
        versioned: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = versioned
    vm = three_disk_vm(c)
    assert c.run("snapshot", "create", str(vm), "--name", "s", capsys=capsys).code == 0
    before = c.disk_path(vm, 0).read_bytes()
    c.one.vm.action("poweroff", vm)
    wait_vm(c.one, vm, "POWEROFF")
    write_blocks(c.disk_path(vm, 0), [2], seed=3)
    r = c.run("snapshot", "revert", str(vm), "s", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["stopped_as"] == "" and r.json()["state"] == "POWEROFF"
    assert c.disk_path(vm, 0).read_bytes() == before


def test_failed_revert_of_second_disk_names_it_and_brings_the_vm_back(
        versioned: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = versioned
    vm = three_disk_vm(c)
    assert c.run("snapshot", "create", str(vm), "--name", "s", capsys=capsys).code == 0
    c.sim.faults.fail_driver("snapshot_revert", count=1, vm_id=vm, disk_id=1)
    r = c.run("snapshot", "revert", str(vm), "s", capsys=capsys)
    assert r.code == 4
    assert "failed at disk 1" in r.err and "disks already reverted: 0" in r.err
    info = c.one.vm.info(vm)
    assert (info.STATE, info.LCM_STATE) == (3, 3)


def test_expiry_and_partly_detached_sets(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = three_disk_vm(cloud)
    r = cloud.run("snapshot", "create", str(vm), "--name", "short", "--ttl", "1s", capsys=capsys)
    assert r.code == 0, r.err
    r = cloud.run("snapshot", "create", str(vm), "--name", "long", "--ttl", "7d", capsys=capsys)
    assert r.code == 0, r.err
    time.sleep(1.1)
    r = cloud.run("snapshot", "expire", "--json", capsys=capsys)
    assert [s["name"] for s in r.json()] == ["short"]
    assert [s["name"] for s in cloud.run("snapshot", "list", str(vm), "--json",
                                         capsys=capsys).json()] == ["long"]

    # detach disk 1: the set keeps listing and deletes cleanly
    cloud.one.vm.detach(vm, 1)
    wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    listed = cloud.run("snapshot", "list", str(vm), "--json", capsys=capsys).json()
    assert [d["disk_id"] for d in listed[0]["disks"]] == [0]
    assert cloud.run("snapshot", "delete", str(vm), "long", capsys=capsys).code == 0
    assert cloud.run("snapshot", "list", str(vm), "--json", capsys=capsys).json() == []


def test_failed_create_rolls_back_and_names_the_disk(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = three_disk_vm(cloud)
    cloud.sim.faults.fail_driver("snapshot_create", count=1, vm_id=vm, disk_id=1)
    r = cloud.run("snapshot", "create", str(vm), "--name", "x", capsys=capsys)
    assert r.code == 4 and "disk 1" in r.err and "rolled back" in r.err
    assert cloud.run("snapshot", "list", str(vm), "--json", capsys=capsys).json() == []


def test_bad_names_and_durations(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = three_disk_vm(cloud)
    r = cloud.run("snapshot", "create", str(vm), "--name", "../etc", capsys=capsys)
    assert r.code == 2 and "not allowed" in r.err
    r = cloud.run("snapshot", "create", str(vm), "--ttl", "soon", capsys=capsys)
    assert r.code == 2 and "--ttl" in r.err
    r = cloud.run("snapshot", "revert", str(vm), "nope", capsys=capsys)
    assert r.code == 6 and "no snapshot set named 'nope'" in r.err
    assert cloud.run("snapshot", "create", str(vm), "--name", "dup", capsys=capsys).code == 0
    r = cloud.run("snapshot", "create", str(vm), "--name", "dup", capsys=capsys)
    assert r.code == 2 and "already has" in r.err



