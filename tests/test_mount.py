"""Single-file restore: `oneback mount` exposes one disk of a backup as a
read-only raw file through a real FUSE mount, fetching chunks on demand, so
one file can be copied out of an older backup's filesystem; `oneback umount`.

The ext4 disks are made with e2fsprogs (mkfs.ext4, debugfs), without
mounting; the mounted backup is read with debugfs and, where loop devices
work, with a real read-only loop mount. Skipped, saying why, where FUSE or
e2fsprogs is missing (.ci/run installs them).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import xxhash

from agent import manifest as mf
from agent import mount as engine
from agent.diskimage import DiskImage
from agent.errors import IntegrityError
from agent.model import BlockRecord
from agent.store import chunk_id_of
from agent.store.memory import MemoryStore
from tests.agentkit import BLOCK, Cloud, MiB, pattern

DISK = 16 * MiB
NO_FUSE = engine.unavailable()
NO_E2FS = next((f"{t} is not installed (apt-get install e2fsprogs)"
                for t in ("mkfs.ext4", "debugfs") if shutil.which(t) is None), None)
needs_fuse = pytest.mark.skipif(NO_FUSE is not None, reason=f"no FUSE here: {NO_FUSE}")
needs_e2fs = pytest.mark.skipif(NO_E2FS is not None, reason=f"no e2fsprogs: {NO_E2FS}")

OLD = b"the report as it was on Tuesday\n" * 300     # spans several 4 KiB fs blocks
NEW = b"overwritten on Wednesday\n" * 50


# -- ext4 without mounting (e2fsprogs) ---------------------------------------------


def mkfs(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "backedup", str(path)],
                   check=True, capture_output=True)


def put_file(image: Path, name: str, data: bytes, scratch: Path) -> None:
    """Write /name into the ext4 filesystem in `image` (replacing it)."""
    src = scratch / f"put-{name}"
    src.write_bytes(data)
    subprocess.run(["debugfs", "-w", "-R", f"rm /{name}", str(image)], capture_output=True)
    done = subprocess.run(["debugfs", "-w", "-R", f"write {src} {name}", str(image)],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "Allocated inode" in done.stdout + done.stderr, done
    src.unlink()


def cat(image: Path, name: str) -> bytes:
    done = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- oneback mount as a real process ------------------------------------------------


class Mounted:
    """`oneback mount ARGS MOUNTPOINT` running; its first stdout line read."""

    def __init__(self, c: Cloud, mountpoint: Path, *args: str, timeout: float = 30) -> None:
        mountpoint.mkdir(exist_ok=True)
        self.mountpoint, self.file = mountpoint, mountpoint / engine.FILE_NAME
        self.proc = c.spawn("mount", *args, str(mountpoint))
        self.started = time.monotonic()
        deadline = self.started + timeout
        while not engine.is_mounted(mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise AssertionError(f"oneback mount did not mount: {out} {err}")
            time.sleep(0.02)
        assert self.proc.stdout is not None
        self.line = self.proc.stdout.readline()

    def stop(self, timeout: float = 30) -> tuple[int, str]:
        if engine.is_mounted(self.mountpoint):
            subprocess.run(["fusermount", "-u", str(self.mountpoint)], capture_output=True)
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def loop_mount(raw: Path, where: Path) -> bool:
    """Mount the ext4 filesystem in `raw` read-only through a loop device;
    False where loop devices cannot be used here."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-o", "ro,loop,noload", "-t", "ext4", str(raw),
                           str(where)], capture_output=True, text=True)
    return done.returncode == 0


def backups_of(c: Cloud, capsys: pytest.CaptureFixture[str], vm: int) -> int:
    r = c.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    return int(r.json()["backup_id"])


# -- the tests ------------------------------------------------------------------------


