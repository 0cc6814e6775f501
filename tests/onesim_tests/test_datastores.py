"""Datastores as oned keeps them: TM_MAD_CONF applied on allocate and on
one.datastore.update (Datastore::set_tm_mad / post_update_template), image
FORMAT from the datastore's DRIVER (Image::insert, the fs driver's cp), and
what that means for disk snapshots (VirtualMachineDisk::allow_orphans,
Snapshots::test_delete)."""

from __future__ import annotations

from typing import Any

import pyone
import pytest

from tests.onesim import Simulator
from tests.onesim.testing import (
    create_datablock,
    create_image,
    create_vm,
    wait_until,
    wait_vm,
)


def disks(vm: Any) -> list[dict[str, str]]:
    value = vm.TEMPLATE.get("DISK", [])
    return value if isinstance(value, list) else [value]


def ds_template(one: Any, ds: int) -> dict[str, Any]:
    return dict(one.datastore.info(ds).TEMPLATE)


def snapshot(one: Any, vid: int, disk: int, name: str) -> int:
    snap = int(one.vm.disksnapshotcreate(vid, disk, name))
    wait_until(lambda: one.vm.info(vid).LCM_STATE == 3, 10)
    return snap


@pytest.mark.parametrize(("tm_mad", "orphans"), [
    ("shared", "FORMAT"), ("qcow2", "FORMAT"), ("local", "FORMAT"), ("ssh", "YES"),
    ("ceph", "mixed"), ("fs_lvm", "NO"), ("netapp", "LINEAR"), ("dummy", "NO")])
def test_allocate_applies_the_drivers_tm_mad_conf(one: Any, tm_mad: str, orphans: str) -> None:
    # the template's own ALLOW_ORPHANS loses: set_tm_mad replaces it
    ds = one.datastore.allocate(f'NAME="i-{tm_mad}"\nTYPE="IMAGE_DS"\nDS_MAD="fs"\n'
                                f'TM_MAD="{tm_mad}"\nALLOW_ORPHANS="YES"\nSHARED="YES"', -1)
    t = ds_template(one, ds)
    assert t["ALLOW_ORPHANS"] == orphans
    assert t["TM_MAD"] == tm_mad and "SHARED" not in t
    assert t["PERSISTENT_SNAPSHOTS"] == "YES"
    if tm_mad == "qcow2":
        assert (t["DRIVER"], t["LN_TARGET"], t["TM_MAD_SYSTEM"]) == ("qcow2", "NONE", "ssh")
    if tm_mad == "shared":
        assert "DRIVER" not in t


def test_allocate_refuses_an_unknown_tm_mad(one: Any) -> None:
    with pytest.raises(pyone.OneException, match='TM_MAD named "nfs" is not defined in oned.conf'):
        one.datastore.allocate('NAME="x"\nTYPE="IMAGE_DS"\nDS_MAD="fs"\nTM_MAD="nfs"', -1)
    with pytest.raises(pyone.OneException, match="No TM_MAD in template"):
        one.datastore.allocate('NAME="x"\nTYPE="IMAGE_DS"\nDS_MAD="fs"', -1)


def test_update_of_tm_mad_takes_effect_for_new_images_and_disks(
        one: Any, onesim: Simulator) -> None:
    old_image = create_datablock(one, "before", 1, persistent=True)
    before = create_vm(one, onesim, "before", [old_image])
    assert one.image.info(old_image).FORMAT == "raw"

    assert one.datastore.update(1, 'TM_MAD="qcow2"', 1) == 1
    info = one.datastore.info(1)
    assert info.TM_MAD == "qcow2"
    t = dict(info.TEMPLATE)
    assert (t["DRIVER"], t["ALLOW_ORPHANS"], t["LN_TARGET"], t["DS_MAD"]) == (
        "qcow2", "FORMAT", "NONE", "fs")

    # new images: the DS driver is forced on empty ones, the cp converts PATH ones
    empty = create_datablock(one, "empty", 1, persistent=True)   # asks FORMAT="raw"
    assert one.image.info(empty).FORMAT == "qcow2"
    assert one.image.info(empty).TEMPLATE["DRIVER"] == "qcow2"
    copied = create_image(one, onesim, "copied", b"\1" * 4096, persistent=True)
    assert one.image.info(copied).FORMAT == "qcow2"

    # a disk already on a VM keeps what it had; a new disk gets the new TM
    assert disks(one.vm.info(before))[0]["TM_MAD"] == "local"
    after = create_vm(one, onesim, "after", [empty])
    disk = disks(one.vm.info(after))[0]
    assert (disk["TM_MAD"], disk["FORMAT"], disk["DRIVER"], disk["ALLOW_ORPHANS"]) == (
        "qcow2", "qcow2", "qcow2", "FORMAT")

    # FORMAT=qcow2 under ALLOW_ORPHANS=FORMAT is NO: snapshot 0 of a
    # persistent disk can never be deleted, later ones can
    s0 = snapshot(one, after, 0, "first")
    s1 = snapshot(one, after, 0, "second")
    vm = one.vm.info(after)
    assert vm.SNAPSHOTS[0].ALLOW_ORPHANS == "NO"
    assert (s0, s1) == (0, 1)
    with pytest.raises(pyone.OneActionException,
                       match="Cannot delete snapshot 0 for persistent disk images"):
        one.vm.disksnapshotdelete(after, 0, 0)
    one.vm.disksnapshotdelete(after, 0, 1)
    wait_until(lambda: len(one.vm.info(after).SNAPSHOTS[0].SNAPSHOT) == 1, 10)

    # the raw disk of the first VM (FORMAT=raw, YES) lets snapshot 0 go
    b0 = snapshot(one, before, 0, "raw")
    assert one.vm.info(before).SNAPSHOTS[0].ALLOW_ORPHANS == "YES"
    one.vm.disksnapshotdelete(before, 0, b0)
    wait_vm(one, before, "ACTIVE", "RUNNING")


