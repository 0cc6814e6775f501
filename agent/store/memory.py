"""A chunk store in memory, for tests and dry runs.

Owns: a dict of encoded chunks behind the `ChunkStore` Protocol, with the same
encoding and verification as every other backend. Must not: be used for
anything that has to survive the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from agent.errors import NotFound
from agent.store import DEFAULT_LEVEL, Codec, Data, check_chunk_id


class MemoryStore:
    """Thread-safe. `blobs` maps chunk id to the stored (compressed) bytes;
    it is public so tests can inspect or damage what is stored."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.blobs: dict[bytes, bytes] = {}
        self._codec = Codec(level)
        self._lock = threading.Lock()

    def has(self, chunk_id: bytes) -> bool:
        check_chunk_id(chunk_id)
        with self._lock:
            return chunk_id in self.blobs

    def put(self, chunk_id: bytes, data: Data) -> int:
        check_chunk_id(chunk_id)
        with self._lock:
            if chunk_id in self.blobs:
                return 0
        encoded = self._codec.encode(data)
        with self._lock:
            if chunk_id in self.blobs:
                return 0
            self.blobs[chunk_id] = encoded
        return len(encoded)

    def flush(self) -> None:
        """Nothing to do: a memory store is never durable."""

    def get(self, chunk_id: bytes) -> bytes:
        check_chunk_id(chunk_id)
        with self._lock:
            stored = self.blobs.get(chunk_id)
        if stored is None:
            raise NotFound(f"chunk {chunk_id.hex()} is not in the memory store")
        return self._codec.decode(chunk_id, stored, "the memory store")

    def delete(self, chunk_id: bytes) -> None:
        check_chunk_id(chunk_id)
        with self._lock:
            self.blobs.pop(chunk_id, None)

    def ids(self) -> Iterator[bytes]:
        with self._lock:
            snapshot = list(self.blobs)
        return iter(snapshot)

    def __repr__(self) -> str:
        return f"MemoryStore({len(self.blobs)} chunks)"
