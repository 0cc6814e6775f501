"""Every disk oneback attaches to the proxy VM is read as itself: two backups
at once in one agent, or in two `oneback backup` processes, each hold their
own VM's bytes, and hot-plugs on the proxy VM never collide.

Driven through the real agent process and the real CLI, pyone over HTTP to
onesim, whose guest models udev (two disks with one SERIAL: the by-id link
names the latest) and a guest that sees a hot-plugged disk only some time
after oned finished the attach (fault `slow_driver("plug")`)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.lease import hotplug_lock
from tests.agentkit import Cloud, MiB, pattern
from tests.agentproc import AgentProcess, wait_backups
from tests.onesim.constants import ErrorCode
from tests.onesim.dataplane import guest_dir
from tests.onesim.testing import wait_until

DISK = 1 * MiB  # the same size for both VMs: only the serial tells the disks apart


def export(c: Cloud, backup_id: int, disk_id: int = 0) -> bytes:
    out = c.tmp / f"export-{backup_id}-{disk_id}.raw"
    r = c.call("export", str(backup_id), str(disk_id), "-o", str(out))
    assert r.code == 0, r.err
    return out.read_bytes()


def proxy_disks(c: Cloud) -> int:
    disks = c.one.vm.info(c.proxy_id).TEMPLATE.get("DISK", [])
    return len(disks if isinstance(disks, list) else [disks])

def test_two_jobs_of_one_agent_each_back_up_their_own_disk(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """Two jobs attach at once (max_jobs 2, max_attached 2). The guest is slow
    to show the first attached disk; meanwhile the second one appears. Had
    the two attachments one serial, the first job would find the second
    disk under it and back up the other VM's bytes."""
    data = {name: pattern(DISK, seed) for name, seed in (("alpha", 11), ("beta", 12))}
    vms = {name: cloud.vm(name, [cloud.image(f"{name}-disk", content)])
           for name, content in data.items()}
    for vm in vms.values():
        cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    most = 0

    def watch() -> None:  # how many disks the proxy VM held at once
        nonlocal most
        while not done.is_set():
            most = max(most, proxy_disks(cloud))
            time.sleep(0.02)

    done = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The first disk attached appears in the guest 4 s after oned is done:
    # time for the other job to attach its disk (even on a loaded machine).
    cloud.config.write_text(cloud.config.read_text().replace("device_timeout = 5",
                                                             "device_timeout = 15"))
    cloud.sim.faults.slow_driver("plug", 4.0, count=1, vm_id=cloud.proxy_id)
    # The other job's disk then stays in the guest for a second at least (its
    # detach is slow), so the first job's wait surely sees it if it may.
    cloud.sim.faults.slow_driver("detach", 1.0, count=1, vm_id=cloud.proxy_id)
    a = agent(reconcile=60, extra="max_jobs = 2\nmax_attached = 2")
    found = {name: wait_backups(cloud, vm, 1, timeout=60) for name, vm in vms.items()}
    done.set()
    watcher.join()
    assert most >= 3, "the two attachments never overlapped (the proxy's own disk + 2)"
    for name in vms:
        assert export(cloud, found[name][0]["backup_id"]) == data[name], (
            f"the backup of VM {name} does not hold VM {name}'s disk")
    assert cloud.leftovers() == []
    assert not a.events("job.failed"), a.events("job.failed")
    assert a.stop() == 0


def test_two_backup_commands_at_once_both_succeed(cloud: Cloud) -> None:
    """Two `oneback backup` processes hot-plug into the proxy VM at the same
    moment: oned would refuse the second ("wrong state HOTPLUG") while the
    first runs, so hot-plugs are serialised across processes."""
    data = {name: pattern(DISK, seed) for name, seed in (("one", 21), ("two", 22))}
    vms = {name: cloud.vm(name, [cloud.image(f"{name}-disk", content)])
           for name, content in data.items()}
    # Both attach calls wait 2 s at oned's door, so both are in flight at once,
    # and each keeps the proxy VM in HOTPLUG for 0.5 s more.
    # The repository and catalog exist before: creating them at once is
    # another race than the one this test is about.
    assert cloud.call("list").code == 0
    cloud.sim.faults.delay_call("one.vm.attach", 2.0)
    cloud.sim.faults.slow_driver("attach", 0.5, count=None, vm_id=cloud.proxy_id)
    procs = {name: cloud.spawn("backup", str(vm), "--json") for name, vm in vms.items()}
    results = {name: p.communicate(timeout=120) for name, p in procs.items()}
    for name, p in procs.items():
        assert p.returncode == 0, f"backup of VM {name} failed: {results[name][1]}"
    for name, (out, _) in results.items():
        assert export(cloud, json.loads(out)["backup_id"]) == data[name]
    assert cloud.leftovers() == []


