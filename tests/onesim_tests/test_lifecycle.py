"""The state machine: transient states seen through the API and the event
bus, history records, version-dependent behaviour, image and datastore
bookkeeping."""

from __future__ import annotations

from typing import Any

import pytest

from tests.onesim import Simulator
from tests.onesim.testing import (
    Subscription,
    client,
    create_datablock,
    create_image,
    create_vm,
    wait_image,
    wait_vm,
)


def vm_keys(sub: Subscription, vid: int, until: str) -> list[str]:
    keys = [k for k, _ in sub.collect(until=until, timeout=5)]
    return [k.split("/", 1)[1].strip() for k in keys if k.startswith(f"EVENT VM {vid}/")]


@pytest.fixture
def slow(tmp_path: Any) -> Any:
    """A simulator whose driver phases last long enough to be observed."""
    sim = Simulator.start(tmp_path / "sim", delay=0.3)
    yield sim
    sim.stop()


def test_instantiate_goes_pending_prolog_boot_running(one: Any, onesim: Simulator) -> None:
    sub = Subscription(onesim.events, ("EVENT VM ",))
    try:
        vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}], wait_running=False)
        assert vm_keys(sub, vid, f"EVENT VM {vid}/ACTIVE/RUNNING ") == [
            "PENDING/LCM_INIT", "ACTIVE/LCM_INIT", "ACTIVE/PROLOG", "ACTIVE/BOOT",
            "ACTIVE/RUNNING"]
    finally:
        sub.close()
    vm = one.vm.info(vid)
    h = vm.HISTORY_RECORDS.HISTORY[0]
    assert (h.SEQ, h.HID, h.DS_ID, h.HOSTNAME, h.VM_MAD, h.TM_MAD) == (0, 0, 0, "localhost",
                                                                    "kvm", "local")
    assert h.PSTIME > 0 and h.PETIME >= h.PSTIME and h.RSTIME > 0 and h.ACTION == 0
    assert vm.DEPLOY_ID == f"one-{vid}"


def test_calls_return_before_the_driver_finishes(one: Any, slow: Simulator) -> None:
    one = client(slow)
    vid = create_vm(one, slow, "vm", [{"TYPE": "fs", "SIZE": 1}], timeout=20)
    iid = create_image(one, slow, "img", b"x" * 1000)
    one.vm.attach(vid, f'DISK=[IMAGE_ID="{iid}"]')
    vm = one.vm.info(vid)
    assert (vm.STATE, vm.LCM_STATE) == (3, 17)  # ACTIVE/HOTPLUG
    assert [d for d in vm.TEMPLATE["DISK"] if d.get("ATTACH") == "YES"]
    vm = wait_vm(one, vid, "ACTIVE", "RUNNING")
    assert not [d for d in vm.TEMPLATE["DISK"] if d.get("ATTACH") == "YES"]
    snap = one.vm.disksnapshotcreate(vid, 2, "s")
    vm = one.vm.info(vid)
    assert vm.LCM_STATE == 57  # DISK_SNAPSHOT
    disk = [d for d in vm.TEMPLATE["DISK"] if d["DISK_ID"] == "2"][0]
    assert disk["DISK_SNAPSHOT_ACTIVE"] == "YES" and disk["DISK_SNAPSHOT_ID"] == str(snap)
    assert vm.SNAPSHOTS[0].SNAPSHOT[0].ID == snap  # listed before it exists
    assert vm.SNAPSHOTS[0].SNAPSHOT[0].ACTIVE is None
    vm = wait_vm(one, vid, "ACTIVE", "RUNNING")
    assert vm.SNAPSHOTS[0].SNAPSHOT[0].ACTIVE == "YES"
    new = one.vm.disksaveas(vid, 2, "saved", "", snap)
    assert one.vm.info(vid).LCM_STATE == 26  # HOTPLUG_SAVEAS
    img = one.image.info(new)
    assert img.STATE == 4 and img.TEMPLATE["SAVE_AS_HOT"] == "YES"
    img = wait_image(one, new, "READY")
    assert "SAVE_AS_HOT" not in img.TEMPLATE and img.TEMPLATE["SAVED_VM_ID"] == str(vid)


