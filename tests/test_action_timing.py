"""VM actions are waited for until they have happened, not until the VM
looks settled.

oned answers poweroff, suspend and resume before the VM moves (the first
vm.info after the answer shows the old state); onesim does the same with an
LCM delay long enough to be seen. `oneback snapshot revert` must stop the VM,
revert, and report the state the VM really ends in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cloud import Cloud as OneCloud
from agent.errors import CloudError
from tests.agentkit import Cloud, MiB, pattern, write_config
from tests.onesim.simulator import Simulator
from tests.onesim.testing import FAST, client, create_proxy_vm, wait_vm
from tests.test_backup import write_blocks

DISK = 1 * MiB
LCM = 0.15   # seconds between an action's answer and the VM starting to move


def slow_lcm_cloud(tmp_path: Path, version: str) -> Iterator[Cloud]:
    sim = Simulator.start(tmp_path / "onesim", delay=FAST, version=version, lcm_delay=LCM)
    try:
        one = client(sim)
        proxy = create_proxy_vm(one, sim)
        work = tmp_path / "oneback"
        work.mkdir()
        yield Cloud(sim, one, proxy, write_config(work, sim, proxy), work)
    finally:
        sim.stop()


@pytest.fixture(params=["7.4.0", "6.6.2"])
def lagging(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    yield from slow_lcm_cloud(tmp_path, request.param)


@pytest.fixture
def lagging7(tmp_path: Path) -> Iterator[Cloud]:
    yield from slow_lcm_cloud(tmp_path, "7.4.0")


def states_since(c: Cloud, vm: int, mark: int) -> list[str]:
    return [k.split("/", 1)[1].strip() for k, _ in c.sim.published()[mark:]
            if k.startswith(f"EVENT VM {vm}/")]


def test_revert_of_a_running_vm_waits_for_each_action(
        lagging: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = lagging
    vm = c.vm("app", [c.image("a0", pattern(DISK, 1)), c.image("a1", pattern(DISK, 2))])
    before = {i: c.disk_path(vm, i).read_bytes() for i in (0, 1)}
    r = c.run("snapshot", "create", str(vm), "--name", "good", capsys=capsys)
    assert r.code == 0, r.err
    write_blocks(c.disk_path(vm, 0), [0, 7], seed=5)
    write_blocks(c.disk_path(vm, 1), [3], seed=5)

    mark = len(c.sim.published())
    r = c.run("snapshot", "revert", str(vm), "good", "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["state"] == "RUNNING"
    info = c.one.vm.info(vm)
    assert (info.STATE, info.LCM_STATE) == (3, 3)
    assert {i: c.disk_path(vm, i).read_bytes() for i in (0, 1)} == before
    states = states_since(c, vm, mark)
    if c.sim.version == "6.6.2":
        assert doc["stopped_as"] == "suspend"
        stopped, back = "SUSPENDED/LCM_INIT", "ACTIVE/BOOT_SUSPENDED"
    else:
        assert doc["stopped_as"] == "poweroff-hard"
        stopped, back = "POWEROFF/LCM_INIT", "ACTIVE/BOOT_POWEROFF"
    # stopped before the first revert, brought back only after the last
    assert states.index(stopped) < states.index(back)
    reverts = [i for i, s in enumerate(states) if "REVERT" in s]
    assert len(reverts) == 2
    assert states.index(stopped) < reverts[0] and reverts[-1] < states.index(back)
    assert states[-1] == "ACTIVE/RUNNING"


def test_a_failed_poweroff_is_reported_and_nothing_is_reverted(
        lagging7: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = lagging7
    vm = c.vm("app", [c.image("a0", pattern(DISK, 1))])
    assert c.run("snapshot", "create", str(vm), "--name", "good", capsys=capsys).code == 0
    write_blocks(c.disk_path(vm, 0), [2], seed=6)
    changed = c.disk_path(vm, 0).read_bytes()
    c.sim.faults.fail_driver("poweroff", vm_id=vm, message="the hypervisor refused")
    r = c.run("snapshot", "revert", str(vm), "good", capsys=capsys)
    assert r.code != 0
    assert "Traceback" not in r.err and "internal error" not in r.err
    assert "poweroff-hard" in r.err and "the hypervisor refused" in r.err
    assert "nothing was reverted" in r.err
    assert c.disk_path(vm, 0).read_bytes() == changed
    wait_vm(c.one, vm, "ACTIVE", "RUNNING")


def test_a_failed_resume_after_the_revert_is_reported(
        lagging7: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = lagging7
    vm = c.vm("app", [c.image("a0", pattern(DISK, 1))])
    before = c.disk_path(vm, 0).read_bytes()
    assert c.run("snapshot", "create", str(vm), "--name", "good", capsys=capsys).code == 0
    write_blocks(c.disk_path(vm, 0), [2], seed=6)
    c.sim.faults.fail_driver("resume", vm_id=vm, message="no memory on the host")
    r = c.run("snapshot", "revert", str(vm), "good", capsys=capsys)
    assert r.code != 0
    assert "no memory on the host" in r.err and f"onevm resume {vm}" in r.err
    assert c.disk_path(vm, 0).read_bytes() == before   # the revert itself happened
    info = c.one.vm.info(vm)
    assert info.STATE == 8   # left in POWEROFF, as oned left it


def test_action_returns_the_target_state_or_raises(lagging7: Cloud) -> None:
    """Cloud.action against onesim over HTTP: each action's target, and a
    failure the driver reports without a message (no ERROR) is noticed
    once the VM has not moved for `start_timeout`."""
    c = lagging7
    vm = c.vm("app", [{"TYPE": "fs", "SIZE": 1}])
    cloud = OneCloud(c.sim.endpoint, c.sim.credentials, poll_interval=0.01,
                     operation_timeout=20, start_timeout=1.0)
    assert cloud.action("suspend", vm).state_name == "SUSPENDED"
    assert cloud.action("resume", vm).state_name == "RUNNING"
    assert cloud.action("poweroff", vm).state_name == "POWEROFF"
    assert cloud.action("resume", vm).state_name == "RUNNING"
    c.sim.faults.fail_driver("suspend", vm_id=vm, message="-")
    with pytest.raises(CloudError, match="suspend"):
        cloud.action("suspend", vm)
    assert c.one.vm.info(vm).LCM_STATE == 3
    assert cloud.action("terminate-hard", vm).state_name == "DONE"
