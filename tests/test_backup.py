"""Backups end to end: `oneback backup` through pyone over HTTP to onesim,
real disk files, a real SQLite catalog and a real repository."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.agentkit import (  # noqa: F401  (cloud_per_storage: the `cloud` fixture)
    BLOCK,
    Cloud,
    MiB,
    cloud_per_storage,
    pattern,
)
from tests.onesim.testing import wait_until

DISK = 2 * MiB  # two 1 MiB blocks; the guest writes 64 KiB units (write_blocks)


def export(c: Cloud, capsys: pytest.CaptureFixture[str], backup_id: int, disk_id: int) -> bytes:
    out = c.tmp / f"export-{backup_id}-{disk_id}.raw"
    r = c.run("export", str(backup_id), str(disk_id), "-o", str(out), capsys=capsys)
    assert r.code == 0, r.err
    return out.read_bytes()


def spawn_until(c: Cloud, vm: int, leftover: str, *args: str) -> subprocess.Popen[str]:
    """Start `oneback backup VM` as a process; return once a temporary object
    whose description contains `leftover` exists in the cloud."""
    proc = c.spawn("backup", str(vm), *args)
    deadline = time.monotonic() + 20
    while not any(leftover in x for x in c.leftovers()):
        assert time.monotonic() < deadline, f"the backup never made a {leftover}"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    return proc


def write_blocks(path: Path, indexes: list[int], seed: int, unit: int = 64 * 1024) -> None:
    """The guest writes `unit` bytes at each index * unit."""
    with open(path, "r+b") as f:
        for i in indexes:
            f.seek(i * unit)
            f.write(pattern(unit, seed * 1000 + i))


def test_full_then_incremental_stores_only_changed_blocks(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    DISK = 32 * BLOCK  # noqa: N806 - this test counts backup blocks
    data = bytearray(pattern(DISK, 1))
    data[10 * BLOCK:14 * BLOCK] = bytes(4 * BLOCK)   # a hole
    vm = cloud.vm("web", [cloud.image("web-os", bytes(data))])

    full = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert full.code == 0, full.err
    doc = full.json()
    assert doc["kind"] == "full"
    assert doc["disks"][0]["bytes_read"] == DISK
    assert doc["disks"][0]["bytes_changed"] == DISK  # a full backup: every block is new
    assert 0 < doc["disks"][0]["bytes_stored"] < DISK
    at_full = cloud.disk_path(vm, 0).read_bytes()

    write_blocks(cloud.disk_path(vm, 0), [1, 5, 11, 31], seed=2, unit=BLOCK)  # 11: the hole
    inc = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert inc.code == 0, inc.err
    d = inc.json()["disks"][0]
    assert inc.json()["kind"] == "incremental"
    assert d["bytes_read"] == DISK
    assert d["bytes_changed"] == 4 * BLOCK
    assert 0 < d["bytes_stored"] <= 4 * BLOCK
    at_inc = cloud.disk_path(vm, 0).read_bytes()
    assert at_inc != at_full

    # Every backup is logically full: each restores to exactly what the disk held.
    assert export(cloud, capsys, doc["backup_id"], 0) == at_full
    assert export(cloud, capsys, inc.json()["backup_id"], 0) == at_inc
    assert cloud.leftovers() == []

    # An unchanged disk stores nothing at all.
    again = cloud.run("backup", str(vm), "--json", capsys=capsys).json()["disks"][0]
    assert (again["bytes_changed"], again["bytes_stored"]) == (0, 0)


def test_full_flag_rereads_everything_but_stores_nothing_new(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("db", [cloud.image("db-os", pattern(DISK, 3))])
    assert cloud.run("backup", str(vm), capsys=capsys).code == 0
    r = cloud.run("backup", str(vm), "--full", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["kind"] == "full"
    assert r.json()["disks"][0]["bytes_changed"] == DISK
    assert r.json()["disks"][0]["bytes_stored"] == 0   # content-addressed: already there


def test_dedup_across_two_vms_sharing_an_image(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    image = cloud.image("golden", pattern(DISK, 4))
    a = cloud.vm("a", [image])
    b = cloud.vm("b", [image])
    ra = cloud.run("backup", str(a), "--json", capsys=capsys).json()
    chunks = sum(1 for _ in (cloud.tmp / "repo" / "chunks").rglob("*") if _.is_file())
    rb = cloud.run("backup", str(b), "--json", capsys=capsys).json()
    assert ra["disks"][0]["bytes_stored"] > 0
    assert rb["disks"][0]["bytes_stored"] == 0
    assert sum(1 for _ in (cloud.tmp / "repo" / "chunks").rglob("*") if _.is_file()) == chunks


def test_volatile_disk_is_skipped_with_a_warning_and_kept_in_the_record(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("v", [cloud.image("v-os", pattern(DISK, 5)), {"TYPE": "fs", "SIZE": 2}])
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    disks = {d["disk_id"]: d for d in r.json()["disks"]}
    assert disks[1]["volatile"] is True and disks[1]["bytes_read"] == 0
    assert disks[1]["size"] == 2 * MiB
    assert any("disk 1 is volatile" in w for w in r.json()["warnings"])
    shown = cloud.run("show", str(r.json()["backup_id"]), capsys=capsys)
    assert "disk 1 is volatile" in shown.out


def test_exclusions_by_flag_and_by_vm_attribute(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("x", [cloud.image("x0", pattern(DISK, 6)), cloud.image("x1", pattern(DISK, 7)),
                        cloud.image("x2", pattern(DISK, 8))])
    r = cloud.run("backup", str(vm), "--exclude-disk", "1", "--json", capsys=capsys).json()
    disks = {d["disk_id"]: d for d in r["disks"]}
    assert disks[1]["excluded"] and disks[1]["bytes_read"] == 0
    assert disks[0]["bytes_read"] == disks[2]["bytes_read"] == DISK

    cloud.one.vm.update(vm, 'ONEBACK_EXCLUDE_DISKS="0,2"', 1)
    r = cloud.run("backup", str(vm), "--json", capsys=capsys).json()
    disks = {d["disk_id"]: d for d in r["disks"]}
    assert disks[0]["excluded"] and disks[2]["excluded"] and not disks[1]["excluded"]
    assert disks[1]["bytes_read"] == DISK

    cloud.one.vm.update(vm, 'ONEBACK_EXCLUDE_DISKS="zero"', 1)
    bad = cloud.run("backup", str(vm), capsys=capsys)
    assert bad.code == 2
    assert "ONEBACK_EXCLUDE_DISKS" in bad.err and len(bad.err.strip().splitlines()) == 1
    assert cloud.leftovers() == []


def test_vm_and_image_documents_are_saved(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.catalog import Catalog

    image = cloud.image("docs", pattern(DISK, 9))
    vm = cloud.vm("docs-vm", [image])
    r = cloud.run("backup", str(vm), "--json", capsys=capsys).json()
    with Catalog.open(cloud.tmp / "catalog.sqlite") as cat:
        assert "<NAME>docs-vm</NAME>" in cat.vm_document(r["backup_id"])
        docs = cat.image_documents(r["backup_id"])
    assert list(docs) == [image]
    assert "<NAME>docs</NAME>" in docs[image]


def test_bad_input_gets_one_line_errors(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    r = cloud.run("backup", "999", capsys=capsys)
    assert r.code == 6 and "999" in r.err and len(r.err.strip().splitlines()) == 1
    r = cloud.run("backup", str(cloud.proxy_id), capsys=capsys)
    assert r.code == 7 and "proxy VM" in r.err
    r = cloud.run("show", "42", capsys=capsys)
    assert r.code == 6 and "42" in r.err
    os.chmod(cloud.tmp / "one_auth", 0o644)
    r = cloud.run("backup", "1", capsys=capsys)
    assert r.code == 3 and "chmod 600" in r.err
    assert "Traceback" not in r.err


def test_a_vm_in_a_state_without_snapshots_is_refused(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    image = cloud.image("held-os", pattern(DISK, 10))
    template = cloud.one.template.allocate(f'NAME="held"\nMEMORY="64"\nCPU="0.1"\n'
                                           f'DISK=[IMAGE_ID="{image}"]')
    vm = cloud.one.template.instantiate(template, "held", True, "", False)   # on hold: no race
    r = cloud.run("backup", str(vm), capsys=capsys)
    assert r.code == 7 and "HOLD" in r.err
    assert cloud.leftovers() == []


def test_powered_off_and_suspended_vms_are_backed_up(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.onesim.testing import wait_vm

    vm = cloud.vm("off", [cloud.image("off-os", pattern(DISK, 11))])
    cloud.one.vm.action("poweroff", vm)
    wait_vm(cloud.one, vm, "POWEROFF")
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    wait_vm(cloud.one, vm, "POWEROFF")
    cloud.one.vm.action("resume", vm)
    wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    cloud.one.vm.action("suspend", vm)
    wait_vm(cloud.one, vm, "SUSPENDED")
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["kind"] == "incremental"
    assert cloud.leftovers() == []


# -- faults at every step ------------------------------------------------------

DRIVER_FAULTS = ["snapshot_create", "saveas", "attach", "detach", "image_delete",
                 "snapshot_delete"]
CALL_FAULTS = ["one.vm.disksnapshotcreate", "one.vm.disksaveas", "one.vm.attach",
               "one.vm.detach", "one.image.delete", "one.vm.disksnapshotdelete"]


@pytest.mark.parametrize("op", DRIVER_FAULTS)
def test_driver_failure_at_each_step_leaves_nothing_behind(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], op: str) -> None:
    vm = cloud.vm("f", [cloud.image("f0", pattern(DISK, 12)), cloud.image("f1", pattern(DISK, 13))])
    cloud.sim.faults.fail_driver(op, count=1)
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    if op in ("detach", "image_delete", "snapshot_delete"):
        # The data is safe; the cleanup failed once: the backup is committed,
        # the leftover reported, and removed by the next sweep.
        assert r.code == 0, r.err
        assert any("was not removed" in w for w in r.json()["warnings"])
        assert cloud.run("cleanup", capsys=capsys).code == 0
    else:
        assert r.code == 4, r.err
        assert len(r.err.strip().splitlines()) == 1
        assert cloud.run("list", "--json", capsys=capsys).json() == []
    assert cloud.leftovers() == []


@pytest.mark.parametrize("method", CALL_FAULTS)
def test_refused_call_at_each_step_leaves_nothing_behind(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], method: str) -> None:
    vm = cloud.vm("g", [cloud.image("g0", pattern(DISK, 14))])
    cloud.sim.faults.fail_call(method, "injected refusal", code=0x800)
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    if method in ("one.vm.detach", "one.image.delete", "one.vm.disksnapshotdelete"):
        assert r.code == 0, r.err
        cloud.run("cleanup", capsys=capsys)
    else:
        assert r.code == 4 and "injected refusal" in r.err
    assert cloud.leftovers() == []


def test_device_that_never_appears_is_a_clear_error(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("d", [cloud.image("d0", pattern(DISK, 15))])
    cfg = cloud.config.read_text()
    cloud.config.write_text(cfg.replace('dev_root = "', 'dev_root = "/nonexistent').replace(
        "device_timeout = 5", "device_timeout = 0.3"))
    r = cloud.run("backup", str(vm), capsys=capsys)
    assert r.code == 10, r.err
    assert cloud.leftovers() == []


def test_killed_mid_backup_then_run_again_cleans_up_and_completes(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("k", [cloud.image("k0", pattern(DISK, 16))])
    cloud.sim.faults.slow_driver("saveas", 3.0, count=1)
    proc = spawn_until(cloud, vm, "image")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cloud.sim.faults.clear()
    left = cloud.leftovers()
    assert any("snapshot" in x for x in left), left

    r = cloud.call("backup", str(vm), "--json")
    assert r.code == 0, r.err
    # wait for the slow image to settle and be swept
    assert cloud.leftovers() == []
    assert [b["backup_id"] for b in cloud.run("list", "--json", capsys=capsys).json()] == [
        r.json()["backup_id"]]


def test_sigterm_mid_backup_cleans_up_before_exit(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("t", [cloud.image("t0", pattern(DISK, 17))])
    cloud.sim.faults.slow_driver("attach", 1.0, count=1)
    proc = spawn_until(cloud, vm, "proxy disk")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert cloud.leftovers() == []


def test_cleanup_leaves_a_live_runs_objects_alone(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("live", [cloud.image("live0", pattern(DISK, 18))])
    cloud.sim.faults.slow_driver("saveas", 2.0, count=1)
    proc = spawn_until(cloud, vm, "image", "--json")
    r = cloud.run("cleanup", "--json", capsys=capsys)
    assert r.code == 0
    assert r.json()["removed"] == []
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert cloud.leftovers() == []


def test_a_second_backup_of_the_same_vm_is_refused_while_one_runs(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("twice", [cloud.image("tw0", pattern(DISK, 19))])
    cloud.sim.faults.slow_driver("saveas", 2.0, count=1)
    proc = spawn_until(cloud, vm, "snapshot")
    r = cloud.run("backup", str(vm), capsys=capsys)
    assert r.code == 7 and "already running" in r.err
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert cloud.leftovers() == []


def test_repository_and_catalog_are_private(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    import stat

    vm = cloud.vm("priv", [cloud.image("priv0", pattern(DISK, 20))])
    assert cloud.call("backup", str(vm)).code == 0
    created = [cloud.tmp / "repo", cloud.tmp / "catalog.sqlite",
               *(cloud.tmp / "repo").rglob("*")]
    for path in created:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_cleanup_removes_leftovers_a_lost_catalog_no_longer_knows(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("lost", [cloud.image("lost0", pattern(DISK, 21))])
    orphan = cloud.image("oneback-tmp-0badc0de-vm9-d0", pattern(BLOCK, 22))
    cloud.one.vm.disksnapshotcreate(vm, 0, "oneback-tmp-0badc0de-d0")
    wait_until(lambda: any("snapshot" in x for x in cloud.leftovers()), 10, 0.02)
    from tests.onesim.testing import wait_vm
    wait_vm(cloud.one, vm, "ACTIVE", "RUNNING")
    assert len(cloud.leftovers()) == 2
    r = cloud.run("cleanup", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert any(str(orphan) in x or "oneback-tmp-0badc0de-vm9-d0" in x for x in r.json()["removed"])
    assert cloud.leftovers() == []


def test_a_proxy_vm_that_is_not_running_is_named_in_the_error(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.onesim.testing import wait_vm

    vm = cloud.vm("np", [cloud.image("np0", pattern(DISK, 23))])
    cloud.one.vm.action("poweroff", cloud.proxy_id)
    wait_vm(cloud.one, cloud.proxy_id, "POWEROFF")
    r = cloud.run("backup", str(vm), capsys=capsys)
    assert r.code == 7 and f"proxy VM {cloud.proxy_id} is POWEROFF" in r.err
    assert [x for x in cloud.leftovers() if "snapshot" in x or "image" in x] == []
