"""Reading a disk into the repository: the backup side of the block pipeline.

Owns: cutting a device or file into fixed-size blocks (the last may be
short), checksumming each with xxh3-128, skipping those unchanged since the
previous backup, recording all-zero blocks as holes (never stored), and
storing the rest as chunks named by their SHA-256. Reading and hashing are
two thread pools joined by a bounded set of block buffers: `read_depth`
reader threads keep that many reads (of at most READ_SIZE each, in disk
order) in flight, which is what network block storage (Ceph RBD, iSCSI,
NFS) needs for its throughput, while `workers` threads checksum, compare,
compress and store whole blocks. Memory stays at the buffers, whatever the
disk size. The device is read with O_DIRECT where the filesystem allows it;
otherwise the pages of each block are dropped from the page cache once it
is done, so a backup does not evict what the proxy had cached. Must not:
touch the catalog or the cloud, or print (it reports through `progress`).
"""

from __future__ import annotations

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
READ_SIZE = 1024 * 1024  # bytes per read request (a block takes block_size / READ_SIZE)
DEFAULT_READ_DEPTH = 16
_READER_EXITED = -1  # a reader's last message to the calling thread
_HASHER_EXITED = -2  # a hashing worker's last message


class Source(Protocol):
    """Where a scan can read from besides a path or an fd: `read_at` fills
    `buf` from byte `offset` on and returns how many bytes it read (0 at
    the end), like os.preadv. Called from many threads at once."""

    def read_at(self, buf: memoryview, offset: int) -> int: ...


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
    direct: bool = False  # read with O_DIRECT (else buffered, pages dropped behind)

    @property
    def chunk_sizes(self) -> Mapping[bytes, int]:
        return StoredSizes(self.blocks)


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """The block checksum: xxh3-128, 16 bytes."""
    return bytes(xxhash.xxh3_128_digest(data))


def scan(
    source: int | str | Path | Source,
    size: int,
    block_size: int,
    previous: Previous | None,
    store: ChunkStore,
    *,
    full: bool = False,
    workers: int | None = None,
    read_depth: int = DEFAULT_READ_DEPTH,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    direct: bool = True,
    name: str | None = None,
) -> ScanResult:
    """Read `size` bytes of `source` (a path, opened through `devices`; an
    open fd, which stays open; or a Source) in blocks of `block_size` and
    store what changed since `previous` (ignored when `full`, or when its
    block size differs). A path is opened with O_DIRECT when `direct` and
    the filesystem and block size allow it. At most `read_depth` reads are
    in flight and `workers` threads hash and store. Every chunk a returned
    record names is in `store` on return (durable once `store.flush()`
    returns). `progress(n)` is called from the calling thread with the byte
    count of each block done. Raises DeviceError on a read error,
    Interrupted when `cancel` is set; store errors propagate."""
    if block_size <= 0 or size < 0 or read_depth < 1:
        raise InternalError(f"cannot scan {size} bytes in blocks of {block_size},"
                            f" {read_depth} reads at a time")
    owned = False
    if isinstance(source, (str, Path)):
        fd = devices.open_for_read(source, direct=direct and block_size % DIRECT_ALIGN == 0)
        label, owned = name or str(source), True
        read_at = _FdReader(fd).read_at
    elif isinstance(source, int):
        fd, label = source, name or f"fd {source}"
        read_at = _FdReader(fd).read_at
    else:
        fd, label = -1, name or repr(source)
        read_at = source.read_at
    try:
        aligned = fd >= 0 and devices.is_direct(fd)
        if aligned and block_size % DIRECT_ALIGN:
            raise InternalError(
                f"O_DIRECT reads need a block size that is a multiple of {DIRECT_ALIGN}"
            )
        usable = previous is not None and not full and previous.block_size == block_size
        scanner = _Scanner(read_at, fd, label, size, block_size, previous if usable else None,
                           store, aligned)
        return scanner.run(workers or os.cpu_count() or 1, read_depth, progress, cancel)
    finally:
        if owned:
            os.close(fd)


class _FdReader:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read_at(self, buf: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [buf], offset)


