"""Scanning real files (and a loop device when root can make one) into a store."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from agent import reader
from agent.catalog import Catalog
from agent.errors import DeviceError, Interrupted, RepositoryError
from agent.model import BlockRecord, DiskBackup, PreviousMap
from agent.store import Data
from agent.store.local import LocalStore
from agent.store.memory import MemoryStore

BS = 64 * 1024


def random_block(rng: random.Random) -> bytes:
    return rng.randbytes(BS // 2) + bytes(BS // 2)


def make_disk(path: Path, blocks: list[bytes]) -> bytes:
    data = b"".join(blocks)
    path.write_bytes(data)
    return data


def sample_blocks(seed: int = 1, n: int = 24) -> list[bytes]:
    """Random, zero and repeated blocks, like a real disk."""
    rng = random.Random(seed)
    blocks = []
    for i in range(n):
        if i % 5 == 0:
            blocks.append(bytes(BS))
        elif i % 7 == 0 and blocks:
            blocks.append(blocks[1])
        else:
            blocks.append(random_block(rng))
    return blocks


def as_previous(records: list[BlockRecord], size: int, block_size: int = BS) -> PreviousMap:
    """The map a catalog would hand back after committing these records."""
    records = sorted(records, key=lambda r: r.index)
    return PreviousMap(
        backup_id=1, disk_id=0, size=size, block_size=block_size,
        checksums=b"".join(r.checksum for r in records),
        chunks=b"".join(r.chunk or bytes(32) for r in records),
    )


def expected_record(index: int, block: bytes) -> BlockRecord:
    chunk = None if block == bytes(len(block)) else hashlib.sha256(block).digest()
    return BlockRecord(index, xxhash.xxh3_128_digest(block), chunk)


def test_first_scan_records_every_block_and_stores_each_content_once(tmp_path: Path) -> None:
    blocks = sample_blocks()
    blocks.append(blocks[2][: BS // 3])  # a short last block
    data = make_disk(tmp_path / "disk", blocks)
    store = MemoryStore()
    done: list[int] = []
    result = reader.scan(tmp_path / "disk", len(data), BS, None, store, workers=3,
                         progress=done.append)
    assert result.blocks == [expected_record(i, b) for i, b in enumerate(blocks)]
    assert result.bytes_read == result.bytes_changed == len(data) == sum(done)
    distinct = {hashlib.sha256(b).digest(): b for b in blocks if any(b)}
    assert set(store.ids()) == set(distinct)  # holes never stored, repeats once
    assert all(store.get(cid) == b for cid, b in distinct.items())
    assert result.chunk_sizes == {cid: len(store.blobs[cid]) for cid in distinct}
    assert result.bytes_stored == sum(result.chunk_sizes.values())


def test_incremental_records_only_changed_blocks(tmp_path: Path) -> None:
    blocks = sample_blocks(2)
    data = make_disk(tmp_path / "disk", blocks)
    store = MemoryStore()
    first = reader.scan(tmp_path / "disk", len(data), BS, None, store)
    stored_before = dict(store.blobs)

    rng = random.Random(3)
    blocks[3] = random_block(rng)   # new content
    blocks[4] = bytes(BS)           # became a hole
    blocks[5] = blocks[1]           # became a copy of stored content
    blocks[10] = blocks[10][:-1] + b"\x01"  # was a hole
    data = make_disk(tmp_path / "disk", blocks)
    second = reader.scan(tmp_path / "disk", len(data), BS, as_previous(first.blocks, len(data)),
                         store)
    assert second.blocks == [expected_record(i, blocks[i]) for i in (3, 4, 5, 10)]
    assert second.blocks[1].chunk is None
    assert second.bytes_read == len(data)
    assert second.bytes_changed == 4 * BS
    new = set(store.blobs) - set(stored_before)
    assert new == {hashlib.sha256(blocks[i]).digest() for i in (3, 10)}
    assert second.bytes_stored == sum(len(store.blobs[c]) for c in new)


def test_unchanged_disk_stores_nothing(tmp_path: Path) -> None:
    data = make_disk(tmp_path / "disk", sample_blocks(4))
    store = MemoryStore()
    first = reader.scan(tmp_path / "disk", len(data), BS, None, store)
    before = dict(store.blobs)
    again = reader.scan(tmp_path / "disk", len(data), BS, as_previous(first.blocks, len(data)),
                        store)
    assert again.blocks == [] and again.bytes_changed == again.bytes_stored == 0
    assert again.bytes_read == len(data)
    assert store.blobs == before


def test_full_and_other_block_size_ignore_previous(tmp_path: Path) -> None:
    data = make_disk(tmp_path / "disk", sample_blocks(5))
    store = MemoryStore()
    first = reader.scan(tmp_path / "disk", len(data), BS, None, store)
    prev = as_previous(first.blocks, len(data))
    full = reader.scan(tmp_path / "disk", len(data), BS, prev, store, full=True)
    assert full.blocks == first.blocks and full.bytes_stored == 0
    other = reader.scan(tmp_path / "disk", len(data), 2 * BS, prev, store)
    assert len(other.blocks) == len(data) // (2 * BS)


def test_grown_disk_and_changed_tail_length(tmp_path: Path) -> None:
    blocks = sample_blocks(6, 8)
    short = blocks[:3] + [bytes(BS // 2)]  # ends in a short hole
    old = make_disk(tmp_path / "disk", short)
    store = MemoryStore()
    first = reader.scan(tmp_path / "disk", len(old), BS, None, store)
    assert first.blocks[3] == expected_record(3, bytes(BS // 2))
    grown = blocks[:3] + [bytes(BS)] * 2  # the short hole is now a full one
    data = make_disk(tmp_path / "disk", grown)
    second = reader.scan(tmp_path / "disk", len(data), BS, as_previous(first.blocks, len(old)),
                         store)
    assert [r.index for r in second.blocks] == [3, 4]
    assert all(r.chunk is None for r in second.blocks)


def test_scan_from_an_open_fd_leaves_it_open(tmp_path: Path) -> None:
    data = make_disk(tmp_path / "disk", sample_blocks(7, 4))
    fd = os.open(tmp_path / "disk", os.O_RDONLY)
    try:
        result = reader.scan(fd, len(data), BS, None, MemoryStore(), name="the test disk")
        assert len(result.blocks) == 4
        assert os.pread(fd, 1, 0) == data[:1]
    finally:
        os.close(fd)


def test_direct_io_gives_the_same_result(tmp_path: Path) -> None:
    blocks = sample_blocks(8)
    blocks.append(os.urandom(4096 + 100))  # a short, unaligned tail
    data = make_disk(tmp_path / "disk", blocks)
    buffered = reader.scan(tmp_path / "disk", len(data), BS, None, MemoryStore())
    direct = reader.scan(tmp_path / "disk", len(data), BS, None, MemoryStore(), direct=True)
    assert direct.blocks == buffered.blocks


def test_results_do_not_depend_on_worker_count(tmp_path: Path) -> None:
    data = make_disk(tmp_path / "disk", sample_blocks(9, 40))
    one = reader.scan(tmp_path / "disk", len(data), BS, None, MemoryStore(), workers=1)
    many = reader.scan(tmp_path / "disk", len(data), BS, None, MemoryStore(), workers=8)
    assert one == many


def test_a_disk_shorter_than_announced_is_a_device_error(tmp_path: Path) -> None:
    data = make_disk(tmp_path / "disk", sample_blocks(10, 4))
    with pytest.raises(DeviceError, match=r"disk ended at byte 262144.*shrink"):
        reader.scan(tmp_path / "disk", len(data) + BS, BS, None, MemoryStore())


def test_a_read_error_is_a_device_error_naming_the_device(tmp_path: Path) -> None:
    (tmp_path / "not-a-disk").mkdir()
    with pytest.raises(DeviceError, match="cannot read .*not-a-disk at byte 0"):
        reader.scan(tmp_path / "not-a-disk", BS, BS, None, MemoryStore())
    with pytest.raises(DeviceError, match="cannot open"):
        reader.scan(tmp_path / "absent", BS, BS, None, MemoryStore())


class SlowStore(MemoryStore):
    """A store whose writes take time, counting how many run at once."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.running = self.peak = self.calls = 0
        self.fail_at = fail_at

    def put(self, chunk_id: bytes, data: Data) -> int:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.peak = max(self.peak, self.running)
            failing = self.calls == self.fail_at
        try:
            time.sleep(0.01)
            if failing:
                raise RepositoryError("the repository disk is full")
            return super().put(chunk_id, data)
        finally:
            with self.lock:
                self.running -= 1


