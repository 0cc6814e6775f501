"""Disk operations: oned's preconditions, ids, targets and attributes."""

from __future__ import annotations

from typing import Any

import pyone
import pytest

from tests.onesim import Simulator
from tests.onesim.testing import (
    Subscription,
    create_datablock,
    create_proxy_vm,
    create_vm,
    wait_image,
    wait_vm,
)


def disks(vm: Any) -> list[dict[str, str]]:
    value = vm.TEMPLATE.get("DISK", [])
    return value if isinstance(value, list) else [value]


def test_attach_needs_a_deployed_vm_in_running_or_poweroff(one: Any, onesim: Simulator) -> None:
    tid = one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
    held = one.template.instantiate(tid, "held", True, "", False)
    with pytest.raises(pyone.OneActionException, match=r"^\[one.vm.attach\] VM is not running "
                                                       "in any host$"):
        one.vm.attach(held, 'DISK=[TYPE="fs", SIZE="1"]')
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.action("suspend", vid)
    wait_vm(one, vid, "SUSPENDED")
    with pytest.raises(pyone.OneActionException, match=rf"Could not attach a new disk to VM {vid}"
                                                       ", wrong state SUSPENDED."):
        one.vm.attach(vid, 'DISK=[TYPE="fs", SIZE="1"]')
    with pytest.raises(pyone.OneActionException, match=rf"Could not detach disk from VM {vid}, "
                                                       "wrong state SUSPENDED."):
        one.vm.detach(vid, 0)