def test_a_hot_plug_waits_for_another_process_holding_the_proxy(cloud: Cloud) -> None:
    """The lock beside the catalog is what every oneback process takes around
    an attach or a detach on the proxy VM: while another holds it, a backup
    does not attach."""
    vm = cloud.vm("held", [cloud.image("held-disk", pattern(DISK, 31))])
    catalog = Path(cloud.tmp / "catalog.sqlite")
    with hotplug_lock(catalog, cloud.proxy_id, timeout=5):
        proc = cloud.spawn("backup", str(vm), "--json")
        time.sleep(2)   # snapshot and save-as take a fraction of that
        assert proc.poll() is None
        assert proxy_disks(cloud) == 1, "the backup attached while the lock was held"
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert export(cloud, json.loads(out)["backup_id"]) == pattern(DISK, 31)
    assert cloud.leftovers() == []


def test_a_hot_plug_lock_held_too_long_is_a_clear_error(cloud: Cloud) -> None:
    """The wait for the lock is bounded by opennebula.operation_timeout."""
    vm = cloud.vm("stuck", [cloud.image("stuck-disk", pattern(DISK, 32))])
    cloud.config.write_text(cloud.config.read_text().replace("operation_timeout = 30",
                                                             "operation_timeout = 1.5"))
    catalog = Path(cloud.tmp / "catalog.sqlite")
    with hotplug_lock(catalog, cloud.proxy_id, timeout=5):
        r = cloud.call("backup", str(vm))
    assert r.code == 4, r.err
    assert r.err.strip() == (f"oneback: another oneback process has been attaching or detaching"
                             f" a disk of VM {cloud.proxy_id} for 1.5s; try again later")
    assert cloud.leftovers() == []


def test_a_wrong_state_refusal_of_an_attach_is_retried(cloud: Cloud) -> None:
    """Something oneback does not know of (a user, another agent) runs on the
    proxy VM: oned refuses the attach and the detach with "wrong state"; both
    are tried again and the backup succeeds."""
    vm = cloud.vm("refused", [cloud.image("refused-disk", pattern(DISK, 41))])
    for method in ("one.vm.attach", "one.vm.detach"):
        cloud.sim.faults.fail_call(
            method, f"Could not {method.rsplit('.', 1)[1]} disk, wrong state HOTPLUG_SAVEAS.",
            code=ErrorCode.ACTION, count=2)
    r = cloud.call("backup", str(vm), "--json")
    assert r.code == 0, r.err
    assert export(cloud, r.json()["backup_id"]) == pattern(DISK, 41)
    assert cloud.leftovers() == []


def attached_serials(c: Cloud) -> list[str]:
    disks = c.one.vm.info(c.proxy_id).TEMPLATE.get("DISK", [])
    return [d.get("SERIAL", "") for d in (disks if isinstance(disks, list) else [disks])
            if d.get("DISK_ID") != "0" and d.get("SERIAL")]


def test_every_attachment_has_a_random_serial(cloud: Cloud) -> None:
    """`oneback-` and 12 random hex digits (virtio keeps 20 bytes), a new one
    for every attachment, not derived from the process or a counter."""
    vm = cloud.vm("serials", [cloud.image("serials-disk", pattern(DISK, 51))])
    seen: list[str] = []
    for _ in range(2):
        cloud.sim.faults.slow_driver("detach", 1.0, count=1)
        proc = cloud.spawn("backup", str(vm), "--json")
        deadline = time.monotonic() + 30
        while not (serials := attached_serials(cloud)):
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        seen += serials
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert len(seen) == 2 and seen[0] != seen[1]
    for serial in seen:
        assert len(serial) == 20 and serial.startswith("oneback-")
        int(serial.removeprefix("oneback-"), 16)
    assert cloud.leftovers() == []