def test_power_cycle_states_and_history(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    sub = Subscription(onesim.events, (f"EVENT VM {vid}/",))
    try:
        one.vm.action("suspend", vid)
        wait_vm(one, vid, "SUSPENDED")
        one.vm.action("resume", vid)
        wait_vm(one, vid, "ACTIVE", "RUNNING")
        one.vm.action("poweroff", vid)
        wait_vm(one, vid, "POWEROFF")
        one.vm.action("resume", vid)
        wait_vm(one, vid, "ACTIVE", "RUNNING")
        one.vm.action("terminate", vid)
        wait_vm(one, vid, "DONE")
        keys = vm_keys(sub, vid, f"EVENT VM {vid}/DONE/LCM_INIT ")
    finally:
        sub.close()
    assert keys == ["ACTIVE/SAVE_SUSPEND", "SUSPENDED/LCM_INIT", "ACTIVE/BOOT_SUSPENDED",
                    "ACTIVE/RUNNING", "ACTIVE/SHUTDOWN_POWEROFF", "POWEROFF/LCM_INIT",
                    "ACTIVE/BOOT_POWEROFF", "ACTIVE/RUNNING", "ACTIVE/SHUTDOWN",
                    "ACTIVE/EPILOG", "DONE/LCM_INIT"]
    history = one.vm.info(vid).HISTORY_RECORDS.HISTORY
    # resume from SUSPENDED and from POWEROFF each start a new record
    assert [h.SEQ for h in history] == [0, 1, 2]
    assert [h.ACTION for h in history] == [10, 19, 27]  # suspend, poweroff, terminate
    assert all(h.ETIME > 0 for h in history)


def test_done_vms_stay_in_the_pool(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.action("terminate-hard", vid)
    wait_vm(one, vid, "DONE")
    assert [v.ID for v in one.vmpool.info(-2, -1, -1, -2).VM] == [vid]
    assert one.vmpool.info(-2, -1, -1, -1).VM == []
    assert one.vm.info(vid).STATE == 6


def test_hold_release_and_deploy_to_a_chosen_system_datastore(one: Any,
                                                             onesim: Simulator) -> None:
    ds = one.datastore.allocate('NAME="sys2"\nTYPE="SYSTEM_DS"\nTM_MAD="local"', -1)
    tid = one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="32"\nDISK=[TYPE="fs", SIZE="1"]')
    vid = one.template.instantiate(tid, "held", True, "", False)
    vm = one.vm.info(vid)
    assert vm.STATE == 2 and vm.TEMPLATE["SUBMIT_ON_HOLD"] == "YES"
    one.vm.deploy(vid, 0, False, ds)
    vm = wait_vm(one, vid, "ACTIVE", "RUNNING")
    assert vm.HISTORY_RECORDS.HISTORY[0].DS_ID == ds
    assert (onesim.root / "datastores" / str(ds) / str(vid) / "disk.0").exists()
    vid2 = one.template.instantiate(tid, "held2", True, "", False)
    one.vm.action("release", vid2)
    assert one.vm.info(vid2).STATE == 1
    wait_vm(one, vid2, "ACTIVE", "RUNNING")
    with pytest.raises(Exception, match="Deploy action is not available for state RUNNING"):
        one.vm.deploy(vid2, 0, False, -1)


@pytest.mark.parametrize("version, accepted", [("6.6.2", True), ("6.6.3", False),
                                               ("6.8.0", False), ("6.10.0", False),
                                               ("7.4.0", False)])
def test_revert_while_suspended_depends_on_version(tmp_path: Any, version: str,
                                                   accepted: bool) -> None:
    """OpenNebula accepted a disk-snapshot revert in SUSPENDED up to 6.6.2
    (DISK_SNAPSHOT_REVERT_SUSPENDED, 55); 6.6.3 and 6.8.0 on refuse it."""
    sim = Simulator.start(tmp_path / "sim", delay=0.01, version=version)
    try:
        one = client(sim)
        assert one.system.version() == version
        iid = create_datablock(one, "d", 1)
        vid = create_vm(one, sim, "vm", [iid])
        sid = one.vm.disksnapshotcreate(vid, 0, "s")
        wait_vm(one, vid, "ACTIVE", "RUNNING")
        one.vm.action("suspend", vid)
        wait_vm(one, vid, "SUSPENDED")
        if accepted:
            sub = Subscription(sim.events, (f"EVENT VM {vid}/",))
            try:
                one.vm.disksnapshotrevert(vid, 0, sid)
                keys = vm_keys(sub, vid, f"EVENT VM {vid}/SUSPENDED/LCM_INIT ")
            finally:
                sub.close()
            assert keys == ["ACTIVE/DISK_SNAPSHOT_REVERT_SUSPENDED", "SUSPENDED/LCM_INIT"]
        else:
            with pytest.raises(Exception, match=f"Could not revert to disk snapshot for VM {vid},"
                                                " wrong state SUSPENDED."):
                one.vm.disksnapshotrevert(vid, 0, sid)
    finally:
        sim.stop()


def test_image_running_vms_and_datastore_capacity(one: Any, onesim: Simulator) -> None:
    before = one.datastore.info(1)
    iid = create_datablock(one, "d", 10)
    after = one.datastore.info(1)
    assert after.USED_MB == before.USED_MB + 10 and after.FREE_MB == before.FREE_MB - 10
    assert after.IMAGES.ID == [iid]
    a = create_vm(one, onesim, "a", [iid])
    b = create_vm(one, onesim, "b", [iid])
    img = one.image.info(iid)
    assert (img.STATE, img.RUNNING_VMS, img.VMS.ID) == (2, 2, [a, b])
    assert one.datastore.info(0).USED_MB == 20  # two clones of 10 MB
    one.vm.action("terminate-hard", a)
    wait_vm(one, a, "DONE")
    img = one.image.info(iid)
    assert (img.STATE, img.RUNNING_VMS, img.VMS.ID) == (2, 1, [b])
    onesim.set_datastore_capacity(1, after.USED_MB + 5)
    with pytest.raises(Exception, match=r"\[one.image.allocate\] Not enough space in datastore"):
        create_datablock(one, "big", 6)


def test_persistent_image_is_used_by_one_vm_only(one: Any, onesim: Simulator) -> None:
    iid = create_datablock(one, "p", 1, persistent=True)
    create_vm(one, onesim, "a", [iid])
    assert one.image.info(iid).STATE == 8  # USED_PERS
    with pytest.raises(Exception, match="Cannot acquire image 0, it is persistent and already "
                                        "in use"):
        create_vm(one, onesim, "b", [iid])


def test_vm_waits_in_cloning_while_its_image_is_locked(one: Any, onesim: Simulator) -> None:
    onesim.faults.hold_image(0)
    iid = create_datablock(one, "slow", 1, wait=False)
    vid = create_vm(one, onesim, "vm", [iid], wait_running=False)
    vm = one.vm.info(vid)
    assert vm.STATE == 10 and vm.TEMPLATE["DISK"]["CLONING"] == "YES"
    assert one.image.info(iid).STATE == 9  # LOCKED_USED
    onesim.faults.release_image(iid)
    wait_vm(one, vid, "ACTIVE", "RUNNING")
    assert one.image.info(iid).STATE == 2


def test_resched_flag_and_reboot(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [])
    one.vm.action("resched", vid)
    assert one.vm.info(vid).RESCHED == 1
    one.vm.action("reboot", vid)
    assert one.vm.info(vid).RESCHED == 0
    one.vm.action("poweroff-hard", vid)
    wait_vm(one, vid, "POWEROFF")
    with pytest.raises(Exception, match='Error performing action "reboot": This action is not '
                                        "available for state POWEROFF"):
        one.vm.action("reboot", vid)


def test_undeploy_stop_and_back(one: Any, onesim: Simulator) -> None:
    vid = create_vm(one, onesim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.action("undeploy", vid)
    wait_vm(one, vid, "UNDEPLOYED")
    one.vm.action("resume", vid)
    vm = wait_vm(one, vid, "ACTIVE", "RUNNING")
    assert len(vm.HISTORY_RECORDS.HISTORY) == 2
    one.vm.action("stop", vid)
    wait_vm(one, vid, "STOPPED")
    one.vm.action("resume", vid)
    wait_vm(one, vid, "ACTIVE", "RUNNING")