def test_cancel_stops_the_scan(tmp_path: Path) -> None:
    rng = random.Random(11)
    data = make_disk(tmp_path / "disk", [random_block(rng) for _ in range(40)])
    cancel = threading.Event()
    seen: list[int] = []

    def progress(n: int) -> None:
        seen.append(n)
        if len(seen) == 5:
            cancel.set()

    store = SlowStore()
    with pytest.raises(Interrupted):
        reader.scan(tmp_path / "disk", len(data), BS, None, store, progress=progress,
                    cancel=cancel, workers=2)
    assert store.calls < 10  # the workers stopped after their current block
    cancel_first = threading.Event()
    cancel_first.set()
    with pytest.raises(Interrupted):
        reader.scan(tmp_path / "disk", len(data), BS, None, store, cancel=cancel_first)
    assert store.calls < 10


def test_store_writes_overlap_but_stay_bounded(tmp_path: Path) -> None:
    rng = random.Random(12)
    data = make_disk(tmp_path / "disk", [random_block(rng) for _ in range(60)])
    store = SlowStore()
    reader.scan(tmp_path / "disk", len(data), BS, None, store, workers=4)
    assert 1 < store.peak <= 4  # parallel, and never more than the pool
    assert store.calls == 60


def test_store_error_stops_the_scan(tmp_path: Path) -> None:
    rng = random.Random(13)
    data = make_disk(tmp_path / "disk", [random_block(rng) for _ in range(30)])
    store = SlowStore(fail_at=7)
    with pytest.raises(RepositoryError, match="full"):
        reader.scan(tmp_path / "disk", len(data), BS, None, store, workers=2)
    assert store.calls < 30