class _Block:
    """A block being read into one of the scan's buffers, a segment per read."""

    __slots__ = ("index", "buf", "length", "segments", "claimed", "pending")

    def __init__(self, index: int, buf: mmap.mmap, length: int, segment: int) -> None:
        self.index, self.buf, self.length = index, buf, length
        self.segments = max(1, -(-length // segment))
        self.claimed = 0
        self.pending = self.segments


class _Scanner:
    """One scan. Reader threads claim the next READ_SIZE segment in disk
    order (a new block takes a free buffer, waiting for one when all are
    busy) and read it; the reader that completes a block hands it to the
    hashing workers, which checksum and compare it (the fast path of an
    incremental ends here), then for a changed block run the zero test,
    SHA-256 and `store.put`, and give the buffer back. Buffers: enough for
    `read_depth` reads in flight plus one per worker. The calling thread
    only relays progress and watches `cancel`."""

    def __init__(self, read_at: Callable[[memoryview, int], int], fd: int, label: str,
                 size: int, block_size: int, previous: Previous | None, store: ChunkStore,
                 aligned: bool) -> None:
        self.read_at, self.fd, self.label = read_at, fd, label
        self.size, self.block_size = size, block_size
        self.previous, self.store, self.aligned = previous, store, aligned
        self.segment = min(READ_SIZE, block_size)
        self.count = block_count(size, block_size)
        self.zero_full = bytearray(block_size)
        self.zero_sum_full = checksum(self.zero_full)
        tail = block_length(size, block_size, self.count - 1) if size else 0
        self.zero_tail = bytearray(tail)
        self.zero_sum_tail = checksum(self.zero_tail)
        self.lock = threading.Lock()
        self.claim_lock = threading.Lock()  # held while a reader waits for a buffer
        self.next_index = 0
        self.current: _Block | None = None
        self.stop = threading.Event()
        self.done: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.ready: queue.SimpleQueue[_Block | None] = queue.SimpleQueue()
        self.free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self.buffers: list[mmap.mmap] = []
        self.max_buffers = 1
        # Records leave in index order: a block finished before an earlier
        # one waits in `waiting` (at most one per buffer); `finished` has
        # one byte per block.
        self.records = BlockList()
        self.finished = bytearray(self.count)
        self.waiting: dict[int, tuple[BlockRecord, int]] = {}
        self.next_out = 0
        self.bytes_changed = self.bytes_read = self.stored = 0

    def run(self, workers: int, depth: int, progress: Callable[[int], None] | None,
            cancel: threading.Event | None) -> ScanResult:
        workers = max(1, min(workers, self.count))
        per_block = max(1, self.block_size // self.segment)
        readers = max(1, min(depth, self.count * per_block))
        self.max_buffers = max(1, min(self.count, -(-readers // per_block) + workers))
        if cancel is not None and cancel.is_set():
            raise Interrupted(f"the scan of {self.label} was stopped")
        try:
            with ThreadPoolExecutor(readers + workers, thread_name_prefix="oneback-scan") as pool:
                futures = [pool.submit(self._reader) for _ in range(readers)]
                futures += [pool.submit(self._hasher) for _ in range(workers)]
                readers_left, hashers_left = readers, workers
                try:
                    while hashers_left:
                        try:
                            item = self.done.get(timeout=0.1)
                        except queue.Empty:
                            item = 0
                        if item == _READER_EXITED:
                            readers_left -= 1
                            if not readers_left:  # every block read: let the hashers go
                                for _ in range(workers):
                                    self.ready.put(None)
                        elif item == _HASHER_EXITED:
                            hashers_left -= 1
                        elif item and progress is not None:
                            progress(item)
                        if cancel is not None and cancel.is_set():
                            self.stop.set()
                finally:
                    self.stop.set()  # on any way out, threads finish their step and go
            for f in futures:
                f.result()  # the first error, if any
        finally:
            for buf in self.buffers:
                buf.close()
            self._drop_cache(0, self.size)
        if cancel is not None and cancel.is_set():
            raise Interrupted(f"the scan of {self.label} was stopped")
        if self.next_out != self.count or self.waiting:
            raise InternalError(f"the scan of {self.label} lost track of its blocks")
        return ScanResult(self.size, self.block_size, self.records, self.bytes_read,
                          self.bytes_changed, self.stored, self.aligned)

    # -- reading ------------------------------------------------------------------

    def _reader(self) -> None:
        try:
            while not self.stop.is_set():
                claim = self._claim()
                if claim is None:
                    return
                block, part = claim
                self._read(block, part)
                with self.lock:
                    block.pending -= 1
                    complete = block.pending == 0
                if complete:
                    self.ready.put(block)
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.done.put(_READER_EXITED)

    def _claim(self) -> tuple[_Block, int] | None:
        """The next segment to read, in disk order; None when there is none."""
        with self.claim_lock:
            block = self.current
            if block is None or block.claimed == block.segments:
                if self.next_index >= self.count:
                    return None
                buf = self._buffer()
                if buf is None:
                    return None
                index = self.next_index
                self.next_index += 1
                block = self.current = _Block(
                    index, buf, block_length(self.size, self.block_size, index), self.segment)
            part = block.claimed
            block.claimed += 1
            return block, part

    def _buffer(self) -> mmap.mmap | None:
        """A free block buffer (page aligned, for O_DIRECT); a new one while
        fewer than max_buffers exist; None once the scan stops."""
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        if len(self.buffers) < self.max_buffers:
            buf = mmap.mmap(-1, self.block_size)
            self.buffers.append(buf)
            return buf
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _read(self, block: _Block, part: int) -> None:
        start = part * self.segment
        length = min(self.segment, block.length - start)
        want = length
        if self.aligned:
            want = min(self.segment, -(-length // DIRECT_ALIGN) * DIRECT_ALIGN)
        offset = block.index * self.block_size + start
        got = 0
        with memoryview(block.buf) as whole, whole[start:start + want] as view:
            try:
                while got < length:
                    with view[got:want] as piece:  # released even if read_at raises
                        n = self.read_at(piece, offset + got)
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

    def _drop_cache(self, offset: int, length: int) -> None:
        """Buffered reads: drop what this scan brought into the page cache."""
        if self.fd < 0 or self.aligned or length <= 0:
            return
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only

    # -- hashing --------------------------------------------------------------

    def _hasher(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    block = self.ready.get(timeout=0.1)
                except queue.Empty:
                    continue
                if block is None:
                    return
                try:
                    self._block(block)
                finally:
                    self.free.put(block.buf)
                self._drop_cache(block.index * self.block_size, block.length)
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.done.put(_HASHER_EXITED)

    def _block(self, block: _Block) -> None:
        index, length = block.index, block.length
        with memoryview(block.buf) as whole, whole[:length] as view:
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
                chunk_id = self.store.chunk_id(view)
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