def test_attach_in_poweroff_uses_the_tm_only_states(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.action("poweroff", vid)
    wait_vm(one, vid, "POWEROFF")
    sub = Subscription(onesim.events, (f"EVENT VM {vid}/",))
    try:
        one.vm.attach(vid, 'DISK=[TYPE="swap", SIZE="2"]')
        wait_vm(one, vid, "POWEROFF")
        one.vm.detach(vid, 2)
        wait_vm(one, vid, "POWEROFF")
        keys = [k for k, _ in sub.collect(timeout=0.5)]
    finally:
        sub.close()
    assert keys == [f"EVENT VM {vid}/ACTIVE/HOTPLUG_PROLOG_POWEROFF ",
                    f"EVENT VM {vid}/POWEROFF/LCM_INIT ",
                    f"EVENT VM {vid}/ACTIVE/HOTPLUG_EPILOG_POWEROFF ",
                    f"EVENT VM {vid}/POWEROFF/LCM_INIT "]


def test_new_disk_ids_targets_and_volatile_attributes(one: Any, onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)  # disk 0 (vda), context 1 (sda)
    one.vm.attach(proxy, 'DISK=[TYPE="fs", SIZE="3", DEV_PREFIX="vd", SERIAL="auto"]')
    vm = wait_vm(one, proxy, "ACTIVE", "RUNNING")
    new = disks(vm)[-1]
    assert (new["DISK_ID"], new["TARGET"], new["SERIAL"]) == ("2", "vdb", f"{proxy}-2")
    assert new["DATASTORE_ID"] == "0" and new["FORMAT"] == "raw" and new["TM_MAD"] == "local"
    assert "IMAGE_ID" not in new and new["SIZE"] == "3"
    with pytest.raises(pyone.OneActionException, match="Target vdb is already in use."):
        one.vm.attach(proxy, 'DISK=[TYPE="fs", SIZE="1", TARGET="vdb"]')
    assert wait_vm(one, proxy, "ACTIVE", "RUNNING") is not None
    one.vm.detach(proxy, 2)
    wait_vm(one, proxy, "ACTIVE", "RUNNING")
    one.vm.attach(proxy, 'DISK=[TYPE="fs", SIZE="1", DEV_PREFIX="vd"]')
    vm = wait_vm(one, proxy, "ACTIVE", "RUNNING")
    assert (disks(vm)[-1]["DISK_ID"], disks(vm)[-1]["TARGET"]) == ("2", "vdb")  # max + 1 again


def test_image_disk_attributes(one: Any, onesim: Simulator) -> None:
    iid = create_datablock(one, "d", 2)
    pers = create_datablock(one, "p", 1, persistent=True)
    vid = create_vm(one, onesim, "vm", [iid, pers])
    d0, d1 = disks(one.vm.info(vid))
    for key, value in {"IMAGE": "d", "IMAGE_ID": str(iid), "SIZE": "2", "ORIGINAL_SIZE": "2",
                       "CLONE": "YES", "SAVE": "NO", "READONLY": "NO", "FORMAT": "raw",
                       "DRIVER": "raw", "DATASTORE": "default", "DATASTORE_ID": "1",
                       "TM_MAD": "local", "TYPE": "FILE", "DISK_TYPE": "FILE",
                       "DEV_PREFIX": "sd", "TARGET": "sdb", "LN_TARGET": "SYSTEM",
                       "CLONE_TARGET": "SYSTEM", "IMAGE_STATE": "2"}.items():
        assert d0[key] == value, key
    assert d0["SOURCE"] == one.image.info(iid).SOURCE
    assert (d1["PERSISTENT"], d1["CLONE"], d1["SAVE"], d1["TARGET"]) == ("YES", "NO", "YES",
                                                                        "sdc")


def test_snapshot_checks_and_rename(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [create_datablock(one, "d", 1), {"TYPE": "fs",
                                                                         "SIZE": 1}])
    with pytest.raises(pyone.OneActionException, match="Cannot make snapshots on disks of "
                                                       "type: fs"):
        one.vm.disksnapshotcreate(vid, 1, "s")
    with pytest.raises(pyone.OneInternalException, match="Cannot use DISK. DISK does not have "
                                                         "a valid IMAGE_ID."):
        one.vm.disksaveas(vid, 1, "x", "", -1)
    sid = one.vm.disksnapshotcreate(vid, 0, "first")
    wait_vm(one, vid, "ACTIVE", "RUNNING")
    one.vm.disksnapshotrename(vid, 0, sid, "renamed")
    vm = one.vm.info(vid)
    assert vm.SNAPSHOTS[0].SNAPSHOT[0].NAME == "renamed"
    assert vm.SNAPSHOTS[0].ALLOW_ORPHANS == "YES"  # raw on a FORMAT datastore: no tree
    assert disks(vm)[0]["DISK_SNAPSHOT_TOTAL_SIZE"] == "1"
    with pytest.raises(pyone.OneActionException, match="Snapshot does not exist"):
        one.vm.disksnapshotrename(vid, 0, 9, "x")


def test_saveas_goes_to_the_source_images_datastore(one: Any, onesim: Simulator) -> None:
    ds = one.datastore.allocate('NAME="other"\nTYPE="IMAGE_DS"\nDS_MAD="fs"\nTM_MAD="local"', -1)
    iid = create_datablock(one, "d", 3, ds=ds)
    vid = create_vm(one, onesim, "vm", [iid])
    new = one.vm.disksaveas(vid, 0, "copy", "", -1)
    img = wait_image(one, new)
    assert (img.DATASTORE_ID, img.SIZE, img.TYPE) == (ds, 3, 2)
    assert img.TEMPLATE["SAVED_DISK_ID"] == "0" and img.TEMPLATE["SAVED_IMAGE_ID"] == str(iid)
    with pytest.raises(pyone.OneException, match=r"Error allocating a new image. NAME is "
                                                 rf"already taken by IMAGE {new}."):
        one.vm.disksaveas(vid, 0, "copy", "", -1)
    assert wait_vm(one, vid, "ACTIVE", "RUNNING").LCM_STATE == 3


def test_image_persistent_toggle_and_template_delete(one: Any, onesim: Simulator) -> None:
    iid = create_datablock(one, "d", 1)
    one.image.persistent(iid, True)
    assert one.image.info(iid).PERSISTENT == 1
    vid = create_vm(one, onesim, "vm", [iid])
    with pytest.raises(pyone.OneInternalException, match="Could not make image non-persistent: "
                                                         "Image cannot be in state USED_PERS."):
        one.image.persistent(iid, False)
    one.vm.action("terminate", vid)
    wait_vm(one, vid, "DONE")
    one.image.persistent(iid, False)
    tid = one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
    one.template.delete(tid)
    with pytest.raises(pyone.OneNoExistsException, match=r"Error getting virtual machine "
                                                          rf"template \[{tid}\]."):
        one.template.info(tid)
