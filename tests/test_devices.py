"""Finding, sizing and opening disks, under a temporary /dev and /sys tree
(real files and symlinks) and on a loop device when root can make one."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import devices
from agent.errors import DeviceError, Interrupted

SERIAL = "oneback-42-1-0123456789abcdef"  # longer than virtio keeps
MiB = 1024 * 1024


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    dev, sys_ = tmp_path / "dev", tmp_path / "sys"
    (dev / "disk" / "by-id").mkdir(parents=True)
    (sys_ / "block").mkdir(parents=True)
    return dev, sys_


def attach(dev: Path, name: str = "vdb", size: int = MiB, serial: str = SERIAL,
           sys_: Path | None = None) -> Path:
    """What the kernel and udev do for a virtio disk: the node, (with `sys_`)
    /sys/block/NAME/serial, and a by-id link with the serial cut to 20
    characters, replacing one another disk of that serial held."""
    node = dev / name
    with open(node, "wb") as f:
        f.truncate(size)
    if sys_ is not None:
        (sys_ / "block" / name).mkdir()
        (sys_ / "block" / name / "serial").write_text(serial[:20] + "\n")
    link = dev / "disk" / "by-id" / f"virtio-{serial[:20]}"
    link.unlink(missing_ok=True)
    link.symlink_to(f"../../{name}")
    return node


def wait(dev: Path, sys_: Path, serial: str = SERIAL, size_mb: int = 1,
         timeout: float = 1, cancel: threading.Event | None = None) -> Path:
    return devices.wait_for_disk(serial, size_mb, dev_root=dev, sys_root=sys_,
                                 timeout=timeout, interval=0.05, cancel=cancel)


def test_finds_a_virtio_disk_by_its_truncated_serial(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    node = attach(dev, sys_=sys_)
    assert wait(dev, sys_) == node
    assert list(devices.carriers(SERIAL[:20], dev, sys_).values()) == [node]


def test_waits_for_a_disk_that_appears_later(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    timer = threading.Timer(0.3, attach, args=(dev,))
    timer.start()
    started = time.monotonic()
    try:
        found = wait(dev, sys_, timeout=5)
    finally:
        timer.join()
    assert found == dev / "vdb"
    assert 0.25 < time.monotonic() - started < 3


def test_gives_up_after_the_timeout(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    attach(dev, serial="someone-else", sys_=sys_)
    started = time.monotonic()
    with pytest.raises(DeviceError, match=f"no disk with serial '{SERIAL}'.*0.3s"):
        wait(dev, sys_, timeout=0.3)
    assert time.monotonic() - started < 2


def test_a_dangling_link_is_not_a_disk(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    (dev / "disk" / "by-id" / f"virtio-{SERIAL[:20]}").symlink_to("../../vdz")
    assert devices.carriers(SERIAL, dev, sys_) == {}


def test_falls_back_to_sys_block_serial(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    (dev / "vdc").write_bytes(b"\0" * 4096)
    for name, serial in (("vda", "root-disk"), ("vdc", SERIAL[:20])):
        (sys_ / "block" / name).mkdir()
        (sys_ / "block" / name / "serial").write_text(serial + "\n")
    assert wait(dev, sys_) == dev / "vdc"


def test_a_kernel_disk_without_its_node_is_waited_for(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    (sys_ / "block" / "vdb").mkdir()
    (sys_ / "block" / "vdb" / "serial").write_text(SERIAL[:20] + "\n")
    with pytest.raises(DeviceError, match="no disk with serial"):
        wait(dev, sys_, timeout=0.2)


def test_two_disks_with_one_serial_are_refused(roots: tuple[Path, Path]) -> None:
    """udev points the by-id link at the latest of two disks with one serial;
    the kernel shows both. Neither may be read: it could be another VM's."""
    dev, sys_ = roots
    attach(dev, "vdb", sys_=sys_)
    attach(dev, "vdc", sys_=sys_)  # the link now names vdc only
    with pytest.raises(DeviceError, match=r"2 devices carry serial .*vdb.*vdc.*oneback cleanup"):
        wait(dev, sys_)


