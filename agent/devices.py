"""Block devices of the proxy VM: the only module that touches /dev and /sys.

Owns: finding a disk attached to the proxy VM by the SERIAL oneback gave it
(`DEV_ROOT/disk/by-id/virtio-SERIAL`, falling back to `SYS_ROOT/block/*/serial`
when udev made no link), waiting a bounded time for it to appear or go, sizing
a device or file, opening one for sequential reading or for writing, and
making a range of one read as zeros without writing them (punching holes).
Roots are parameters, so tests use a temporary tree with real files and loop
devices. Must not: read or diff blocks (that is `reader.py`), or talk to the
cloud.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import threading
import time
from pathlib import Path

from agent.errors import DeviceError, Interrupted

VIRTIO_SERIAL_MAX = 20
"""virtio-blk truncates serials to 20 bytes; by-id links and /sys show the cut."""


def disk_links(serial: str) -> list[str]:
    """Names under `disk/by-id/` that udev gives a disk with this serial, by bus."""
    return [
        f"virtio-{serial[:VIRTIO_SERIAL_MAX]}",
        f"scsi-0QEMU_QEMU_HARDDISK_{serial}",
        f"scsi-SQEMU_QEMU_HARDDISK_{serial}",
        f"ata-QEMU_HARDDISK_{serial}",
    ]


def lookup_disk(serial: str, dev_root: str | Path = "/dev",
                sys_root: str | Path = "/sys") -> Path | None:
    """The device of the disk with this serial now, or None. Resolves
    symlinks (the by-id link goes away on detach; the device name stays)."""
    if not serial:
        raise DeviceError("a disk serial must not be empty")
    dev, by_id = Path(dev_root), Path(dev_root) / "disk" / "by-id"
    for name in disk_links(serial):
        link = by_id / name
        if link.exists():  # follows the link: a dangling one does not count
            return Path(os.path.realpath(link))
    wanted = serial[:VIRTIO_SERIAL_MAX]
    try:
        with os.scandir(Path(sys_root) / "block") as entries:
            names = sorted(e.name for e in entries)
    except OSError:
        return None
    for name in names:
        try:
            found = (Path(sys_root) / "block" / name / "serial").read_text().strip()
        except OSError:
            continue
        if found in (serial, wanted) and (dev / name).exists():
            return dev / name
    return None


def wait_for_serial(dev_root: str | Path, serial: str, timeout: float = 60.0, *,
                    sys_root: str | Path = "/sys", interval: float = 0.2,
                    cancel: threading.Event | None = None) -> Path:
    """Wait up to `timeout` seconds for the disk with this serial to appear
    and be openable; return its device path. Raises DeviceError on timeout,
    Interrupted if `cancel` is set."""
    deadline = time.monotonic() + timeout
    while True:
        path = lookup_disk(serial, dev_root, sys_root)
        if path is not None:
            try:
                os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
                return path
            except OSError:
                pass  # the link can appear before the device is ready
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"no disk with serial {serial!r} appeared under {dev_root}/disk/by-id "
                f"within {timeout:g}s; check that the attach to the proxy VM succeeded "
                "and that udev runs in it"
            )
        if cancel is None:
            time.sleep(interval)
        elif cancel.wait(interval):
            raise Interrupted(f"stopped waiting for the disk with serial {serial!r}")


def wait_serial_gone(dev_root: str | Path, serial: str, timeout: float = 60.0, *,
                     sys_root: str | Path = "/sys", interval: float = 0.2) -> None:
    """Wait up to `timeout` seconds until no disk with this serial is present
    (after a detach). Raises DeviceError on timeout."""
    deadline = time.monotonic() + timeout
    while lookup_disk(serial, dev_root, sys_root) is not None:
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"the disk with serial {serial!r} is still present under {dev_root} "
                f"{timeout:g}s after its detach; check the proxy VM's disks"
            )
        time.sleep(interval)


def device_size(target: str | Path | int) -> int:
    """Size in bytes of a block device or file (path or open fd), by seeking
    to its end, which works for both."""
    if isinstance(target, int):
        return _seek_end(target, f"fd {target}")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise DeviceError(f"cannot open {target}: {e.strerror or e}") from e
    try:
        return _seek_end(fd, str(target))
    finally:
        os.close(fd)


def _seek_end(fd: int, name: str) -> int:
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        raise DeviceError(f"cannot size {name}: {e.strerror or e}") from e


def open_for_read(path: str | Path, *, direct: bool = False) -> int:
    """Open a device or file for one sequential read; the caller closes the fd.
    `direct` asks for O_DIRECT (no page cache; buffers and offsets must then
    be 4 KiB aligned) and falls back to buffered reads where the filesystem
    refuses it."""
    flags = os.O_RDONLY | os.O_CLOEXEC
    try:
        if direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno != errno.EINVAL:  # no O_DIRECT on this filesystem (tmpfs)
                    raise
                fd = os.open(path, flags)
        else:
            fd = os.open(path, flags)
    except OSError as e:
        raise DeviceError(f"cannot open {path} for reading: {e.strerror or e}") from e
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except OSError:
        pass  # advice only
    return fd


def is_direct(fd: int) -> bool:
    """True if the fd was opened with O_DIRECT."""
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def open_for_write(path: str | Path, size: int) -> tuple[int, bool]:
    """Open a restore target: a block device (which must hold `size` bytes)
    or a regular file (created or emptied, then sized sparse, so it reads as
    zeros). Returns (fd, reads_as_zeros); the caller closes the fd."""
    try:
        st = os.stat(path)
        exists = True
    except FileNotFoundError:
        exists = False
    except OSError as e:
        raise DeviceError(f"cannot use {path} as a restore target: {e.strerror or e}") from e
    try:
        if exists and stat.S_ISBLK(st.st_mode):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            have = _seek_end(fd, str(path))
            if have < size:
                os.close(fd)
                raise DeviceError(
                    f"{path} holds {have} bytes, the disk needs {size}; use a larger device"
                )
            return fd, False
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        return fd, True
    except OSError as e:
        raise DeviceError(f"cannot open {path} for writing: {e.strerror or e}") from e


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def zero_range(fd: int, offset: int, length: int) -> bool:
    """Make a range of a file or block device read as zeros without writing
    them (punch a hole: thin and sparse backends stay unallocated). Returns
    False where that is not supported, and the caller must write zeros."""
    if length <= 0:
        return True
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise DeviceError(f"cannot zero bytes {offset}-{offset + length} of fd {fd}: "
                      f"{os.strerror(err)}")
