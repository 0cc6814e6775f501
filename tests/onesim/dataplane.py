"""The bytes: datastore files, VM disks, snapshots and the simulated guests.

Owns: the file layout of OpenNebula's file-based datastores under ROOT
(`datastores/ID/<hex>` image sources, `datastores/SYS/VM/disk.N` VM disks,
`disk.N.snap/SNAP` snapshots), sparse-preserving copies, and each VM's
simulated guest under `vms/VM/`: `dev/<TARGET>` (a link to the file, or a
real loop device), what the guest kernel shows of it (`sys/block/<TARGET>/`
`size` and, for virtio, `serial`) and what udev makes of it
(`dev/disk/by-id/...` links, claimed in `run/udev/links/`: with two disks of
one serial the link names the latest), and `run/one-context/one_env`.
Must not: know states or touch the database.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

MIB = 1024 * 1024
CHUNK = MIB  # read size
BLOCK = 64 * 1024  # zero blocks of this size are skipped, not written


class CopyMeter:
    """The bytes the transfer manager's drivers would copy, per operation
    (`snapshot`, `cpds` for a save-as, `clone`, `ln`, `mvds`), as each
    TM_MAD's scripts do (`disks.transfer_bytes`). oned reports none of this
    (no document carries it): it is a probe for tests, read with
    `Simulator.copied_bytes()`. onesim's own files are always whole copies
    (they hold the guest's view); this counts what the real driver moves.
    In memory: a restart starts from zero."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = {}

    def add(self, op: str, count: int) -> None:
        with self._lock:
            self._bytes[op] = self._bytes.get(op, 0) + count

    def totals(self) -> dict[str, int]:
        with self._lock:
            return dict(self._bytes)


def file_size(path: Path) -> int:
    """The logical size of a disk file (what a `cp` or `tar` of it reads)."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def new_source(base: Path) -> Path:
    """A fresh image file name in a datastore, like the fs driver's md5 names."""
    base.mkdir(parents=True, exist_ok=True)
    return base / secrets.token_hex(16)


def make_sparse(path: Path, size_mb: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.truncate(size_mb * MIB)


def _extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Data extents of a file (SEEK_DATA/SEEK_HOLE), or one extent."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    except (OSError, AttributeError):
        return [(0, size)]
    return out


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy src to dst (replacing it) without materialising holes or zero
    blocks; dst has src's exact length. Follows a dst symlink (writes through)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return
    size = src.stat().st_size
    zero = bytes(BLOCK)
    with open(src, "rb") as fin, open(dst, "r+b" if dst.exists() else "wb") as fout:
        fout.truncate(0)
        fout.truncate(size)
        for start, end in _extents(fin.fileno(), size):
            fin.seek(start)
            pos = start
            while pos < end:
                chunk = fin.read(min(CHUNK, end - pos))
                if not chunk:
                    break
                for off in range(0, len(chunk), BLOCK):
                    block = chunk[off:off + BLOCK]
                    if block != zero[:len(block)]:
                        fout.seek(pos + off)
                        fout.write(block)
                pos += len(chunk)
        # As a datastore driver on another host would: the copy is durable when
        # the operation ends, and it is not in the (proxy VM's) page cache.
        fout.flush()
        os.fsync(fout.fileno())
        os.posix_fadvise(fout.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def allocated_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# VM disks in the system datastore
# ---------------------------------------------------------------------------

def vm_dir(system_base: Path, vm_id: int) -> Path:
    return system_base / str(vm_id)


def disk_file(system_base: Path, vm_id: int, disk_id: int) -> Path:
    return vm_dir(system_base, vm_id) / f"disk.{disk_id}"


def snap_file(system_base: Path, vm_id: int, disk_id: int, snap_id: int) -> Path:
    return vm_dir(system_base, vm_id) / f"disk.{disk_id}.snap" / str(snap_id)


def clone_disk(source: Path, target: Path) -> None:
    sparse_copy(source, target)


def link_disk(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove(target)
    target.symlink_to(source)


def volatile_disk(target: Path, size_mb: int) -> None:
    remove(target)
    make_sparse(target, size_mb)


# ---------------------------------------------------------------------------
# The simulated guest of a VM
# ---------------------------------------------------------------------------

def guest_dir(root: Path, vm_id: int) -> Path:
    return root / "vms" / str(vm_id)


def by_id_name(dev_prefix: str, serial: str) -> str:
    """The name udev gives a disk with this SERIAL, by the bus its prefix means."""
    if dev_prefix == "vd":
        return f"virtio-{serial[:20]}"  # virtio-blk keeps 20 bytes of serial
    if dev_prefix == "hd":
        return f"ata-QEMU_HARDDISK_{serial[:20]}"
    return f"scsi-0QEMU_QEMU_HARDDISK_{serial}"


def plug(root: Path, vm_id: int, target: str, dev_prefix: str, serial: str | None,
         disk: Path, loop: bool) -> None:
    """Make the disk appear in the guest as the kernel and udev do: the node
    dev/TARGET (a symlink to the file, or to a loop device), the kernel's
    sys/block/TARGET (`size` in 512-byte sectors; `serial`, cut to 20 bytes,
    for virtio-blk only, as the kernel's virtblk_serial_show) and, with a
    SERIAL, udev's dev/disk/by-id/NAME (`udev_claim`)."""
    guest = guest_dir(root, vm_id)
    dev = guest / "dev"
    (dev / "disk" / "by-id").mkdir(parents=True, exist_ok=True)
    node = disk
    if loop:
        out = subprocess.run(["losetup", "--find", "--show", str(disk.resolve())],
                             check=True, capture_output=True, text=True)
        node = Path(out.stdout.strip())
    link = dev / target
    remove(link)
    link.symlink_to(node)
    block = guest / "sys" / "block" / target
    remove(block)
    block.mkdir(parents=True)
    try:
        size = disk.stat().st_size
    except OSError:
        size = 0
    (block / "size").write_text(f"{-(-size // 512)}\n")
    if serial and dev_prefix == "vd":
        (block / "serial").write_text(serial[:20] + "\n")
    if serial:
        udev_claim(root, vm_id, by_id_name(dev_prefix, serial), target)


def unplug(root: Path, vm_id: int, target: str, dev_prefix: str, serial: str | None) -> None:
    """The disk leaves the guest: its sys/block entry, its claim on its by-id
    link (`udev_release`) and its node."""
    guest = guest_dir(root, vm_id)
    dev = guest / "dev"
    remove(guest / "sys" / "block" / target)
    if serial:
        udev_release(root, vm_id, by_id_name(dev_prefix, serial), target)
    link = dev / target
    if link.is_symlink():
        node = Path(os.readlink(link))
        if str(node).startswith("/dev/loop"):
            subprocess.run(["losetup", "-d", str(node)], check=False, capture_output=True)
        link.unlink()


def _claims(root: Path, vm_id: int, name: str) -> Path:
    return guest_dir(root, vm_id) / "run" / "udev" / "links" / name


def udev_claim(root: Path, vm_id: int, name: str, target: str) -> None:
    """What udev does when a disk that wants by-id NAME appears (systemd's
    udev-node.c link_update: every device wanting a link records a claim
    under /run/udev/links/NAME; of equal priority the device being added
    takes the link): the claim is recorded and the link names this disk,
    even when another disk with the same serial holds it."""
    claims = _claims(root, vm_id, name)
    claims.mkdir(parents=True, exist_ok=True)
    (claims / target).write_text(f"{time.time_ns()}\n")
    _point(guest_dir(root, vm_id) / "dev" / "disk" / "by-id" / name, target)


def udev_release(root: Path, vm_id: int, name: str, target: str) -> None:
    """What udev does when that disk goes: its claim is dropped; if the link
    named it, the link moves to the latest remaining claimant, or goes when
    none is left; if it named another disk, it is left alone."""
    claims = _claims(root, vm_id, name)
    remove(claims / target)
    link = guest_dir(root, vm_id) / "dev" / "disk" / "by-id" / name
    if link.is_symlink() and Path(os.readlink(link)).name != target:
        return
    remaining = sorted(((int(c.read_text() or 0), c.name) for c in claims.iterdir()),
                       reverse=True) if claims.is_dir() else []
    if remaining:
        _point(link, remaining[0][1])
    else:
        remove(link)
        remove(claims)


def _point(link: Path, target: str) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(link.name + ".tmp")
    remove(tmp)
    tmp.symlink_to(Path("../..") / target)
    os.replace(tmp, link)  # udev replaces links atomically


def unplug_all(root: Path, vm_id: int) -> None:
    guest = guest_dir(root, vm_id)
    dev = guest / "dev"
    remove(guest / "sys")
    remove(guest / "run" / "udev")
    if not dev.is_dir():
        return
    for entry in dev.iterdir():
        if entry.is_symlink():
            node = os.readlink(entry)
            if node.startswith("/dev/loop"):
                subprocess.run(["losetup", "-d", node], check=False, capture_output=True)
            entry.unlink()
    remove(dev / "disk")


def write_one_env(root: Path, vm_id: int, variables: list[tuple[str, str]]) -> None:
    """What one-context's loc-9-gen-env writes: `export NAME="value"` lines."""
    path = guest_dir(root, vm_id) / "run" / "one-context" / "one_env"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(f'export {k}="{v}"\n' for k, v in variables)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(lines)
    os.replace(tmp, path)


def context_script(variables: list[tuple[str, str]]) -> str:
    """context.sh as OpenNebula writes it into the context CD."""
    body = "".join(f"{k}='{v}'\n" for k, v in variables)
    return "# Context variables generated by OpenNebula\n" + body


def loop_supported() -> bool:
    return os.geteuid() == 0 and shutil.which("losetup") is not None
