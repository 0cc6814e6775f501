"""When things happen relative to the answer, as on oned.

DispatchManager only queues poweroff, suspend, resume, terminate, undeploy,
stop and deploy for the LifeCycleManager's thread (lcm->trigger_*,
src/dm/DispatchManagerActions.cc) and answers at once, so the first vm.info
after the answer still shows the old state; the VM then moves through the
LCM's transient states (src/lcm/LifeCycleActions.cc, LifeCycleStates.cc).
Attach, disk snapshots and save-as change the state inside the request
(DispatchManager::attach / disk_snapshot_create, VirtualMachine::
set_saveas_state), so the first look after their answer shows HOTPLUG,
DISK_SNAPSHOT, HOTPLUG_SAVEAS and a LOCKED image.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
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

LCM = 0.3   # seconds between an action's answer and the LCM taking it up


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    s = Simulator.start(tmp_path / "sim", delay=0.05, lcm_delay=LCM)
    yield s
    s.stop()


def state(one: Any, vid: int) -> tuple[int, int]:
    vm = one.vm.info(vid)
    return vm.STATE, vm.LCM_STATE


def keys_until(sub: Subscription, vid: int, last: str) -> list[str]:
    got = [k for k, _ in sub.collect(until=f"EVENT VM {vid}/{last} ", timeout=5)]
    return [k.split("/", 1)[1].strip() for k in got if k.startswith(f"EVENT VM {vid}/")]


def act(one: Any, sim: Simulator, vid: int, action: str, last: str) -> tuple[tuple[int, int],
                                                                          list[str]]:
    """Run the action; the state at the first look after the answer, and the
    VM's state events up to `last`."""
    sub = Subscription(sim.events, (f"EVENT VM {vid}/",))
    try:
        one.vm.action(action, vid)
        first = state(one, vid)
        return first, keys_until(sub, vid, last)
    finally:
        sub.close()


RUNNING, POWEROFF, SUSPENDED = (3, 3), (8, 0), (5, 0)


