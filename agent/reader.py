"""Reading a disk into the repository: the backup side of the block pipeline.

Owns: cutting a device or file into fixed-size blocks (the last may be
short), checksumming each with xxh3-128, skipping those unchanged since the
previous backup, recording all-zero blocks as holes (never stored), and
storing the rest as chunks named by their SHA-256. Reading, hashing,
compressing and writing overlap: worker threads each take the next block in
disk order through the whole pipeline, so the device always has reads in
flight and memory stays at one block buffer per worker whatever the disk
size. Must not: touch the catalog or the cloud, or print (it reports
through `progress`).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import xxhash

from agent import devices
from agent.errors import DeviceError, InternalError, Interrupted
from agent.model import BlockList, BlockRecord, block_count, block_length
from agent.model import PreviousMap as PreviousMap  # re-exported: what `scan` diffs against
from agent.store import ChunkStore

DIRECT_ALIGN = 4096
_EXITED = -1  # a worker's last message to the calling thread


class Previous(Protocol):
    """What a scan needs of the previous backup of the disk (a PreviousMap)."""

    @property
    def size(self) -> int: ...

    @property
    def block_size(self) -> int: ...

    def checksum(self, index: int) -> bytes | None: ...


class StoredSizes(Mapping[bytes, int]):
    """chunk id -> stored size of each chunk a scan wrote: a view of its
    BlockList (no copy; a lookup walks the list, so read it whole)."""

    def __init__(self, blocks: BlockList) -> None:
        self._blocks = blocks

    def _pairs(self) -> Iterator[tuple[bytes, int]]:
        seen: set[bytes] = set()
        for record, stored in self._blocks.with_stored():
            if stored and record.chunk is not None and record.chunk not in seen:
                seen.add(record.chunk)
                yield record.chunk, stored

    def __getitem__(self, chunk: bytes) -> int:
        for c, stored in self._pairs():
            if c == chunk:
                return stored
        raise KeyError(chunk)

    def __iter__(self) -> Iterator[bytes]:
        return (c for c, _ in self._pairs())

    def __len__(self) -> int:
        return sum(1 for _ in self._pairs())


@dataclass(frozen=True)
class ScanResult:
    """What one scan found. `blocks` holds only the blocks that differ from
    the previous backup (every block when full or without one), in index
    order, packed (BLOCK_RECORD_BYTES each, with the stored size of each
    chunk this scan wrote); `chunk_sizes` shows those sizes by chunk id."""

    size: int
    block_size: int
    blocks: BlockList
    bytes_read: int
    bytes_changed: int
    bytes_stored: int

    @property
    def chunk_sizes(self) -> Mapping[bytes, int]:
        return StoredSizes(self.blocks)


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """The block checksum: xxh3-128, 16 bytes."""
    return bytes(xxhash.xxh3_128_digest(data))


def scan(
    source: int | str | Path,
    size: int,
    block_size: int,
    previous: Previous | None,
    store: ChunkStore,
    *,
    full: bool = False,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    direct: bool = False,
    name: str | None = None,
) -> ScanResult:
    """Read `size` bytes of `source` (an open fd, which stays open, or a path,
    opened through `devices`) in blocks of `block_size` and store what changed
    since `previous` (ignored when `full`, or when its block size differs).
    Every chunk a returned record names is in `store` on return (durable
    once `store.flush()` returns).
    `progress(n)` is called from the calling thread with the byte count of
    each block done. Raises DeviceError on a read error, Interrupted when
    `cancel` is set; store errors propagate."""
    if block_size <= 0 or size < 0:
        raise InternalError(f"cannot scan {size} bytes in blocks of {block_size}")
    if isinstance(source, int):
        fd, label, owned = source, name or f"fd {source}", False
    else:
        fd, label, owned = devices.open_for_read(source, direct=direct), name or str(source), True
    try:
        aligned = devices.is_direct(fd)
        if aligned and block_size % DIRECT_ALIGN:
            raise InternalError(
                f"O_DIRECT reads need a block size that is a multiple of {DIRECT_ALIGN}"
            )
        usable = previous is not None and not full and previous.block_size == block_size
        scanner = _Scanner(fd, label, size, block_size, previous if usable else None, store,
                           aligned)
        return scanner.run(workers or os.cpu_count() or 1, progress, cancel)
    finally:
        if owned:
            os.close(fd)


class _Scanner:
    """One scan. Each worker thread claims the next block in disk order and
    takes it all the way: read into its own buffer, checksum, compare (the
    fast path of an incremental ends here, with the data still in the CPU
    cache), then for a changed block the zero test, SHA-256 and `store.put`.
    While one worker hashes or compresses, the others' reads keep the device
    busy, so reading, hashing, compressing and writing overlap; memory is one
    block buffer per worker. The calling thread only relays progress and
    watches `cancel`."""

    def __init__(self, fd: int, label: str, size: int, block_size: int,
                 previous: Previous | None, store: ChunkStore, aligned: bool) -> None:
        self.fd, self.label, self.size, self.block_size = fd, label, size, block_size
        self.previous, self.store, self.aligned = previous, store, aligned
        self.count = block_count(size, block_size)
        self.zero_full = bytearray(block_size)
        self.zero_sum_full = checksum(self.zero_full)
        tail = block_length(size, block_size, self.count - 1) if size else 0
        self.zero_tail = bytearray(tail)
        self.zero_sum_tail = checksum(self.zero_tail)
        self.lock = threading.Lock()
        self.next_index = 0
        self.stop = threading.Event()
        self.done: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Records leave in index order: a block finished before an earlier
        # one waits in `waiting` (at most a few per worker); `finished` has
        # one byte per block.
        self.records = BlockList()
        self.finished = bytearray(self.count)
        self.waiting: dict[int, tuple[BlockRecord, int]] = {}
        self.next_out = 0
        self.bytes_changed = self.bytes_read = self.stored = 0

    def run(self, workers: int, progress: Callable[[int], None] | None,
            cancel: threading.Event | None) -> ScanResult:
        workers = max(1, min(workers, self.count))
        if cancel is not None and cancel.is_set():
            raise Interrupted(f"the scan of {self.label} was stopped")
        with ThreadPoolExecutor(workers, thread_name_prefix="oneback-scan") as pool:
            futures = [pool.submit(self._worker) for _ in range(workers)]
            exited = 0
            try:
                while exited < workers:
                    try:
                        item = self.done.get(timeout=0.1)
                    except queue.Empty:
                        item = 0
                    if item == _EXITED:
                        exited += 1
                    elif item and progress is not None:
                        progress(item)
                    if cancel is not None and cancel.is_set():
                        self.stop.set()
            finally:
                self.stop.set()  # on any way out, workers finish their block and go
        for f in futures:
            f.result()  # the first worker error, if any
        if cancel is not None and cancel.is_set():
            raise Interrupted(f"the scan of {self.label} was stopped")
        if self.next_out != self.count or self.waiting:
            raise InternalError(f"the scan of {self.label} lost track of its blocks")
        return ScanResult(self.size, self.block_size, self.records, self.bytes_read,
                          self.bytes_changed, self.stored)

    def _worker(self) -> None:
        buf = mmap.mmap(-1, self.block_size)  # page aligned, for O_DIRECT
        try:
            while not self.stop.is_set():
                with self.lock:
                    index = self.next_index
                    self.next_index += 1
                if index >= self.count:
                    return
                self._block(buf, index)
        except BaseException:
            self.stop.set()
            raise
        finally:
            buf.close()
            self.done.put(_EXITED)

    def _block(self, buf: mmap.mmap, index: int) -> None:
        length = self._read(buf, index)
        with memoryview(buf) as whole, whole[:length] as view:
            digest = checksum(view)
            prev = self.previous
            record: BlockRecord | None = None
            written = 0
            if (prev is not None
                    and block_length(prev.size, prev.block_size, index) == length
                    and prev.checksum(index) == digest):
                pass  # unchanged: the fast path
            elif self._is_zero(digest, view, length):
                record = BlockRecord(index, digest, None)
            else:
                chunk_id = hashlib.sha256(view).digest()
                written = self.store.put(chunk_id, view)
                record = BlockRecord(index, digest, chunk_id)
        with self.lock:
            self.bytes_read += length
            self.stored += written
            if record is not None:
                self.bytes_changed += length
                self.waiting[index] = (record, written)
            self.finished[index] = 1
            while self.next_out < self.count and self.finished[self.next_out]:
                done = self.waiting.pop(self.next_out, None)
                if done is not None:
                    self.records.append(*done)
                self.next_out += 1
        self.done.put(length)

    def _is_zero(self, digest: bytes, view: memoryview, length: int) -> bool:
        if length == self.block_size:
            return digest == self.zero_sum_full and self.zero_full == view
        return digest == self.zero_sum_tail and self.zero_tail == view

    def _read(self, buf: mmap.mmap, index: int) -> int:
        offset = index * self.block_size
        length = block_length(self.size, self.block_size, index)
        want = length
        if self.aligned:
            want = min(self.block_size, -(-length // DIRECT_ALIGN) * DIRECT_ALIGN)
        got = 0
        with memoryview(buf) as view:
            try:
                while got < length:
                    n = os.preadv(self.fd, [view[got:want]], offset + got)
                    if n == 0:
                        raise DeviceError(
                            f"{self.label} ended at byte {offset + got} but should hold "
                            f"{self.size} bytes; did the disk shrink or get detached?"
                        )
                    got += n
            except OSError as e:
                raise DeviceError(
                    f"cannot read {self.label} at byte {offset + got}: {e.strerror or e}"
                ) from e
        return length
