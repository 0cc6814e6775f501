"""Block devices of the proxy VM: the only module that touches /dev and /sys.

Owns: finding a disk attached to the proxy VM by the SERIAL oneback gave it
and proving it is that disk before anyone reads or writes it: every device
carrying the serial is counted (`SYS_ROOT/block/*/serial`, as the kernel shows
it, and the `DEV_ROOT/disk/by-id/virtio-SERIAL` links udev makes, which name
only the latest of several disks with one serial), there must be exactly one,
and its size must be the attached image's; waiting a bounded time for it to
appear or go; sizing a device or file, opening one for sequential reading or
for writing, and making a range of one read as zeros without writing them
(punching holes).
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
MiB = 1024 * 1024


def disk_links(serial: str) -> list[str]:
    """Names under `disk/by-id/` that udev gives a disk with this serial, by bus."""
    return [
        f"virtio-{serial[:VIRTIO_SERIAL_MAX]}",
        f"scsi-0QEMU_QEMU_HARDDISK_{serial}",
        f"scsi-SQEMU_QEMU_HARDDISK_{serial}",
        f"ata-QEMU_HARDDISK_{serial}",
    ]


def carriers(serial: str, dev_root: str | Path = "/dev",
             sys_root: str | Path = "/sys") -> dict[str, Path | None]:
    """Every device that carries this serial now, as the kernel and udev show
    it: each `SYS_ROOT/block/NAME` whose `serial` matches (the device
    `DEV_ROOT/NAME`, or None while its node is missing) and the target of
    each `disk/by-id` link for the serial. Keyed by the resolved device, so
    a disk seen both ways counts once; two keys mean two disks."""
    if not serial:
        raise DeviceError("a disk serial must not be empty")
    dev = Path(dev_root)
    found: dict[str, Path | None] = {}
    wanted = (serial, serial[:VIRTIO_SERIAL_MAX])
    block = Path(sys_root) / "block"
    try:
        with os.scandir(block) as entries:
            names = sorted(e.name for e in entries)
    except OSError:
        names = []
    for name in names:
        try:
            shown = (block / name / "serial").read_text().strip()
        except OSError:
            continue
        if shown in wanted:
            node = dev / name
            if node.exists():
                found[os.path.realpath(node)] = node
            else:
                found[f"{block / name} (no {node} yet)"] = None
    for link_name in disk_links(serial):
        link = dev / "disk" / "by-id" / link_name
        if link.exists():  # follows the link: a dangling one does not count
            target = os.path.realpath(link)
            found.setdefault(target, Path(target))
    return found


def wait_for_disk(serial: str, size_mb: int, *, dev_root: str | Path = "/dev",
                  sys_root: str | Path = "/sys", timeout: float = 60.0,
                  interval: float = 0.1, cancel: threading.Event | None = None) -> Path:
    """The device of the disk oneback attached with this serial, once it is
    provably that disk: exactly one device carries the serial, it can be
    opened, and it holds the attached image's size (`size_mb`, OpenNebula's
    SIZE: the byte size rounded up to MiB; 0 skips the check). Waits up to
    `timeout` seconds for it to appear. Raises DeviceError at once when two
    devices carry the serial or the size differs (another disk, which must
    never be read or written), DeviceError on timeout, Interrupted if
    `cancel` is set."""
    deadline = time.monotonic() + timeout
    while True:
        found = carriers(serial, dev_root, sys_root)
        if len(found) > 1:
            raise DeviceError(
                f"{len(found)} devices carry serial {serial!r} in the proxy VM"
                f" ({', '.join(sorted(found))}); oneback cannot tell which is the disk it"
                f" attached and reads none: run 'oneback cleanup' and detach from the proxy"
                f" VM any disk with that serial that oneback did not just attach")
        path = next(iter(found.values()), None)
        if path is not None:
            size = _ready_size(path)
            if size:  # 0: the device is not ready yet
                if size_mb > 0 and -(-size // MiB) != size_mb:
                    raise DeviceError(
                        f"the device {path} with serial {serial!r} holds {size} bytes, but"
                        f" the image attached with that serial has {size_mb} MiB: it is not"
                        f" the disk oneback attached, and is not used; check the proxy VM's"
                        f" disks ('oneback cleanup' detaches oneback's leftovers)")
                return path
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"no disk with serial {serial!r} appeared under {dev_root}/disk/by-id "
                f"or {sys_root}/block within {timeout:g}s; check that the attach to the"
                f" proxy VM succeeded, that udev runs in it and proxy.dev_root/sys_root")
        if cancel is None:
            time.sleep(interval)
        elif cancel.wait(interval):
            raise Interrupted(f"stopped waiting for the disk with serial {serial!r}")


def _ready_size(path: Path) -> int:
    """The device's size once it can be opened, else 0 (the link can appear
    before the device is ready)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return 0
    finally:
        os.close(fd)


def wait_serial_gone(serial: str, *, dev_root: str | Path = "/dev",
                     sys_root: str | Path = "/sys", timeout: float = 60.0,
                     interval: float = 0.1) -> None:
    """Wait up to `timeout` seconds until no device carries this serial
    (after its detach). Raises DeviceError on timeout."""
    deadline = time.monotonic() + timeout
    while found := carriers(serial, dev_root, sys_root):
        if time.monotonic() >= deadline:
            raise DeviceError(
                f"the disk with serial {serial!r} is still present in the proxy VM"
                f" ({', '.join(sorted(found))}) {timeout:g}s after its detach; check the"
                f" proxy VM's disks")
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


def visible_disks(dev_root: str | Path = "/dev", sys_root: str | Path = "/sys",
                  ) -> tuple[list[str], bool]:
    """What the proxy VM shows of its disks (`oneback doctor`): the block
    devices under SYS_ROOT/block, and whether DEV_ROOT/disk/by-id (udev's
    links) exists. DeviceError naming the setting when either root cannot
    be read: no attached disk could be found then."""
    dev, block = Path(dev_root), Path(sys_root) / "block"
    if not dev.is_dir():
        raise DeviceError(f"the device directory {dev} does not exist: set proxy.dev_root"
                          f" (/dev in the proxy VM)")
    try:
        with os.scandir(block) as entries:
            names = sorted(e.name for e in entries)
    except OSError as e:
        raise DeviceError(f"cannot read {block} ({e.strerror or e}): set proxy.sys_root"
                          f" (/sys in the proxy VM)") from None
    return names, (dev / "disk" / "by-id").is_dir()