def test_cleanup_spares_a_live_runs_attachment_and_removes_a_dead_ones(
        cloud: Cloud) -> None:
    """A serial names no owner: `oneback cleanup` tells a live run's
    attachment from a dead one's by the journal and by the attached image's
    `oneback-tmp-<owner>-` name."""
    vm = cloud.vm("owner", [cloud.image("owner-disk", pattern(DISK, 61))])
    # The guest shows the disk 2 s after the attach: the run waits for it.
    cloud.sim.faults.slow_driver("plug", 2.0, count=1, vm_id=cloud.proxy_id)
    live = cloud.spawn("backup", str(vm), "--json")
    deadline = time.monotonic() + 30
    while not attached_serials(cloud):
        assert time.monotonic() < deadline and live.poll() is None, live.communicate()
        time.sleep(0.02)
    r = cloud.call("cleanup", "--json")
    assert r.code == 0, r.err
    assert r.json()["removed"] == []
    out, err = live.communicate(timeout=60)
    assert live.returncode == 0, err
    assert export(cloud, json.loads(out)["backup_id"]) == pattern(DISK, 61)

    cloud.sim.faults.slow_driver("plug", 30.0, count=1, vm_id=cloud.proxy_id)
    dead = cloud.spawn("backup", str(vm), "--json")
    deadline = time.monotonic() + 30
    while not (serials := attached_serials(cloud)):
        assert time.monotonic() < deadline and dead.poll() is None, dead.communicate()
        time.sleep(0.02)
    dead.kill()
    dead.wait()
    r = cloud.call("cleanup", "--json")
    assert r.code == 0, r.err
    assert any(serials[0] in x for x in r.json()["removed"]), r.json()
    assert cloud.leftovers() == []


def test_a_disk_the_guest_still_shows_after_its_detach_is_waited_for_and_reported(
        cloud: Cloud) -> None:
    """After the detach, the backup waits until the serial is gone from the
    proxy VM (device_timeout); if it does not go, the backup says so."""
    vm = cloud.vm("lingering", [cloud.image("lingering-disk", pattern(DISK, 71))])
    cloud.config.write_text(cloud.config.read_text().replace("device_timeout = 5",
                                                             "device_timeout = 2.5"))
    cloud.sim.faults.slow_driver("unplug", 1.0, count=1, vm_id=cloud.proxy_id)
    r = cloud.call("backup", str(vm), "--json")
    assert r.code == 0, r.err
    assert r.json()["warnings"] == []
    # It waited: the guest's by-id link, 1 s late, was gone before the backup ended.
    assert cloud.leftovers() == []

    cloud.sim.faults.slow_driver("unplug", 5.0, count=1, vm_id=cloud.proxy_id)
    r = cloud.call("backup", str(vm), "--json")
    assert r.code == 0, r.err
    warnings = r.json()["warnings"]
    assert len(warnings) == 1 and "was detached, but" in warnings[0], warnings
    assert "still present in the proxy VM" in warnings[0]
    assert export(cloud, r.json()["backup_id"]) == pattern(DISK, 71)


@pytest.mark.parametrize("impostor", ["second disk", "wrong size"])
def test_a_device_that_may_not_be_the_attached_disk_is_never_read(
        cloud: Cloud, impostor: str) -> None:
    """The guest shows another device with the attached disk's serial: the
    kernel knows it (its node not made yet) when the attached disk appears,
    so two devices carry the serial; or it is the only one, and its size is
    not the image's. The backup reads nothing and fails with one clear line."""
    vm = cloud.vm("target", [cloud.image("target-disk", pattern(DISK, 81))])
    delay = 2.0 if impostor == "second disk" else 30.0
    cloud.sim.faults.slow_driver("plug", delay, count=1, vm_id=cloud.proxy_id)
    proc = cloud.spawn("backup", str(vm))
    deadline = time.monotonic() + 30
    while not (serials := attached_serials(cloud)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    guest = guest_dir(Path(cloud.sim.root), cloud.proxy_id)
    if impostor == "wrong size":
        (guest / "dev" / "vdz").write_bytes(bytes(3 * DISK))
    (guest / "sys" / "block" / "vdz").mkdir(parents=True)
    (guest / "sys" / "block" / "vdz" / "serial").write_text(serials[0] + "\n")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 10, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert serials[0] in err
    if impostor == "second disk":
        assert "2 devices carry serial" in err and "vdz" in err and "oneback cleanup" in err
    else:
        assert f"holds {3 * DISK} bytes, but the image attached with that serial has 1 MiB" \
            in err
    assert cloud.call("list", "--json").json() == []
    wait_until(lambda: cloud.leftovers() == [], timeout=10)


def test_a_refusal_that_does_not_end_is_retried_a_bounded_number_of_times(
        cloud: Cloud) -> None:
    vm = cloud.vm("forever", [cloud.image("forever-disk", pattern(DISK, 42))])
    cloud.sim.faults.fail_call("one.vm.attach", "Could not attach disk, wrong state HOTPLUG.",
                               code=ErrorCode.ACTION, count=None)
    r = cloud.call("backup", str(vm))
    assert r.code == 4, r.err
    assert "wrong state HOTPLUG. (refused 9 times while attaching image" in r.err
    assert len(r.err.strip().splitlines()) == 1
    assert cloud.leftovers() == []