@needs_fuse
@needs_e2fs
def test_one_file_from_an_older_backup_through_the_mount(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    scratch = cloud.tmp / "scratch"
    scratch.mkdir()
    src = scratch / "fs.img"
    mkfs(src, DISK)
    put_file(src, "report.txt", OLD, scratch)
    put_file(src, "big.bin", pattern(3 * MiB, 7), scratch)
    vm = cloud.vm("files", [cloud.image("files-os", src.read_bytes())])
    disk = cloud.disk_path(vm, 0)
    tuesday = backups_of(cloud, capsys, vm)
    at_tuesday = disk.read_bytes()
    put_file(disk, "report.txt", NEW, scratch)
    wednesday = backups_of(cloud, capsys, vm)
    assert cat(disk, "report.txt") == NEW

    m = Mounted(cloud, cloud.tmp / "mnt", str(tuesday), "0")
    try:
        assert f"disk 0 of backup {tuesday}" in m.line and str(m.file) in m.line
        assert os.listdir(m.mountpoint) == [engine.FILE_NAME]
        assert m.file.stat().st_size == DISK
        # The old file, read through the filesystem in the mounted disk.
        assert cat(m.file, "report.txt") == OLD
        assert cat(m.file, "big.bin") == pattern(3 * MiB, 7)
        looped = cloud.tmp / "loop"
        if loop_mount(m.file, looped):
            try:
                assert (looped / "report.txt").read_bytes() == OLD
            finally:
                subprocess.run(["umount", str(looped)], check=True)
        # Byte for byte the disk as it was, and what `oneback export` writes.
        whole = m.file.read_bytes()
        assert whole == at_tuesday
        out = cloud.tmp / "export.raw"
        r = cloud.run("export", str(tuesday), "0", "-o", str(out), capsys=capsys)
        assert r.code == 0, r.err
        assert out.read_bytes() == whole
        # Read-only; and a backup of the same VM runs while the mount is up.
        with pytest.raises(OSError) as e:
            os.open(m.file, os.O_WRONLY)
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        assert backups_of(cloud, capsys, vm) > wednesday
        # Unmounted by `oneback umount`; the serving process then ends cleanly.
        r = cloud.run("umount", str(m.mountpoint), capsys=capsys)
        assert r.code == 0 and "unmounted" in r.out, r.err
        code, err = m.stop()
        assert code == 0, err
        assert not os.path.ismount(m.mountpoint)
    finally:
        m.stop()
    r = cloud.run("umount", str(m.mountpoint), capsys=capsys)
    assert r.code == 2 and r.err.count("\n") == 1 and "not a oneback mount" in r.err


@needs_fuse
def test_reads_anywhere_under_load_match_the_export(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(pattern(6 * BLOCK + 12345, 3))          # a short last block
    data[2 * BLOCK:4 * BLOCK] = bytes(2 * BLOCK)              # holes
    vm = cloud.vm("data", [cloud.image("data-0", bytes(data))])
    b = backups_of(cloud, capsys, vm)
    m = Mounted(cloud, cloud.tmp / "mnt", str(b), "0", "--cache", "1")  # one block cached
    try:
        assert m.file.stat().st_size == len(data)
        fd = os.open(m.file, os.O_RDONLY)
        rng = random.Random(5)
        offsets = [0, BLOCK - 1, 2 * BLOCK - 100, 3 * BLOCK, len(data) - 5, len(data),
                   *(rng.randrange(len(data)) for _ in range(40))]
        got: dict[int, bytes] = {}

        def read(off: int) -> None:
            got[off] = os.pread(fd, 300_000, off)

        threads = [threading.Thread(target=read, args=(o,)) for o in offsets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.close(fd)
        assert got == {o: bytes(data[o:o + 300_000]) for o in offsets}
        m.proc.send_signal(signal.SIGINT)      # Ctrl-C unmounts
        code, err = m.stop()
    finally:
        m.stop()
    assert code == 0, err
    assert not os.path.ismount(m.mountpoint)


@needs_fuse
def test_a_killed_mount_is_unmounted_by_umount_and_mounts_again(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    data = pattern(2 * BLOCK, 6)
    vm = cloud.vm("killed", [cloud.image("killed-0", data)])
    b = backups_of(cloud, capsys, vm)
    m = Mounted(cloud, cloud.tmp / "mnt", str(b), "0")
    m.proc.kill()                              # kill -9: the mount is left, dead
    m.proc.wait()
    try:
        assert engine.is_mounted(m.mountpoint)
        r = cloud.run("mount", str(b), "0", str(m.mountpoint), capsys=capsys)
        assert r.code == 2 and r.err.count("\n") == 1 and "oneback umount" in r.err, r
        r = cloud.run("umount", str(m.mountpoint), capsys=capsys)
        assert r.code == 0, r.err
        assert not engine.is_mounted(m.mountpoint)
    finally:
        m.stop()
    again = Mounted(cloud, m.mountpoint, str(b), "0")
    try:
        assert again.file.read_bytes() == data
    finally:
        code, err = again.stop()
    assert code == 0, err


@needs_fuse
def test_a_damaged_chunk_fails_its_range_only_and_sigterm_unmounts(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    data = pattern(6 * BLOCK, 4)
    vm = cloud.vm("dmg", [cloud.image("dmg-0", data)])
    b = backups_of(cloud, capsys, vm)
    manifests = cloud.tmp / "repo" / "manifests" / str(vm)
    (found,) = [mf.decode(p.read_bytes(), p.name) for p in manifests.iterdir()]
    chunk = found.maps[0].record(4).chunk
    assert chunk is not None
    path = cloud.tmp / "repo" / "chunks" / chunk.hex()[:2] / chunk.hex()
    stored = bytearray(path.read_bytes())
    stored[len(stored) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(stored))

    m = Mounted(cloud, cloud.tmp / "mnt", str(b), "0")
    try:
        fd = os.open(m.file, os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, BLOCK + 100) == data[BLOCK + 100:BLOCK + 4196]
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 4 * BLOCK + 8192)
            assert e.value.errno == errno.EIO
            # the process is still serving the other blocks
            assert os.pread(fd, 4096, 2 * BLOCK) == data[2 * BLOCK:2 * BLOCK + 4096]
        finally:
            os.close(fd)
        m.proc.send_signal(signal.SIGTERM)
        code, err = m.stop()
    finally:
        m.stop()
    assert code == 0, err
    assert not os.path.ismount(m.mountpoint)
    assert f"backup {b} disk 0 block 4" in err
    assert "Traceback" not in err and "internal error" not in err


@needs_fuse
def test_background_mount_returns_once_mounted(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    data = pattern(2 * BLOCK, 8)
    vm = cloud.vm("bg", [cloud.image("bg-0", data)])
    b = backups_of(cloud, capsys, vm)
    mnt = cloud.tmp / "mnt"
    mnt.mkdir()
    r = cloud.call("mount", str(b), "0", str(mnt), "--background", "--json")
    try:
        assert r.code == 0, r.err
        doc = r.json()
        assert doc["file"] == str(mnt / engine.FILE_NAME) and doc["size"] == len(data)
        assert (mnt / engine.FILE_NAME).read_bytes() == data
    finally:
        u = cloud.call("umount", str(mnt))
    assert u.code == 0, u.err
    deadline = time.monotonic() + 30
    while True:   # the background process ends once unmounted
        try:
            os.kill(doc["pid"], 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the background mount did not exit"
        time.sleep(0.05)


def test_bad_ids_and_mountpoints_are_one_line(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("ids", [cloud.image("ids-0", pattern(BLOCK, 1)), {"TYPE": "fs", "SIZE": 1}])
    b = backups_of(cloud, capsys, vm)
    empty = cloud.tmp / "empty"
    empty.mkdir()
    full = cloud.tmp / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases = [((str(b + 10), "0", str(empty)), 6, f"backup {b + 10}"),
             ((str(b), "9", str(empty)), 6, "no disk 9"),
             ((str(b), "1", str(empty)), 2, "volatile"),
             ((str(b), "0", str(full)), 2, "not empty"),
             ((str(b), "0", str(cloud.tmp / "missing")), 2, "does not exist"),
             ((str(b), "0", str(full / "x")), 2, "not a directory"),
             (("x", "0", str(empty)), 2, "not a backup id")]
    for args, code, text in cases:
        r = cloud.run("mount", *args, capsys=capsys)
        assert (r.code, r.out) == (code, ""), (args, r)
        assert r.err.count("\n") == 1 and text in r.err and "Traceback" not in r.err, args
    assert not any(empty.iterdir())
    r = cloud.run("umount", str(empty), capsys=capsys)
    assert r.code == 2 and r.err.count("\n") == 1 and "not a oneback mount" in r.err


def test_disk_image_reads_ranges_through_a_bounded_cache() -> None:
    store = MemoryStore()
    size, bs = 5 * 4096 + 100, 4096
    data = bytearray(pattern(size, 9))
    data[4096:8192] = bytes(4096)          # block 1 is a hole
    records = []
    for i in range(-(-size // bs)):
        block = bytes(data[i * bs:(i + 1) * bs])
        chunk = None if not any(block) else chunk_id_of(block)
        if chunk is not None:
            store.put(chunk, block)
        records.append(BlockRecord(i, xxhash.xxh3_128_digest(block), chunk))
    image = DiskImage.from_blocks(store, records, backup_id=1, disk_id=0, size=size,
                                  block_size=bs, cache_bytes=2 * bs)
    assert image.read(0, size + 10) == data and image.read(size, 10) == b""
    assert image.fetches == 5                          # the hole is never fetched
    assert image.read(4 * bs + 10, bs) == data[4 * bs + 10:5 * bs + 10]
    assert image.fetches == 5                          # blocks 4 and 5: still cached
    assert image.read(0, 10) == data[:10] and image.fetches == 6   # evicted, fetched again
    with pytest.raises(IntegrityError, match="backup 1 disk 0: the block map lacks block 2"):
        DiskImage.from_blocks(store, records[:2] + records[3:], backup_id=1, disk_id=0,
                              size=size, block_size=bs)