def test_scan_commit_previous_round_trip(tmp_path: Path) -> None:
    """The reader's records, committed and read back, drive the next scan."""
    blocks = sample_blocks(14, 32)
    data = make_disk(tmp_path / "disk", blocks)
    store = LocalStore.init(tmp_path / "repo")
    with Catalog.open(tmp_path / "catalog.sqlite") as cat:
        for round_ in range(3):
            prev = cat.previous_map(1, 0)
            scanned = data
            result = reader.scan(tmp_path / "disk", len(data), BS, prev, store)
            cat.commit_backup(
                vm_id=1, vm_name="vm", kind="incremental" if prev else "full", started=0,
                finished=1, vm_document="<VM/>", image_documents={},
                disks=[DiskBackup(0, len(data), BS, 7, False, False)],
                blocks={0: result.blocks}, chunk_sizes=result.chunk_sizes)
            if round_ > 0:
                assert [r.index for r in result.blocks] == [round_]
            blocks[round_ + 1] = random_block(random.Random(round_))
            data = make_disk(tmp_path / "disk", blocks)
        last = cat.list_backups()[-1].id
        restored = b"".join(
            store.get(r.chunk) if r.chunk else bytes(BS) for r in cat.blocks(last, 0)
        )
    assert restored == scanned


# -- a real block device --------------------------------------------------------------


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    backing = tmp_path / "backing"
    make_disk(backing, sample_blocks(15, 32))
    made = subprocess.run(["losetup", "--find", "--show", str(backing)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a loop device: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", str(device)], check=False)


@pytest.mark.loop
def test_scan_of_a_loop_device_matches_its_file(loop_device: tuple[Path, Path]) -> None:
    device, backing = loop_device
    size = backing.stat().st_size
    from_file = reader.scan(backing, size, BS, None, MemoryStore())
    from_device = reader.scan(device, size, BS, None, MemoryStore(), direct=True)
    assert from_device.blocks == from_file.blocks


# -- deep reads, no cache pollution -------------------------------------------------


class SlowSource:
    """A disk behind a network: each read takes `latency` seconds; counts the
    reads in flight at once and which block each read was for. With `hold`,
    reads wait (once, at most 5 s) until that many were in flight at once, so a
    loaded machine's slow thread start does not hide the pipeline's depth."""

    def __init__(self, data: bytes, latency: float, hold: int = 0) -> None:
        self.data, self.latency = data, latency
        self.lock = threading.Lock()
        self.in_flight = self.peak = self.reads = 0
        self.highest = -1  # the furthest block read so far
        self.started: set[int] = set()   # every block a read has begun for
        self.held = threading.Event()
        if not hold:
            self.held.set()
        self.hold = hold

    def read_at(self, buf: memoryview, offset: int) -> int:
        with self.lock:
            self.in_flight += 1
            self.reads += 1
            self.peak = max(self.peak, self.in_flight)
            self.highest = max(self.highest, offset // BS)
            self.started.add(offset // BS)
            if self.in_flight >= self.hold:
                self.held.set()
        try:
            if not self.held.wait(timeout=5):
                self.held.set()  # never got that deep: let the rest through, the test fails
            time.sleep(self.latency)
            piece = self.data[offset:offset + len(buf)]
            buf[:len(piece)] = piece
            return len(piece)
        finally:
            with self.lock:
                self.in_flight -= 1


def numbered_blocks(n: int) -> list[bytes]:
    """Distinct blocks that say which block they are in their first 8 bytes."""
    return [i.to_bytes(8, "big") + random.Random(i).randbytes(BS // 2 - 8) + bytes(BS // 2)
            for i in range(n)]


def test_reads_in_flight_reach_read_depth_with_one_hashing_worker(tmp_path: Path) -> None:
    data = make_disk(tmp_path / "disk", numbered_blocks(24))
    expected = reader.scan(tmp_path / "disk", len(data), BS, None, MemoryStore())
    for depth in (1, 8):
        source = SlowSource(data, latency=0.01, hold=depth)
        result = reader.scan(source, len(data), BS, None, MemoryStore(), workers=1,
                             read_depth=depth)
        assert source.peak == depth, f"read_depth {depth}: {source.peak} reads at once"
        assert result.blocks == expected.blocks and source.reads == 24


def test_reads_are_read_size_requests_whatever_the_block_size(tmp_path: Path) -> None:
    block = 4 * reader.READ_SIZE
    data = os.urandom(block) + bytes(block) + os.urandom(block // 2)
    source = SlowSource(data, latency=0.01, hold=6)
    result = reader.scan(source, len(data), block, None, MemoryStore(), workers=1,
                         read_depth=6)
    assert source.reads == 4 + 4 + 2 and source.peak == 6
    assert result.blocks == reader.scan(_file(tmp_path, data), len(data), block, None,
                                        MemoryStore()).blocks


def _file(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "disk").write_bytes(data)
    return tmp_path / "disk"


class SlowCountingStore(MemoryStore):
    """A store whose writes are slow; notes how far the reads ran ahead of
    the block being stored (the numbered blocks say which one that is)."""

    def __init__(self, source: SlowSource) -> None:
        super().__init__()
        self.source, self.ahead, self.stored = source, 0, 0
        self.count_lock = threading.Lock()

    def put(self, chunk_id: bytes, data: Data) -> int:
        # blocks read (or being read) and not yet stored: each holds a buffer.
        # (Not the distance from the block stored to the furthest read: reads
        # finish out of order, so a slow block may be stored after later ones
        # whose buffers were already reused.)
        with self.source.lock, self.count_lock:
            self.ahead = max(self.ahead, len(self.source.started) - self.stored)
        time.sleep(0.01)
        written = super().put(chunk_id, data)
        with self.count_lock:
            self.stored += 1
        return written


def test_reading_ahead_is_bounded_by_the_buffers(tmp_path: Path) -> None:
    data = b"".join(numbered_blocks(60))
    source = SlowSource(data, latency=0.0)
    store = SlowCountingStore(source)
    reader.scan(source, len(data), BS, None, store, workers=1, read_depth=4)
    # read_depth reads in flight plus one block per hashing worker, never more
    assert 1 <= store.ahead <= 4 + 1


def cached(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux fincore, i.e. mincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                          str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def evicted_file(path: Path, size: int) -> bytes:
    """A file of `size` random bytes, written back and out of the page cache."""
    data = os.urandom(size // 2) + bytes(size // 4) + os.urandom(size - size // 2 - size // 4)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fdatasync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return data


def direct_supported(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not shutil.which("fincore"), reason="needs util-linux fincore")
def test_a_scan_leaves_the_page_cache_as_it_found_it(tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    disk = tmp_path / "disk"
    evicted_file(disk, size)
    if cached(disk) > size // 8:
        pytest.skip(f"{tmp_path} keeps file pages cached (tmpfs?): nothing to measure")
    if not direct_supported(disk):
        pytest.skip(f"the filesystem of {tmp_path} has no O_DIRECT (tmpfs?)")
    block = 4 * 1024 * 1024
    direct = reader.scan(disk, size, block, None, MemoryStore(), workers=2)
    assert direct.direct  # O_DIRECT chosen where the filesystem supports it
    assert cached(disk) < size // 16
    buffered = reader.scan(disk, size, block, None, MemoryStore(), workers=2, direct=False)
    assert not buffered.direct and buffered.blocks == direct.blocks
    assert cached(disk) < size // 16  # pages dropped behind the reader
    odd = reader.scan(disk, size, block + 512, None, MemoryStore(), workers=2)
    assert not odd.direct  # O_DIRECT needs 4 KiB multiples: buffered instead
    with open(disk, "rb") as f:  # what a plain read does: the measurement can see it
        while f.read(block):
            pass
    assert cached(disk) > size // 2


@pytest.mark.skipif(not shutil.which("fincore"), reason="needs util-linux fincore")
def test_a_restore_does_not_leave_its_writes_in_the_page_cache(tmp_path: Path) -> None:
    from agent import writer

    size = 64 * 1024 * 1024
    block = 4 * 1024 * 1024
    source = tmp_path / "disk"
    data = evicted_file(source, size)
    store = MemoryStore()
    scanned = reader.scan(source, size, block, None, store)
    target = tmp_path / "restored"
    writer.write_disk(target, scanned.blocks, store, size=size, block_size=block,
                      where="test", workers=2)
    assert cached(target) < size // 8
    assert target.read_bytes() == data
