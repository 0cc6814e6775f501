"""A chunk store in memory, for tests and dry runs.

Owns: a dict of encoded chunks behind the `ChunkStore` Protocol, with the same
encoding and verification as every other backend. Must not: be used for
anything that has to survive the process.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from agent.errors import IntegrityError, NotFound, RepositoryError
from agent.store import (
    DEFAULT_LEVEL,
    Codec,
    Data,
    LockedCodec,
    check_chunk_id,
    check_key_name,
    check_manifest_name,
)


class MemoryStore:
    """Thread-safe. `blobs` maps chunk id to the stored (compressed) bytes;
    it is public so tests can inspect or damage what is stored."""

    def __init__(self, level: int = DEFAULT_LEVEL, codec: Codec | None = None,
                 encryption: str = "none") -> None:
        self.encryption = encryption
        self.blobs: dict[bytes, bytes] = {}
        self.manifest_blobs: dict[str, bytes] = {}
        self.key_blobs: dict[str, bytes] = {}
        self.quarantined: list[tuple[bytes, bytes]] = []   # (chunk id, its damaged bytes)
        self._codec = codec if codec is not None else (
            Codec(level) if encryption == "none" else LockedCodec(encryption))
        self._lock = threading.Lock()

    def chunk_id(self, data: Data) -> bytes:
        return self._codec.chunk_id(data)

    def has(self, chunk_id: bytes) -> bool:
        check_chunk_id(chunk_id)
        with self._lock:
            return chunk_id in self.blobs

    def put(self, chunk_id: bytes, data: Data) -> int:
        check_chunk_id(chunk_id)
        with self._lock:
            if chunk_id in self.blobs:
                return 0
        encoded = self._codec.encode(data, chunk_id)
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

    def _damaged(self, chunk_id: bytes, stored: bytes) -> bool:
        try:
            self._codec.decode(chunk_id, stored, "the memory store")
        except IntegrityError:
            return True
        return False

    def quarantine(self, chunk_id: bytes) -> bool:
        check_chunk_id(chunk_id)
        with self._lock:
            stored = self.blobs.get(chunk_id)
            if stored is None or not self._damaged(chunk_id, stored):
                return False
            del self.blobs[chunk_id]
            self.quarantined.append((chunk_id, stored))
        return True

    def heal(self, chunk_id: bytes, data: Data) -> int:
        check_chunk_id(chunk_id)
        with self._lock:
            stored = self.blobs.get(chunk_id)
        if stored is not None and self._damaged(chunk_id, stored):
            self.quarantine(chunk_id)
        return self.put(chunk_id, data)

    def put_manifest(self, name: str, data: bytes) -> int:
        check_manifest_name(name)
        with self._lock:
            if name in self.manifest_blobs:
                raise RepositoryError(f"manifest {name} already exists in the memory store")
            self.manifest_blobs[name] = self._codec.seal(data, name)
        return len(data)

    def get_manifest(self, name: str) -> bytes:
        check_manifest_name(name)
        with self._lock:
            data = self.manifest_blobs.get(name)
        if data is None:
            raise NotFound(f"manifest {name} is not in the memory store")
        return self._codec.unseal(data, f"manifest {name}", name)

    def delete_manifest(self, name: str) -> None:
        check_manifest_name(name)
        with self._lock:
            self.manifest_blobs.pop(name, None)

    def manifests(self) -> Iterator[str]:
        with self._lock:
            return iter(sorted(self.manifest_blobs))

    def use_codec(self, codec: Codec) -> None:
        """See LocalStore.use_codec."""
        self._codec = codec

    def put_key(self, name: str, data: bytes) -> int:
        check_key_name(name)
        with self._lock:
            if name in self.key_blobs:
                raise RepositoryError(f"key {name} already exists in the memory store")
            self.key_blobs[name] = bytes(data)
        return len(data)

    def get_key(self, name: str) -> bytes:
        check_key_name(name)
        with self._lock:
            data = self.key_blobs.get(name)
        if data is None:
            raise NotFound(f"key {name} is not in the memory store")
        return data

    def delete_key(self, name: str) -> None:
        check_key_name(name)
        with self._lock:
            self.key_blobs.pop(name, None)

    def key_names(self) -> list[str]:
        with self._lock:
            return sorted(self.key_blobs)

    def __repr__(self) -> str:
        return f"MemoryStore({len(self.blobs)} chunks)"
