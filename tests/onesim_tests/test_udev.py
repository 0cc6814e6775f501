"""The simulated guest's kernel and udev: what a guest shows of hot-plugged
disks under `sys/block` and `dev/disk/by-id`, driven through oned's API
(one.vm.attach / one.vm.detach over XML-RPC).

Two disks with one SERIAL both exist for the kernel; udev's by-id link names
the one added last, moves back to the other when that one goes, and stays
when the older one goes (systemd udev-node.c link_update: every device
wanting a link records a claim; of equal priority the device being added
wins; on removal the link goes to a remaining claimant)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from tests.onesim import Simulator, dataplane
from tests.onesim.testing import (
    create_image,
    create_proxy_vm,
    guest_dev_dir,
    wait_until,
    wait_vm,
)

MIB = 1024 * 1024
SERIAL = "oneback-sameserial-0"  # 20 bytes: whole in virtio's serial


def attach(one: Any, vm: int, image: int, serial: str = SERIAL, prefix: str = "vd") -> int:
    one.vm.attach(vm, f'DISK=[IMAGE_ID="{image}", SERIAL="{serial}", DEV_PREFIX="{prefix}"]')
    found = wait_vm(one, vm, "ACTIVE", "RUNNING")
    return max(int(d["DISK_ID"]) for d in found.TEMPLATE["DISK"])


def detach(one: Any, vm: int, disk_id: int) -> None:
    one.vm.detach(vm, disk_id)
    wait_vm(one, vm, "ACTIVE", "RUNNING")


def sys_block(sim: Simulator, vm: int) -> Path:
    return dataplane.guest_dir(Path(sim.root), vm) / "sys" / "block"


def by_id(sim: Simulator, vm: int, serial: str = SERIAL) -> Path:
    return guest_dev_dir(sim, vm) / "disk" / "by-id" / f"virtio-{serial[:20]}"


def test_the_kernel_shows_each_disk_with_its_serial_and_size(one: Any,
                                                            onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    image = create_image(one, onesim, "data", b"x" * (3 * MIB + 100))
    disk_id = attach(one, proxy, image, serial="oneback-0123456789abcdefghij")
    block = sys_block(onesim, proxy)
    assert (block / "vda" / "size").read_text() == f"{4 * MIB // 512}\n"  # the proxy's own
    assert (block / "vdb" / "serial").read_text() == "oneback-0123456789ab\n"  # cut to 20
    assert (block / "vdb" / "size").read_text() == f"{-(-(3 * MIB + 100) // 512)}\n"
    detach(one, proxy, disk_id)
    assert not (block / "vdb").exists()


def test_two_disks_with_one_serial_the_link_names_the_latest(one: Any,
                                                            onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    first = create_image(one, onesim, "first", b"first disk " * 1000)
    second = create_image(one, onesim, "second", b"second disk " * 1000)
    block, link = sys_block(onesim, proxy), by_id(onesim, proxy)

    d_first = attach(one, proxy, first)
    assert os.readlink(link) == "../../vdb" and link.read_bytes().startswith(b"first disk")
    d_second = attach(one, proxy, second)
    # Both disks exist for the kernel, with the same serial ...
    assert {n: (block / n / "serial").read_text() for n in ("vdb", "vdc")} == {
        "vdb": SERIAL + "\n", "vdc": SERIAL + "\n"}
    # ... and udev's link names the one added last.
    assert os.readlink(link) == "../../vdc" and link.read_bytes().startswith(b"second disk")

    detach(one, proxy, d_second)  # the latest goes: the link moves back to the other
    assert os.readlink(link) == "../../vdb" and link.read_bytes().startswith(b"first disk")
    assert not (block / "vdc").exists() and (block / "vdb").exists()
    detach(one, proxy, d_first)
    assert not os.path.lexists(link) and not (block / "vdb").exists()


def test_the_older_of_two_disks_going_leaves_the_link_alone(one: Any,
                                                           onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    first = create_image(one, onesim, "first", b"first disk " * 1000)
    second = create_image(one, onesim, "second", b"second disk " * 1000)
    link = by_id(onesim, proxy)
    d_first = attach(one, proxy, first)
    d_second = attach(one, proxy, second)
    detach(one, proxy, d_first)
    assert os.readlink(link) == "../../vdc" and link.read_bytes().startswith(b"second disk")
    detach(one, proxy, d_second)
    assert not os.path.lexists(link)


def test_scsi_disks_have_no_serial_file_but_a_by_id_link(one: Any, onesim: Simulator) -> None:
    """The kernel shows `serial` for virtio-blk only; udev reads a SCSI disk's
    serial from its VPD pages (scsi_id), so only the link carries it."""
    proxy = create_proxy_vm(one, onesim)
    image = create_image(one, onesim, "data", b"y" * 5000)
    attach(one, proxy, image, serial="scsiserial", prefix="sd")
    block = sys_block(onesim, proxy) / "sdb"
    assert (block / "size").read_text() == "10\n" and not (block / "serial").exists()
    assert (guest_dev_dir(onesim, proxy) / "disk" / "by-id"
            / "scsi-0QEMU_QEMU_HARDDISK_scsiserial").exists()


def test_a_slow_guest_sees_the_disk_after_oned_finished_the_attach(
        one: Any, onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    image = create_image(one, onesim, "data", b"z" * 5000)
    onesim.faults.slow_driver("plug", 0.5, vm_id=proxy)
    started = time.monotonic()
    attach(one, proxy, image)
    link = by_id(onesim, proxy)
    assert not os.path.lexists(link) and not (sys_block(onesim, proxy) / "vdb").exists()
    wait_until(link.exists, timeout=5)
    assert time.monotonic() - started >= 0.45
    assert (sys_block(onesim, proxy) / "vdb" / "serial").read_text() == SERIAL + "\n"


def test_a_disk_detached_before_the_guest_saw_it_never_appears(one: Any,
                                                              onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    image = create_image(one, onesim, "data", b"z" * 5000)
    onesim.faults.slow_driver("plug", 0.5, vm_id=proxy)
    detach(one, proxy, attach(one, proxy, image))
    time.sleep(0.7)
    assert not os.path.lexists(by_id(onesim, proxy))
    assert not (sys_block(onesim, proxy) / "vdb").exists()


def test_a_slow_guest_still_shows_a_disk_after_oned_finished_the_detach(
        one: Any, onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    image = create_image(one, onesim, "data", b"z" * 5000)
    disk_id = attach(one, proxy, image)
    onesim.faults.slow_driver("unplug", 0.5, vm_id=proxy)
    detach(one, proxy, disk_id)
    block = sys_block(onesim, proxy) / "vdb"
    assert (block / "serial").read_text() == SERIAL + "\n"   # oned is done, the guest not
    # the kernel drops the device first, udev its links a moment later
    wait_until(lambda: not block.exists() and not os.path.lexists(by_id(onesim, proxy))
               and not os.path.lexists(guest_dev_dir(onesim, proxy) / "vdb"), timeout=5)


def test_a_late_unplug_leaves_a_disk_attached_since_on_its_target_alone(
        one: Any, onesim: Simulator) -> None:
    proxy = create_proxy_vm(one, onesim)
    first = create_image(one, onesim, "first", b"first disk " * 1000)
    second = create_image(one, onesim, "second", b"second disk " * 1000)
    d_first = attach(one, proxy, first, serial="first-serial")
    onesim.faults.slow_driver("unplug", 0.5, vm_id=proxy)
    detach(one, proxy, d_first)
    attach(one, proxy, second, serial="second-serial")  # oned gives it vdb again
    time.sleep(0.8)
    block = sys_block(onesim, proxy) / "vdb"
    assert (block / "serial").read_text() == "second-serial\n"
    assert by_id(onesim, proxy, "second-serial").read_bytes().startswith(b"second disk")
    assert not os.path.lexists(by_id(onesim, proxy, "first-serial"))