def test_poweroff_is_answered_before_the_vm_moves(sim: Simulator) -> None:
    one = client(sim)
    vid = create_vm(one, sim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    first, keys = act(one, sim, vid, "poweroff", "POWEROFF/LCM_INIT")
    assert first == RUNNING
    assert keys == ["ACTIVE/SHUTDOWN_POWEROFF", "POWEROFF/LCM_INIT"]
    assert state(one, vid) == POWEROFF


def test_poweroff_hard_suspend_resume_and_terminate_answer_first(sim: Simulator) -> None:
    one = client(sim)
    vid = create_vm(one, sim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    first, keys = act(one, sim, vid, "poweroff-hard", "POWEROFF/LCM_INIT")
    assert (first, keys) == (RUNNING, ["ACTIVE/SHUTDOWN_POWEROFF", "POWEROFF/LCM_INIT"])
    first, keys = act(one, sim, vid, "resume", "ACTIVE/RUNNING")
    assert (first, keys) == (POWEROFF, ["ACTIVE/BOOT_POWEROFF", "ACTIVE/RUNNING"])
    first, keys = act(one, sim, vid, "suspend", "SUSPENDED/LCM_INIT")
    assert (first, keys) == (RUNNING, ["ACTIVE/SAVE_SUSPEND", "SUSPENDED/LCM_INIT"])
    first, keys = act(one, sim, vid, "resume", "ACTIVE/RUNNING")
    assert (first, keys) == (SUSPENDED, ["ACTIVE/BOOT_SUSPENDED", "ACTIVE/RUNNING"])
    first, keys = act(one, sim, vid, "terminate-hard", "DONE/LCM_INIT")
    assert (first, keys) == (RUNNING, ["ACTIVE/SHUTDOWN", "ACTIVE/EPILOG", "DONE/LCM_INIT"])


def test_a_second_action_before_the_first_moved_is_checked_against_the_old_state(
        sim: Simulator) -> None:
    """oned checks the state the VM is in, not the one it is going to: a
    resume right after a poweroff's answer is refused (still RUNNING)."""
    one = client(sim)
    vid = create_vm(one, sim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.action("poweroff-hard", vid)
    with pytest.raises(Exception, match="This action is not available for state RUNNING"):
        one.vm.action("resume", vid)
    wait_vm(one, vid, "POWEROFF")


def test_a_failed_poweroff_goes_back_to_running_with_the_error(sim: Simulator) -> None:
    one = client(sim)
    vid = create_vm(one, sim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    sim.faults.fail_driver("poweroff", message="guest ignored ACPI")
    first, keys = act(one, sim, vid, "poweroff", "ACTIVE/RUNNING")
    assert first == RUNNING
    assert keys == ["ACTIVE/SHUTDOWN_POWEROFF", "ACTIVE/RUNNING"]
    vm = one.vm.info(vid)
    assert (vm.STATE, vm.LCM_STATE) == RUNNING
    assert vm.USER_TEMPLATE["ERROR"].endswith("SHUTDOWN: guest ignored ACPI")
    assert vm.HISTORY_RECORDS.HISTORY[-1].ACTION == 0   # clear_action


def test_a_failed_resume_goes_back_to_poweroff(sim: Simulator) -> None:
    one = client(sim)
    vid = create_vm(one, sim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.action("poweroff-hard", vid)
    wait_vm(one, vid, "POWEROFF")
    sim.faults.fail_driver("resume", message="no memory")
    first, keys = act(one, sim, vid, "resume", "POWEROFF/LCM_INIT")
    assert first == POWEROFF
    assert keys == ["ACTIVE/BOOT_POWEROFF", "POWEROFF/LCM_INIT"]
    assert one.vm.info(vid).USER_TEMPLATE["ERROR"].endswith("DEPLOY: no memory")


def test_wait_idle_includes_actions_queued_for_the_lcm(sim: Simulator) -> None:
    one = client(sim)
    vid = create_vm(one, sim, "vm", [{"TYPE": "fs", "SIZE": 1}])
    one.vm.action("suspend", vid)
    assert sim.wait_idle(10)
    assert state(one, vid) == SUSPENDED


def test_deploy_is_answered_before_prolog(sim: Simulator) -> None:
    one = client(sim)
    tid = one.template.allocate('NAME="t"\nCPU="1"\nMEMORY="32"\nDISK=[TYPE="fs", SIZE="1"]')
    vid = one.template.instantiate(tid, "held", True, "", False)
    one.vm.deploy(vid, 0, False, -1)
    assert state(one, vid) == (3, 0)   # ACTIVE/LCM_INIT: DispatchManager::deploy's part
    wait_vm(one, vid, "ACTIVE", "RUNNING")


def test_attach_snapshot_and_saveas_show_their_state_on_the_first_look(
        sim: Simulator) -> None:
    one = client(sim)
    data = create_datablock(one, "d", 1)
    vid = create_vm(one, sim, "vm", [data])
    extra = create_image(one, sim, "x", b"x" * 4096)
    sim.faults.slow_driver("attach", 0.3)
    one.vm.attach(vid, f'DISK=[IMAGE_ID="{extra}"]')
    assert state(one, vid) == (3, 17)                     # HOTPLUG
    wait_vm(one, vid, "ACTIVE", "RUNNING")
    sim.faults.slow_driver("snapshot_create", 0.3)
    snap = one.vm.disksnapshotcreate(vid, 0, "s")
    assert state(one, vid) == (3, 57)                     # DISK_SNAPSHOT
    wait_vm(one, vid, "ACTIVE", "RUNNING")
    sim.faults.slow_driver("saveas", 0.3)
    new = one.vm.disksaveas(vid, 0, "copy", "", snap)
    assert state(one, vid) == (3, 26)                     # HOTPLUG_SAVEAS
    assert one.image.info(new).STATE == 4                 # LOCKED until the copy ends
    img = wait_image(one, new, "READY")
    assert img.STATE == 1
    assert state(one, vid) == RUNNING