def test_a_stale_link_to_another_disk_counts_as_a_second_carrier(
        roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    attach(dev, "vdb", sys_=sys_)
    (dev / "vdc").write_bytes(b"\0" * MiB)   # by-id names vdc, whose serial is not ours
    link = dev / "disk" / "by-id" / f"virtio-{SERIAL[:20]}"
    link.unlink()
    link.symlink_to("../../vdc")
    with pytest.raises(DeviceError, match="2 devices carry serial"):
        wait(dev, sys_)


def test_a_disk_of_another_size_is_refused(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    attach(dev, size=3 * MiB, sys_=sys_)
    with pytest.raises(DeviceError, match=r"holds 3145728 bytes, but the image attached with"
                                          r" that serial has 2 MiB"):
        wait(dev, sys_, size_mb=2)
    assert wait(dev, sys_, size_mb=3) == dev / "vdb"


def test_the_size_is_compared_in_whole_mib_as_oned_rounds_it(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    attach(dev, size=MiB + 512, sys_=sys_)  # oned's SIZE: 2 (rounded up)
    assert wait(dev, sys_, size_mb=2) == dev / "vdb"
    with pytest.raises(DeviceError, match="holds 1049088 bytes"):
        wait(dev, sys_, size_mb=1)


def test_cancel_stops_the_wait(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    with pytest.raises(Interrupted):
        wait(dev, sys_, timeout=30, cancel=cancel)


def test_waits_for_a_detached_disk_to_go(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    attach(dev, sys_=sys_)
    with pytest.raises(DeviceError, match="still present"):
        devices.wait_serial_gone(SERIAL, dev_root=dev, sys_root=sys_, timeout=0.2,
                                 interval=0.05)

    def udev_remove() -> None:
        (dev / "disk" / "by-id" / f"virtio-{SERIAL[:20]}").unlink()
        shutil.rmtree(sys_ / "block" / "vdb")

    threading.Timer(0.1, udev_remove).start()
    devices.wait_serial_gone(SERIAL, dev_root=dev, sys_root=sys_, timeout=5, interval=0.05)


def test_sizes_files_and_fds(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(3 * 1024**3 + 512)  # sparse: costs nothing
    assert devices.device_size(path) == 3 * 1024**3 + 512
    fd = os.open(path, os.O_RDONLY)
    try:
        assert devices.device_size(fd) == 3 * 1024**3 + 512
    finally:
        os.close(fd)
    with pytest.raises(DeviceError, match="cannot open"):
        devices.device_size(tmp_path / "absent")


def test_open_for_read_direct_and_buffered(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(os.urandom(8192))
    for direct in (False, True):
        fd = devices.open_for_read(path, direct=direct)
        try:
            assert devices.is_direct(fd) == direct
        finally:
            os.close(fd)
    with pytest.raises(DeviceError, match="cannot open .*absent for reading"):
        devices.open_for_read(tmp_path / "absent")


def test_open_for_write_makes_a_zero_file_of_the_size(tmp_path: Path) -> None:
    path = tmp_path / "restored"
    path.write_bytes(b"old content" * 1000)
    fd, zeros = devices.open_for_write(path, 64 * 1024)
    os.close(fd)
    assert zeros
    assert path.read_bytes() == bytes(64 * 1024)


def test_zero_range_punches_a_hole(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    path.write_bytes(b"\xab" * (256 * 1024))
    fd = os.open(path, os.O_WRONLY)
    try:
        assert devices.zero_range(fd, 64 * 1024, 128 * 1024)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data == b"\xab" * 65536 + bytes(131072) + b"\xab" * 65536
    assert path.stat().st_blocks * 512 <= 128 * 1024


# -- a real block device -----------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(5 * 1024 * 1024)
    made = subprocess.run(["losetup", "--find", "--show", str(backing)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a loop device: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


@pytest.mark.loop
def test_loop_device_is_found_sized_and_opened(tmp_path: Path, loop_device: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "disk" / "by-id").mkdir(parents=True)
    (dev / "disk" / "by-id" / f"virtio-{SERIAL[:20]}").symlink_to(loop_device)
    found = devices.wait_for_disk(SERIAL, 5, dev_root=dev, sys_root=tmp_path / "sys",
                                  timeout=1)
    assert found == loop_device
    assert devices.device_size(found) == 5 * 1024 * 1024
    fd = devices.open_for_read(found, direct=True)
    try:
        assert devices.is_direct(fd)
    finally:
        os.close(fd)
    fd, zeros = devices.open_for_write(found, 5 * 1024 * 1024)
    os.close(fd)
    assert not zeros  # a device keeps what it held: holes must be written
    with pytest.raises(DeviceError, match="holds 5242880 bytes, the disk needs"):
        devices.open_for_write(found, 6 * 1024 * 1024)