def test_shared_tm_keeps_raw_images_and_detects_qcow2_files(one: Any, onesim: Simulator) -> None:
    one.datastore.update(1, 'TM_MAD="shared"', 1)
    raw = create_image(one, onesim, "raw", b"\0" * 4096, persistent=True)
    qcow = create_image(one, onesim, "q", b"QFI\xfb" + b"\0" * 4092, persistent=True)
    assert one.image.info(raw).FORMAT == "raw"
    assert one.image.info(qcow).FORMAT == "qcow2"   # qemu-img info, no DRIVER to convert to
    vid = create_vm(one, onesim, "vm", [raw, qcow])
    snapshot(one, vid, 0, "a")
    snapshot(one, vid, 1, "b")
    modes = {int(s.DISK_ID): s.ALLOW_ORPHANS for s in one.vm.info(vid).SNAPSHOTS}
    assert modes == {0: "YES", 1: "NO"}
    one.vm.disksnapshotdelete(vid, 0, 0)
    wait_vm(one, vid, "ACTIVE", "RUNNING")
    with pytest.raises(pyone.OneActionException, match="Cannot delete snapshot 0"):
        one.vm.disksnapshotdelete(vid, 1, 0)


def test_dummy_tm_refuses_snapshot_0_of_every_persistent_disk(
        one: Any, onesim: Simulator) -> None:
    one.datastore.update(1, 'TM_MAD="dummy"', 1)
    assert "DRIVER" not in ds_template(one, 1)
    raw = create_datablock(one, "raw", 1, persistent=True)
    assert one.image.info(raw).FORMAT == "raw"
    vid = create_vm(one, onesim, "vm", [raw])
    snapshot(one, vid, 0, "a")
    assert one.vm.info(vid).SNAPSHOTS[0].ALLOW_ORPHANS == "NO"
    with pytest.raises(pyone.OneActionException, match="Cannot delete snapshot 0"):
        one.vm.disksnapshotdelete(vid, 0, 0)


def test_replace_update_keeps_type_and_ds_mad_and_rolls_back_on_error(one: Any) -> None:
    one.datastore.update(1, 'TM_MAD="ssh"\nNOTE="mine"', 0)
    t = ds_template(one, 1)
    assert (t["TM_MAD"], t["TYPE"], t["DS_MAD"], t["NOTE"]) == ("ssh", "IMAGE_DS", "fs", "mine")
    assert t["ALLOW_ORPHANS"] == "YES" and "SAFE_DIRS" not in t
    # no TM_MAD in a replace: the datastore's stays
    one.datastore.update(1, 'NOTE="again"', 0)
    assert ds_template(one, 1)["TM_MAD"] == "ssh"
    with pytest.raises(pyone.OneInternalException,
                       match=r'Cannot update template. TM_MAD named "nope" is not defined'):
        one.datastore.update(1, 'TM_MAD="nope"', 1)
    info = one.datastore.info(1)
    assert info.TM_MAD == "ssh" and dict(info.TEMPLATE)["NOTE"] == "again"
    with pytest.raises(pyone.OneException, match="Wrong update type"):
        one.datastore.update(1, 'A="b"', 2)
    # the system datastore stays a system datastore
    one.datastore.update(0, 'TM_MAD="shared"\nTYPE="IMAGE_DS"', 1)
    info = one.datastore.info(0)
    assert (info.TYPE, info.TM_MAD, dict(info.TEMPLATE)["SHARED"]) == (1, "shared", "YES")
    assert "DS_MAD" not in dict(info.TEMPLATE)


def test_update_needs_manage_rights(one: Any, onesim: Simulator) -> None:
    from tests.onesim.testing import client

    one.user.allocate("bob", "pw", "core", [])
    bob = client(onesim, "bob", "pw")
    with pytest.raises(pyone.OneAuthorizationException):
        bob.datastore.update(1, 'TM_MAD="qcow2"', 1)
    assert one.datastore.info(1).TM_MAD == "local"
