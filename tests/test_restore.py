"""Restores end to end through onesim: disks first, then the VM, RUNNING."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agentkit import (  # noqa: F401  (cloud_per_storage: the `cloud` fixture)
    BLOCK,
    Cloud,
    MiB,
    cloud_per_storage,
    pattern,
)
from tests.test_backup import write_blocks

DISK = 2 * MiB


def vm_doc(c: Cloud, vm_id: int) -> object:
    return c.one.vm.info(vm_id)


def disks_of(c: Cloud, vm_id: int) -> dict[int, dict[str, str]]:
    t = c.one.vm.info(vm_id).TEMPLATE
    ds = t.get("DISK", [])
    ds = ds if isinstance(ds, list) else [ds]
    return {int(d["DISK_ID"]): d for d in ds}


def make_second_datastores(c: Cloud) -> tuple[int, int]:
    image_ds = int(c.one.datastore.allocate(
        'NAME="images2"\nTYPE="IMAGE_DS"\nDS_MAD="fs"\nTM_MAD="shared"', -1))
    system_ds = int(c.one.datastore.allocate(
        'NAME="system2"\nTYPE="SYSTEM_DS"\nTM_MAD="shared"', -1))
    return image_ds, system_ds


@pytest.fixture
def backed_up(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    """A VM with two data disks, one excluded disk and one volatile disk,
    backed up twice with changes in between."""
    d0 = cloud.image("r0", pattern(DISK, 1))
    d1 = cloud.image("r1", pattern(DISK, 2), persistent=True)
    d2 = cloud.image("r2", pattern(DISK, 3))
    vm = cloud.vm("app", [d0, d1, d2, {"TYPE": "fs", "SIZE": 1}])
    cloud.one.vm.update(vm, 'ONEBACK_EXCLUDE_DISKS="2"\nOWNER_NOTE="keep me"', 1)
    first = cloud.run("backup", str(vm), "--json", capsys=capsys).json()
    at_first = {i: cloud.disk_path(vm, i).read_bytes() for i in (0, 1)}
    write_blocks(cloud.disk_path(vm, 0), [0, 7], seed=5)
    write_blocks(cloud.disk_path(vm, 1), [30], seed=6)
    second = cloud.run("backup", str(vm), "--json", capsys=capsys).json()
    at_second = {i: cloud.disk_path(vm, i).read_bytes() for i in (0, 1)}
    assert at_first != at_second
    return {"vm": vm, "first": first["backup_id"], "second": second["backup_id"],
            "at_first": at_first, "at_second": at_second}


def test_restore_latest_and_older_backup_byte_for_byte(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], backed_up: dict) -> None:
    image_ds, system_ds = make_second_datastores(cloud)
    for key, data_key in (("second", "at_second"), ("first", "at_first")):
        r = cloud.run("restore", str(backed_up[key]), "--image-ds", str(image_ds),
                      "--system-ds", str(system_ds), "--json", capsys=capsys)
        assert r.code == 0, r.err
        doc = r.json()
        assert doc["template_deleted"] is True
        new = doc["vm_id"]
        info = cloud.one.vm.info(new)
        assert (info.STATE, info.LCM_STATE) == (3, 3)   # ACTIVE/RUNNING
        assert info.NAME == f"app-restored-{backed_up[key]}"
        assert int(info.HISTORY_RECORDS.HISTORY[-1].DS_ID) == system_ds
        disks = disks_of(cloud, new)
        assert sorted(disks) == [0, 1, 2, 3]
        for i in (0, 1):
            assert cloud.disk_path(new, i).read_bytes() == backed_up[data_key][i], (key, i)
        # the excluded disk: an empty image of the same size
        assert cloud.disk_path(new, 2).read_bytes() == bytes(DISK)
        assert disks[3]["TYPE"].lower() == "fs"      # volatile disk recreated
        for i in (0, 1, 2):
            img = cloud.one.image.info(int(disks[i]["IMAGE_ID"]))
            assert img.DATASTORE_ID == image_ds
        assert cloud.one.image.info(int(disks[1]["IMAGE_ID"])).PERSISTENT == 1
        assert info.USER_TEMPLATE.get("OWNER_NOTE") == "keep me"
        images = {i.ID for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE}
        assert {int(disks[i]["IMAGE_ID"]) for i in (0, 1, 2)} <= images
    assert [t.NAME for t in cloud.one.templatepool.info(-2, -1, -1).VMTEMPLATE
            if t.NAME.startswith("oneback")] == []
    assert cloud.leftovers() == []


def test_restore_with_defaults_uses_the_original_datastores(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], backed_up: dict) -> None:
    r = cloud.run("restore", str(backed_up["second"]), "--name", "again", "--json",
                  capsys=capsys)
    assert r.code == 0, r.err
    info = cloud.one.vm.info(r.json()["vm_id"])
    assert info.NAME == "again" and info.LCM_STATE == 3
    for image in r.json()["images"]:
        assert cloud.one.image.info(image["image_id"]).DATASTORE_ID == 1
    assert cloud.leftovers() == []


def test_damaged_chunk_fails_the_restore_naming_backup_disk_and_block(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], backed_up: dict) -> None:
    chunks = sorted(p for p in (cloud.tmp / "repo" / "chunks").rglob("*") if p.is_file())
    for p in chunks:
        p.chmod(0o644)
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
    images_before = {i.ID for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE}
    vms_before = {v.ID for v in cloud.one.vmpool.info(-2, -1, -1, -1).VM}
    r = cloud.run("restore", str(backed_up["second"]), capsys=capsys)
    assert r.code == 9, r.err
    assert f"backup {backed_up['second']} disk 0" in r.err and "block" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert {i.ID for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE} == images_before
    assert {v.ID for v in cloud.one.vmpool.info(-2, -1, -1, -1).VM} == vms_before
    assert cloud.leftovers() == []


@pytest.mark.parametrize("fault", ["deploy", "attach", "image"])
def test_failure_at_a_step_removes_everything_the_restore_made(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], backed_up: dict, fault: str) -> None:
    images_before = {i.ID for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE}
    vms_before = {v.ID for v in cloud.one.vmpool.info(-2, -1, -1, -1).VM}
    cloud.sim.faults.fail_driver(fault, count=1)
    r = cloud.run("restore", str(backed_up["second"]), capsys=capsys)
    assert r.code != 0
    assert "restore failed while" in r.err
    assert {i.ID for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE} == images_before
    assert {v.ID for v in cloud.one.vmpool.info(-2, -1, -1, -1).VM} == vms_before
    assert cloud.leftovers() == []


def test_restore_disk_and_export(cloud: Cloud, capsys: pytest.CaptureFixture[str],
                                 backed_up: dict) -> None:
    r = cloud.run("restore-disk", str(backed_up["first"]), "1", "--name", "just-one", "--json",
                  capsys=capsys)
    assert r.code == 0, r.err
    img = cloud.one.image.info(r.json()["image_id"])
    assert img.NAME == "just-one"
    src = Path(img.SOURCE)
    assert src.read_bytes() == backed_up["at_first"][1]

    out = cloud.tmp / "disk0.raw"
    r = cloud.run("export", str(backed_up["second"]), "0", "-o", str(out), capsys=capsys)
    assert r.code == 0, r.err
    assert out.read_bytes() == backed_up["at_second"][0]

    r = cloud.run("restore-disk", str(backed_up["first"]), "9", capsys=capsys)
    assert r.code == 6 and "no disk 9" in r.err
    r = cloud.run("restore-disk", str(backed_up["first"]), "2", capsys=capsys)
    assert r.code == 2 and "excluded" in r.err
    assert cloud.leftovers() == []


def test_restore_refuses_a_taken_name_before_creating_anything(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], backed_up: dict) -> None:
    cloud.image("clash-disk0", b"\0" * BLOCK)
    r = cloud.run("restore", str(backed_up["second"]), "--name", "clash", capsys=capsys)
    assert r.code == 2 and "clash-disk0" in r.err
    r = cloud.run("restore", str(backed_up["second"]), "--system-ds", "1", capsys=capsys)
    assert r.code == 2 and "not a SYSTEM datastore" in r.err
