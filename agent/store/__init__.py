"""Chunk stores: where the bytes of a repository live.

Owns: the `ChunkStore` Protocol every backend implements (content-addressed
chunks keyed by the SHA-256 of their raw bytes), and the one chunk encoding
all backends share (zstd frame on the way in; decompress and verify the
SHA-256 on the way out). Must not: know about backups, disks, blocks or the
catalog; print; read configuration. Backends: `local.LocalStore` (a directory)
and `memory.MemoryStore` (tests). Consumers depend on the Protocol only.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import zstandard

from agent.errors import IntegrityError

Data = bytes | bytearray | memoryview
"""What `put` accepts: any contiguous bytes-like object, read only during the call."""

CHUNK_ID_SIZE = 32
DEFAULT_LEVEL = 3


@runtime_checkable
class ChunkStore(Protocol):
    """Content-addressed chunk storage. `chunk_id` is the SHA-256 of the raw
    (uncompressed) chunk. Implementations are safe to call from many threads."""

    def has(self, chunk_id: bytes) -> bool:
        """True if the chunk is stored (durable once a `flush` has returned
        after its `put`, when the backend is durable)."""
        ...

    def put(self, chunk_id: bytes, data: Data) -> int:
        """Store `data` under `chunk_id`. Idempotent and safe to race with
        itself. On return the chunk is complete to every reader (`get`,
        `has`, other processes); it is durable only once a later `flush`
        returns (a backend may make it durable sooner). Returns the bytes
        written to the backend, 0 if the chunk was already present. The
        caller vouches that `chunk_id` is the SHA-256 of `data`."""
        ...

    def flush(self) -> None:
        """Make every chunk put so far durable; on return a crash or power
        loss keeps them. Call it before anything that refers to the chunks
        is committed. Raises RepositoryError when the data may be lost."""
        ...

    def get(self, chunk_id: bytes) -> bytes:
        """The raw chunk. Raises NotFound if absent, IntegrityError if the
        stored bytes do not decode to data whose SHA-256 is `chunk_id`."""
        ...

    def delete(self, chunk_id: bytes) -> None:
        """Remove the chunk. Idempotent: deleting an absent chunk is a no-op."""
        ...

    def ids(self) -> Iterator[bytes]:
        """Every stored chunk id, in no particular order."""
        ...


def chunk_id_of(data: Data) -> bytes:
    """The id of a raw chunk: its SHA-256."""
    return hashlib.sha256(data).digest()


def check_chunk_id(chunk_id: bytes) -> None:
    """Reject anything that is not a 32-byte id (a caller bug, not bad data)."""
    if not isinstance(chunk_id, bytes) or len(chunk_id) != CHUNK_ID_SIZE:
        raise TypeError(f"a chunk id is 32 bytes (SHA-256), not {chunk_id!r:.80}")


class Codec:
    """zstd encoding of chunks. One compressor and decompressor per thread
    (zstandard objects must not be shared between threads)."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level
        self._local = threading.local()

    def encode(self, data: Data) -> bytes:
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
            self._local.c = compressor
        return bytes(compressor.compress(data))

    def decode(self, chunk_id: bytes, stored: bytes, where: str) -> bytes:
        """Decompress and verify; IntegrityError names the chunk and `where`."""
        decompressor: zstandard.ZstdDecompressor | None = getattr(self._local, "d", None)
        if decompressor is None:
            decompressor = zstandard.ZstdDecompressor()
            self._local.d = decompressor
        try:
            data = bytes(decompressor.decompress(stored))
        except zstandard.ZstdError as e:
            raise IntegrityError(
                f"chunk {chunk_id.hex()} in {where} is corrupt ({e}); "
                "run a repository check and back the affected VMs up again"
            ) from e
        if hashlib.sha256(data).digest() != chunk_id:
            raise IntegrityError(
                f"chunk {chunk_id.hex()} in {where} does not match its SHA-256; "
                "run a repository check and back the affected VMs up again"
            )
        return data
