"""A backed-up disk as random-access bytes, read from the repository.

Owns: which disk of a backup holds data (`data_disk`, `disk_kind`), the check
of one block's bytes against what the backup recorded (`fetch_block`: the
chunk is there, decodes, has the recorded length and xxh3-128), and
`DiskImage`: one disk's block map, packed (48 bytes a block), read at any
offset and length. A read fetches only the chunks its range covers, keeps
them in a bounded, thread-safe LRU cache (one fetch per chunk however many
threads ask for it at once), and reads holes as zeros; the size is exact.
Shared by export (the lookup), the writer (the check) and mount (the reads).
Must not: write anything, print, or import what talks to the cloud.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Protocol

import xxhash

from agent import policy
from agent.errors import IntegrityError, NotFound, UsageError
from agent.model import (
    CHECKSUM_SIZE,
    CHUNK_ID_SIZE,
    BackupRecord,
    BlockRecord,
    DiskBackup,
    block_count,
    block_length,
)
from agent.store import ChunkStore

MiB = 1024 * 1024
DEFAULT_CACHE_BYTES = 64 * MiB
_NO_CHUNK = bytes(CHUNK_ID_SIZE)


class BackupLookup(Protocol):
    def get_backup(self, backup_id: int) -> BackupRecord: ...


def disk_kind(disk: DiskBackup) -> str:
    """'volatile', 'excluded', 'readonly' (the original image is reused) or 'data'."""
    if disk.volatile:
        return "volatile"
    if disk.excluded:
        return "excluded"
    return "readonly" if policy.is_readonly(disk.attributes) else "data"


def data_disk(catalog: BackupLookup, backup_id: int, disk_id: int) -> tuple[BackupRecord,
                                                                              DiskBackup]:
    """The backup and its disk `disk_id`, which must hold data. NotFound for
    an unknown backup or disk, UsageError for a disk the backup holds no
    data of (volatile, excluded, read-only)."""
    backup = catalog.get_backup(backup_id)
    disk = next((d for d in backup.disks if d.disk_id == disk_id), None)
    if disk is None:
        raise NotFound(f"backup {backup_id} has no disk {disk_id}; 'oneback show {backup_id}'"
                       f" lists its disks")
    if disk_kind(disk) != "data":
        raise UsageError(f"disk {disk_id} of backup {backup_id} holds no data"
                         f" ({disk_kind(disk)})")
    return backup, disk


def fetch_block(store: ChunkStore, chunk: bytes, checksum: bytes, length: int,
                name: str) -> bytes:
    """The bytes of one block (`name`: "backup 5 disk 0 block 7 (chunk ..)"),
    checked against the length and xxh3-128 recorded at backup time.
    IntegrityError naming the block when the chunk is missing, damaged or
    does not match; RepositoryError when the repository cannot be read."""
    try:
        data = store.get(chunk)
    except NotFound as e:
        raise IntegrityError(f"{name} is missing from the repository") from e
    except IntegrityError as e:
        raise IntegrityError(f"{name}: {e}") from e
    if len(data) != length or xxhash.xxh3_128_digest(data) != checksum:
        raise IntegrityError(f"{name} does not match the checksum recorded at backup time")
    return data


class DiskImage:
    """One disk of one backup, readable at any offset: `read(offset, length)`.
    Thread-safe. Memory: the packed map (48 bytes a block) plus at most
    `cache_bytes` of blocks (and the blocks being read at that moment)."""

    def __init__(self, store: ChunkStore, *, backup_id: int, disk_id: int, size: int,
                 block_size: int, checksums: bytes | bytearray, chunks: bytes | bytearray,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.store = store
        self.backup_id, self.disk_id = backup_id, disk_id
        self.size, self.block_size = size, block_size
        self.where = f"backup {backup_id} disk {disk_id}"
        self._checksums, self._chunks = checksums, chunks
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()  # chunk id -> block, LRU first
        self._cached = 0
        self._loading: dict[bytes, Future[bytes]] = {}
        self.fetches = 0   # chunks read from the store (a cache miss each)

    @classmethod
    def from_blocks(cls, store: ChunkStore, blocks: Iterable[BlockRecord], *, backup_id: int,
                    disk_id: int, size: int, block_size: int,
                    cache_bytes: int = DEFAULT_CACHE_BYTES) -> DiskImage:
        """Pack a disk's full block map (index order, every index below the
        block count, as `Catalog.blocks` yields it). IntegrityError when the
        map has a gap, a stray block or ends early."""
        n = block_count(size, block_size)
        checksums = bytearray(CHECKSUM_SIZE * n)
        chunks = bytearray(CHUNK_ID_SIZE * n)
        expected = 0
        where = f"backup {backup_id} disk {disk_id}"
        for record in blocks:
            if record.index != expected or record.index >= n:
                raise IntegrityError(f"{where}: the block map lacks block {expected} or has a "
                                     f"stray block {record.index}; the catalog is damaged")
            checksums[expected * CHECKSUM_SIZE:(expected + 1) * CHECKSUM_SIZE] = record.checksum
            if record.chunk is not None:
                chunks[expected * CHUNK_ID_SIZE:(expected + 1) * CHUNK_ID_SIZE] = record.chunk
            expected += 1
        if expected != n:
            raise IntegrityError(f"{where}: the block map ends at block {expected} of {n}; "
                                 "the catalog is damaged")
        return cls(store, backup_id=backup_id, disk_id=disk_id, size=size,
                   block_size=block_size, checksums=checksums, chunks=chunks,
                   cache_bytes=cache_bytes)

    @property
    def block_count(self) -> int:
        return len(self._checksums) // CHECKSUM_SIZE

    def chunk(self, index: int) -> bytes | None:
        """The chunk id of block `index`, None for a hole."""
        chunk = bytes(self._chunks[index * CHUNK_ID_SIZE:(index + 1) * CHUNK_ID_SIZE])
        return None if chunk == _NO_CHUNK else chunk

    def read(self, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the disk, cut at its end (b"" at
        or past it). Raises IntegrityError (naming the block) when a block
        the range covers is missing or damaged, RepositoryError when the
        repository cannot be read; other ranges stay readable."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(self.size, offset + length)
        parts: list[bytes | memoryview] = []
        pos = offset
        while pos < end:
            index = pos // self.block_size
            start = index * self.block_size
            stop = min(end, start + block_length(self.size, self.block_size, index))
            chunk = self.chunk(index)
            if chunk is None:
                parts.append(bytes(stop - pos))
            else:
                parts.append(memoryview(self._block(index, chunk))[pos - start:stop - start])
            pos = stop
        return b"".join(parts)

    def _block(self, index: int, chunk: bytes) -> bytes:
        with self._lock:
            data = self._cache.get(chunk)
            if data is not None:
                self._cache.move_to_end(chunk)
                return data
            pending = self._loading.get(chunk)
            owner = pending is None
            if pending is None:
                pending = self._loading[chunk] = Future()
        if not owner:
            return pending.result()   # another thread is fetching it: its bytes or its error
        try:
            data = fetch_block(
                self.store, chunk,
                bytes(self._checksums[index * CHECKSUM_SIZE:(index + 1) * CHECKSUM_SIZE]),
                block_length(self.size, self.block_size, index),
                f"{self.where} block {index} (chunk {chunk.hex()})")
        except BaseException as e:
            with self._lock:
                del self._loading[chunk]
            pending.set_exception(e)   # not cached: the next read tries again
            raise
        with self._lock:
            del self._loading[chunk]
            self.fetches += 1
            self._cache[chunk] = data
            self._cached += len(data)
            while self._cached > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached -= len(old)
        pending.set_result(data)
        return data
