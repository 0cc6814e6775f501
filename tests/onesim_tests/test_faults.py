"""Faults on demand, and the way oned shows each one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyone
import pytest

from tests.onesim import Simulator
from tests.onesim.constants import ErrorCode
from tests.onesim.testing import (
    Subscription,
    create_datablock,
    create_image,
    create_proxy_vm,
    create_vm,
    decode,
    guest_dev_dir,
    wait_image,
    wait_vm,
)


def test_fail_call_answers_like_oned_and_counts_down(one: Any, onesim: Simulator) -> None:
    onesim.faults.fail_call("one.vm.attach", "Cannot attach: busy", ErrorCode.ACTION, count=2)
    for _ in range(2):
        with pytest.raises(pyone.OneActionException, match=r"^\[one.vm.attach\] Cannot "
                                                            "attach: busy$"):
            one.vm.attach(0, 'DISK=[TYPE="fs", SIZE="1"]')
    with pytest.raises(pyone.OneNoExistsException):  # the real answer again
        one.vm.attach(0, 'DISK=[TYPE="fs", SIZE="1"]')


def test_delay_call(one: Any, onesim: Simulator) -> None:
    onesim.faults.delay_call("one.system.version", 1.0, count=1)
    start = time.monotonic()
    one.system.version()
    assert time.monotonic() - start >= 1.0
    start = time.monotonic()
    one.system.version()
    assert time.monotonic() - start < 1.0


def test_failed_attach_drops_the_disk_and_sets_error(one: Any, onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    iid = create_datablock(one, "d", 1)
    onesim.faults.fail_driver("attach", message="could not hot-plug")
    one.vm.attach(proxy, f'DISK=[IMAGE_ID="{iid}", SERIAL="s1"]')
    vm = wait_vm(one, proxy, "ACTIVE", "RUNNING")
    assert [d["DISK_ID"] for d in (vm.TEMPLATE["DISK"] if isinstance(vm.TEMPLATE["DISK"], list)
                                   else [vm.TEMPLATE["DISK"]])] == ["0"]
    assert vm.USER_TEMPLATE["ERROR"].endswith(": ATTACHDISK: could not hot-plug")
    assert one.image.info(iid).STATE == 1 and one.image.info(iid).RUNNING_VMS == 0
    assert not (guest_dev_dir(onesim, proxy) / "disk" / "by-id" / "scsi-0QEMU_QEMU_HARDDISK_s1"
                ).exists()


def test_failed_snapshot_disappears_and_sets_error(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [create_datablock(one, "d", 1)])
    onesim.faults.fail_driver("snapshot_create", vm_id=vid, message="dummy-snap")
    onesim.faults.slow_driver("snapshot_create", 0.5)  # to look at it while it runs
    sid = one.vm.disksnapshotcreate(vid, 0, "doomed")
    assert one.vm.info(vid).SNAPSHOTS[0].SNAPSHOT[0].ID == sid
    vm = wait_vm(one, vid, "ACTIVE", "RUNNING")
    assert vm.SNAPSHOTS[0].SNAPSHOT == [] and vm.SNAPSHOTS[0].NEXT_SNAPSHOT == sid + 1
    assert vm.USER_TEMPLATE["ERROR"].endswith(": DISKSNAPSHOTCREATE: dummy-snap")
    disk = vm.TEMPLATE["DISK"]
    assert "DISK_SNAPSHOT_ACTIVE" not in disk and disk["DISK_SNAPSHOT_TOTAL_SIZE"] == "0"


def test_failed_detach_leaves_the_disk(one: Any, onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    iid = create_datablock(one, "d", 1)
    one.vm.attach(proxy, f'DISK=[IMAGE_ID="{iid}", DEV_PREFIX="vd"]')
    wait_vm(one, proxy, "ACTIVE", "RUNNING")
    onesim.faults.fail_driver("detach", disk_id=2, message="-")
    one.vm.detach(proxy, 2)
    vm = wait_vm(one, proxy, "ACTIVE", "RUNNING")
    assert [d["DISK_ID"] for d in vm.TEMPLATE["DISK"]] == ["0", "2"]
    assert "ATTACH" not in vm.TEMPLATE["DISK"][1] and "ERROR" not in vm.USER_TEMPLATE
    assert (guest_dev_dir(onesim, proxy) / "vdb").exists()
    one.vm.detach(proxy, 2)
    vm = wait_vm(one, proxy, "ACTIVE", "RUNNING")
    assert vm.TEMPLATE["DISK"]["DISK_ID"] == "0"


def test_failed_saveas_puts_the_image_in_error(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [create_datablock(one, "d", 1)])
    onesim.faults.fail_driver("saveas", message="cpds failed")
    new = one.vm.disksaveas(vid, 0, "saved", "", -1)
    img = wait_image(one, new, "ERROR")
    vm = wait_vm(one, vid, "ACTIVE", "RUNNING")
    assert "HOTPLUG_SAVE_AS_ACTIVE" not in vm.TEMPLATE["DISK"]
    assert vm.USER_TEMPLATE["ERROR"].endswith(": Error executing image transfer script: "
                                              "cpds failed")
    assert img.STATE == 5


def test_failed_revert_goes_back_to_poweroff_with_error(one: Any, onesim: Simulator) -> None:
    data = b"original" * 1000
    vid = create_vm(one, onesim, "vm", [create_image(one, onesim, "i", data)])
    sid = one.vm.disksnapshotcreate(vid, 0, "s")
    wait_vm(one, vid, "ACTIVE", "RUNNING")
    one.vm.action("poweroff", vid)
    wait_vm(one, vid, "POWEROFF")
    onesim.faults.fail_driver("snapshot_revert", message="revert failed")
    one.vm.disksnapshotrevert(vid, 0, sid)
    vm = wait_vm(one, vid, "POWEROFF")
    assert vm.USER_TEMPLATE["ERROR"].endswith(": Error executing image transfer script: "
                                              "revert failed")


def test_driver_faults_can_target_one_vm(one: Any, onesim: Simulator) -> None:
    a = create_vm(one, onesim, "a", [create_datablock(one, "a", 1)])
    b = create_vm(one, onesim, "b", [create_datablock(one, "b", 1)])
    onesim.faults.fail_driver("snapshot_create", vm_id=b, count=None)
    one.vm.disksnapshotcreate(a, 0, "ok")
    one.vm.disksnapshotcreate(b, 0, "fails")
    assert wait_vm(one, a, "ACTIVE", "RUNNING").SNAPSHOTS[0].SNAPSHOT[0].NAME == "ok"
    assert wait_vm(one, b, "ACTIVE", "RUNNING").SNAPSHOTS[0].SNAPSHOT == []


def test_slow_driver_keeps_the_transient_state(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [create_datablock(one, "d", 1)])
    onesim.faults.slow_driver("snapshot_create", 0.8)
    one.vm.disksnapshotcreate(vid, 0, "slow")
    assert one.vm.info(vid).LCM_STATE == 57
    with pytest.raises(pyone.OneActionException, match="wrong state DISK_SNAPSHOT"):
        one.vm.disksnapshotcreate(vid, 0, "concurrent")
    with pytest.raises(pyone.OneInternalException,
                       match="VM has to be RUNNING, POWEROFF or SUSPENDED to save disks."):
        one.vm.disksaveas(vid, 0, "busy", "", -1)
    wait_vm(one, vid, "ACTIVE", "RUNNING")


def test_held_image_stays_locked_and_cannot_be_attached(one: Any, onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    onesim.faults.hold_image(1)  # the next image
    iid = create_datablock(one, "held", 1, wait=False)
    assert iid == 1
    time.sleep(0.1)
    assert one.image.info(iid).STATE == 4
    with pytest.raises(pyone.OneActionException, match="Cannot acquire image 1, it is locked"):
        one.vm.attach(proxy, f'DISK=[IMAGE_ID="{iid}"]')
    onesim.faults.release_image(iid)
    wait_image(one, iid, "READY")


def test_image_to_error(one: Any, onesim: Simulator) -> None:
    iid = create_datablock(one, "d", 1)
    onesim.image_to_error(iid, "disk on fire")
    img = one.image.info(iid)
    assert img.STATE == 5 and img.TEMPLATE["ERROR"].endswith(": disk on fire")
    with pytest.raises(pyone.OneException, match="it is in state: ERROR"):
        create_vm(one, onesim, "vm", [iid])


def test_failed_image_copy(one: Any, onesim: Simulator) -> None:
    onesim.faults.fail_driver("image", message="no space left")
    iid = create_image(one, onesim, "broken", b"x" * 100, wait=False)
    img = wait_image(one, iid, "ERROR")
    assert img.TEMPLATE["ERROR"].endswith("Error copying image in the datastore: no space left")


def test_restricted_dirs_refuse_paths_outside_safe_dirs(one: Any, onesim: Simulator,
                                                      tmp_path: Path) -> None:
    outside = Path("/etc/hostname")
    if not outside.exists():
        pytest.skip("no /etc/hostname")
    iid = create_image(one, onesim, "etc", outside, wait=False)
    img = wait_image(one, iid, "ERROR")
    assert "Not allowed to copy image file /etc/hostname" in img.TEMPLATE["ERROR"]


def test_dropped_and_garbled_events(one: Any, onesim: Simulator) -> None:
    sub = Subscription(onesim.events, ("EVENT API ",))
    try:
        onesim.faults.drop_events(count=1, prefix="EVENT API one.system.version")
        onesim.faults.garble_events(count=1, prefix="EVENT API one.template.allocate")
        one.system.version()
        one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="8"')
        one.system.version()
        msgs = sub.collect(until="EVENT API one.system.version 1", timeout=3)
    finally:
        sub.close()
    assert [k for k, _ in msgs] == ["EVENT API one.template.allocate 1",
                                    "EVENT API one.system.version 1"]
    with pytest.raises(ValueError):
        decode(msgs[0][1])
    assert "<CALL>one.system.version</CALL>" in decode(msgs[1][1])
