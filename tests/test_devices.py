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


@pytest.fixture
def roots(tmp_path: Path) -> tuple[Path, Path]:
    dev, sys_ = tmp_path / "dev", tmp_path / "sys"
    (dev / "disk" / "by-id").mkdir(parents=True)
    (sys_ / "block").mkdir(parents=True)
    return dev, sys_


def attach(dev: Path, name: str = "vdb", size: int = 1 << 20, serial: str = SERIAL) -> Path:
    """What udev does for a virtio disk: the node, and a by-id link with the
    serial cut to 20 characters."""
    node = dev / name
    with open(node, "wb") as f:
        f.truncate(size)
    (dev / "disk" / "by-id" / f"virtio-{serial[:20]}").symlink_to(f"../../{name}")
    return node


def test_finds_a_virtio_disk_by_its_truncated_serial(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    node = attach(dev)
    assert devices.wait_for_serial(dev, SERIAL, 1, sys_root=sys_) == node
    assert devices.lookup_disk(SERIAL[:20], dev, sys_) == node


def test_waits_for_a_disk_that_appears_later(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    timer = threading.Timer(0.3, attach, args=(dev,))
    timer.start()
    started = time.monotonic()
    try:
        found = devices.wait_for_serial(dev, SERIAL, 5, sys_root=sys_, interval=0.05)
    finally:
        timer.join()
    assert found == dev / "vdb"
    assert 0.25 < time.monotonic() - started < 3


def test_gives_up_after_the_timeout(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    attach(dev, serial="someone-else")
    started = time.monotonic()
    with pytest.raises(DeviceError, match=f"no disk with serial '{SERIAL}'.*0.3s"):
        devices.wait_for_serial(dev, SERIAL, 0.3, sys_root=sys_, interval=0.05)
    assert time.monotonic() - started < 2


def test_a_dangling_link_is_not_a_disk(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    (dev / "disk" / "by-id" / f"virtio-{SERIAL[:20]}").symlink_to("../../vdz")
    assert devices.lookup_disk(SERIAL, dev, sys_) is None


def test_falls_back_to_sys_block_serial(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    (dev / "vdc").write_bytes(b"\0" * 4096)
    for name, serial in (("vda", "root-disk"), ("vdc", SERIAL[:20])):
        (sys_ / "block" / name).mkdir()
        (sys_ / "block" / name / "serial").write_text(serial + "\n")
    assert devices.wait_for_serial(dev, SERIAL, 1, sys_root=sys_) == dev / "vdc"


def test_cancel_stops_the_wait(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    with pytest.raises(Interrupted):
        devices.wait_for_serial(dev, SERIAL, 30, sys_root=sys_, cancel=cancel)


def test_waits_for_a_detached_disk_to_go(roots: tuple[Path, Path]) -> None:
    dev, sys_ = roots
    attach(dev)
    with pytest.raises(DeviceError, match="still present"):
        devices.wait_serial_gone(dev, SERIAL, 0.2, sys_root=sys_, interval=0.05)
    threading.Timer(0.1, (dev / "disk" / "by-id" / f"virtio-{SERIAL[:20]}").unlink).start()
    devices.wait_serial_gone(dev, SERIAL, 5, sys_root=sys_, interval=0.05)


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
    found = devices.wait_for_serial(dev, SERIAL, 1, sys_root=tmp_path / "sys")
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
