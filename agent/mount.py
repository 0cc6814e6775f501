"""Single-file restore: one disk of a backup as a read-only raw file, through FUSE.

Owns: the FUSE filesystem (a directory holding one file, `disk.raw`, whose
bytes are the backed-up disk's, read on demand through a `DiskImage`: no
full restore), the checks before mounting (FUSE usable here, the mountpoint
an empty directory), serving until unmounted or signalled (libfuse's own
SIGINT/SIGTERM/SIGHUP handlers end the loop and unmount), and `unmount`
(fusermount -u) of a oneback mount only. The only user of the FUSE binding,
mfusepy (ctypes over libfuse 2 or 3), imported when a disk is served so the
CLI starts without it.
Must not: print (a read that fails is logged to `oneback.mount` and answered
with EIO), or write to the repository or the catalog.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.diskimage import DiskImage
from agent.errors import DeviceError, OnebackError, UsageError

FILE_NAME = "disk.raw"
FS_NAME = "oneback"   # the mount's source; its type is fuse.oneback
MOUNTINFO = Path("/proc/self/mountinfo")
FUSE_DEVICE = Path("/dev/fuse")

log = logging.getLogger("oneback.mount")


def unavailable() -> str | None:
    """Why a disk cannot be mounted through FUSE here (one line with the
    fix), or None when it can."""
    if not FUSE_DEVICE.exists():
        return (f"{FUSE_DEVICE} does not exist: load the fuse kernel module (modprobe fuse),"
                " or give the container the device")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        return f"{FUSE_DEVICE} is not readable and writable by this user: run as root"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "fusermount is not installed: apt-get install fuse3 (or fuse)"
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        return "the FUSE binding mfusepy is not installed: reinstall oneback (pip install .)"
    except OSError as e:   # mfusepy found no libfuse
        return f"libfuse cannot be loaded ({e}): apt-get install fuse3 (or fuse)"
    return None


def check_mountpoint(path: Path) -> Path:
    """The absolute mountpoint: an existing empty directory that is not
    mounted on. UsageError (one line) otherwise."""
    target = path.absolute()
    if is_mounted(target):
        raise UsageError(f"{path} is already a oneback mount (of a process that was killed?):"
                         f" `oneback umount {path}` first, or choose another empty directory")
    try:
        is_dir, exists = target.is_dir(), target.exists()
    except OSError as e:
        raise UsageError(f"mountpoint {path} cannot be used ({e.strerror or e}): choose"
                         " an empty directory") from e
    if not is_dir:
        why = "is not a directory" if exists else "does not exist"
        raise UsageError(f"mountpoint {path} {why}: create an empty directory to mount on")
    if os.path.ismount(target):
        raise UsageError(f"mountpoint {path} is already mounted on: unmount it or choose"
                         " another empty directory")
    try:
        empty = not any(target.iterdir())
    except OSError as e:
        raise UsageError(f"mountpoint {path} cannot be read ({e.strerror or e}): choose"
                         " another empty directory") from e
    if not empty:
        raise UsageError(f"mountpoint {path} is not empty: choose an empty directory")
    real = Path(os.path.realpath(target))
    _check_no_one_else_can_swap(path, real)
    return real


def _check_no_one_else_can_swap(path: Path, real: Path) -> None:
    """The mountpoint is checked, then mounted: in between, whoever may
    rename entries of one of its directories could put a symlink in its
    place and have the backup's disk appear elsewhere. So every directory
    on the way must be owned by root or this user, and be writable by no
    one else unless sticky (as /tmp: others cannot rename what they do not
    own). UsageError (one line) otherwise."""
    me = os.geteuid()
    for directory in [real, *real.parents]:
        try:
            st = os.lstat(directory)
        except OSError as e:
            raise UsageError(f"mountpoint {path}: cannot check {directory} ({e.strerror or e})"
                             ": choose an empty directory of your own") from e
        others_write = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
        if directory != real and (st.st_uid not in (0, me) or others_write):
            raise UsageError(
                f"mountpoint {path}: {directory} can be changed by another user (owner uid"
                f" {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}), who could swap the"
                " mountpoint for a link: mount on an empty directory under one only you (or"
                " root) can change, e.g. /root/restore or /mnt")


def serve(image: DiskImage, mountpoint: Path, *, mtime: float | None = None,
          on_ready: Callable[[], None] | None = None) -> None:
    """Mount `image` read-only at `mountpoint` (checked by check_mountpoint)
    as `mountpoint/disk.raw` and serve reads, several at once, until the
    mount is unmounted (`unmount`, fusermount -u) or the process gets
    SIGINT/SIGTERM (then it unmounts). `on_ready` is called once the mount is
    in place. DeviceError when it cannot be mounted."""
    import mfusepy

    operations = _operations(image, mfusepy, time.time() if mtime is None else mtime,
                             on_ready)
    try:
        mfusepy.FUSE(operations, str(mountpoint), foreground=True, nothreads=False, ro=True,
                     fsname=FS_NAME, subtype=FS_NAME, kernel_cache=True,
                     default_permissions=True)
    except RuntimeError as e:
        raise DeviceError(f"cannot mount {image.where} at {mountpoint} (libfuse error {e});"
                          " the reason is on the line above") from e


def is_mounted(mountpoint: Path) -> bool:
    """True when a oneback FUSE mount sits at `mountpoint`."""
    target = str(mountpoint.absolute())
    return any(point == target and source == FS_NAME and kind.startswith("fuse")
               for point, kind, source in _mounts())


def unmount(mountpoint: Path) -> None:
    """Unmount the oneback mount at `mountpoint` (the serving process then
    exits). UsageError when there is none there; DeviceError when the
    unmount fails (e.g. a loop device still uses the disk file)."""
    if not is_mounted(mountpoint):
        raise UsageError(f"{mountpoint} is not a oneback mount: nothing to unmount"
                         " (`oneback mount` mounts one)")
    target = str(mountpoint.absolute())
    tools = [[t, "-u", target] for t in ("fusermount3", "fusermount") if shutil.which(t)]
    tools.append(["umount", target])
    error = ""
    for argv in tools:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            error = str(e)
            continue
        if done.returncode == 0 or not is_mounted(mountpoint):
            return
        error = " ".join((done.stderr or done.stdout).split()) or f"{argv[0]} failed"
    raise DeviceError(f"cannot unmount {mountpoint}: {error}; detach the loop devices and"
                      f" unmount the partitions that use {target}/{FILE_NAME} first")


def _mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, filesystem type, source) of every mount this process sees."""
    try:
        lines = MOUNTINFO.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) >= 5 and len(rest) >= 2:
            found.append((_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return found


def _unescape(text: str) -> str:
    """mountinfo's octal escapes (\\040 for a space) undone."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _operations(image: DiskImage, fuse: Any, mtime: float,
                on_ready: Callable[[], None] | None) -> Any:
    """The FUSE callbacks (an mfusepy.Operations): a root directory holding
    FILE_NAME, read-only."""
    ns = int(mtime * 1e9)
    common = {"st_uid": os.getuid(), "st_gid": os.getgid(), "st_atime": ns, "st_mtime": ns,
              "st_ctime": ns}
    file_path = "/" + FILE_NAME

    class DiskFs(fuse.Operations):  # type: ignore[misc]
        use_ns = True

        def init(self, path: str) -> None:
            if on_ready is not None:
                on_ready()

        def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
            if path == "/":
                return {**common, "st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
            if path == file_path:
                return {**common, "st_mode": stat.S_IFREG | 0o444, "st_nlink": 1,
                        "st_size": image.size, "st_blocks": (image.size + 511) // 512}
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path: str, fh: Any) -> list[str]:
            if path != "/":
                raise fuse.FuseOSError(errno.ENOTDIR)
            return [".", "..", FILE_NAME]

        def open(self, path: str, flags: int) -> int:
            if path != file_path:
                raise fuse.FuseOSError(errno.ENOENT)
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise fuse.FuseOSError(errno.EROFS)
            return 0

        def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
            try:
                return image.read(offset, size)
            except OnebackError as e:
                log.error("reading %d bytes at byte %d of %s failed: %s", size, offset,
                          image.where, e.message)
            except Exception as e:  # a bug: still only this read fails
                log.error("reading %d bytes at byte %d of %s failed: internal error (please"
                          " report): %s: %s", size, offset, image.where, type(e).__name__, e)
            raise fuse.FuseOSError(errno.EIO)

        def statfs(self, path: str) -> dict[str, int]:
            return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": -(-image.size // 4096),
                    "f_bfree": 0, "f_bavail": 0, "f_files": 2, "f_ffree": 0,
                    "f_namemax": 255}

    return DiskFs()
