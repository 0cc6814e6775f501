"""Chunk stores: where the bytes of a repository live.

Owns: the `ChunkStore` Protocol every backend implements (content-addressed
chunks keyed by the SHA-256 of their raw bytes), and the one chunk encoding
all backends share (zstd frame on the way in; decompress and verify the
SHA-256 on the way out). Must not: know about backups, disks, blocks or the
catalog; print; read configuration. Backends: `local.LocalStore` (a directory),
`s3.S3Store` (a bucket and prefix) and `memory.MemoryStore` (tests).
Consumers depend on the Protocol only.

A prune needs more of a backend than a backup does: `Maintainable` (touch,
list chunks with their last use, retire, the repository's clock, running
markers), implemented by the local and the S3 backend; `Backend` is a whole
repository a command opens.

Beside the chunks, a repository holds manifests (`ManifestStore`): immutable
named blobs, one per backup, whose bytes the store does not interpret
(`agent.manifest` encodes them). `Repository` is both. An encrypted
repository's backends take `encryption.EncryptingCodec` (keyed chunk ids,
AES-256-GCM) and hold key blobs beside (`agent.keys`).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import zstandard

from agent.errors import IntegrityError, InternalError

Data = bytes | bytearray | memoryview
"""What `put` accepts: any contiguous bytes-like object, read only during the call."""

CHUNK_ID_SIZE = 32
DEFAULT_LEVEL = 3


@runtime_checkable
class ChunkStore(Protocol):
    """Content-addressed chunk storage. `chunk_id` is the SHA-256 of the raw
    (uncompressed) chunk. Implementations are safe to call from many threads."""

    def chunk_id(self, data: Data) -> bytes:
        """The id this store gives the raw chunk `data`: its SHA-256 (a keyed
        hash where the repository is encrypted, so ids reveal no content)."""
        ...

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

    def quarantine(self, chunk_id: bytes) -> bool:
        """Move the chunk aside if its stored bytes are (still) damaged: it is
        kept, for inspection, but no longer stored (`has` is False, `get`
        raises NotFound, a later `put` writes it anew). Returns True if it was
        moved; False if it is absent or reads back whole (healed meanwhile)."""
        ...

    def heal(self, chunk_id: bytes, data: Data) -> int:
        """`put`, but a chunk already stored is read back first and, if it
        does not decode to `chunk_id`, quarantined and written anew. Costs a
        read of every present chunk (a `--full` backup's way to repair)."""
        ...


@runtime_checkable
class ManifestStore(Protocol):
    """Immutable named blobs (a backup's manifest). A name is one to three
    `/`-separated segments of letters, digits, `_`, `-` and `.` (not first),
    e.g. `17/20261201T221530Z-4f2a9c1b0d3e`. Names are chosen by the writer
    so that writers with separate catalogs never collide."""

    def put_manifest(self, name: str, data: bytes) -> int:
        """Store `data` under `name`: complete and durable on return, never
        visible partially written. A name is written once: RepositoryError if
        it already exists. Returns the bytes written."""
        ...

    def get_manifest(self, name: str) -> bytes:
        """The bytes stored under `name`; NotFound if there is none."""
        ...

    def delete_manifest(self, name: str) -> None:
        """Remove the manifest. Idempotent."""
        ...

    def manifests(self) -> Iterator[str]:
        """Every stored manifest name, sorted."""
        ...


@runtime_checkable
class Repository(ChunkStore, ManifestStore, Protocol):
    """A whole repository: chunks and manifests."""


class Marker(Protocol):
    """A running backup's (or prune's) marker in the repository's running/."""

    @property
    def name(self) -> str:
        """Its name in running/ (what `Maintainable.running` lists)."""
        ...

    @property
    def started(self) -> float:
        """When it was written, on the repository's clock."""
        ...

    def beat(self) -> None:
        """Refresh the heartbeat; write the marker again if a prune removed it."""
        ...

    def end(self) -> None:
        """Remove it. Best effort."""
        ...


@dataclass(frozen=True)
class Retired:
    """What `Maintainable.retire_all` did to one chunk: `freed` stored bytes
    (None: kept, it was used at or after the cut-off, or is gone), or
    `locked_until` (a retention date, epoch seconds: it cannot be deleted
    before)."""

    chunk_id: bytes
    freed: int | None = None
    locked_until: float | None = None


@runtime_checkable
class Maintainable(Protocol):
    """What a prune (and a backup beside it) needs of a backend: each chunk's
    last use on the repository's own clock, a way to renew it (`touch`),
    a delete that loses every race against a touch (`retire_all`), and
    markers of running backups. README, "Prune", argues why this is safe."""

    def touch(self, chunk_id: bytes) -> bool:
        """Mark the chunk as used now; False if it is missing (or being
        deleted by a prune: the caller writes it again or fails)."""
        ...

    def chunk_files(self) -> Iterator[tuple[bytes, float, int]]:
        """(id, last use on the repository's clock, stored bytes) of every chunk."""
        ...

    def retire_all(self, chunk_ids: list[bytes], cutoff: float) -> list[Retired]:
        """Delete each chunk unless it was used at or after `cutoff`; a touch
        racing the delete either keeps the chunk or fails."""
        ...

    def now(self) -> float:
        """The repository's clock now (what a chunk written now records)."""
        ...

    def running_start(self, what: str) -> Marker:
        """Write a marker in running/: something runs that writes or may
        reference chunks. Its start is on the repository's clock."""
        ...

    def running(self) -> list[tuple[str, float, float]]:
        """(name, started, heartbeat) of every marker in running/."""
        ...

    def end_running(self, name: str) -> None:
        """Remove the marker `name` (a crashed process's). Idempotent."""
        ...

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove unfinished writes older than `older_than` seconds."""
        ...


@runtime_checkable
class Locking(Protocol):
    """A backend whose objects may carry a retention date (S3 Object Lock)."""

    def manifest_locked_until(self, name: str) -> float | None:
        """The manifest's retention date (epoch seconds) if it is still in
        force, so it cannot be deleted yet; else None."""
        ...


@runtime_checkable
class Backend(Repository, Maintainable, Protocol):
    """A repository a command opens: chunks, manifests and maintenance, the
    key blobs of an encrypted one, and its codec (`agent.keys` unlocks it)."""

    id: str
    encryption: str   # what the repository's config says: "none" or the cipher

    def put_key(self, name: str, data: bytes) -> object: ...

    def get_key(self, name: str) -> bytes: ...

    def delete_key(self, name: str) -> None: ...

    def key_names(self) -> list[str]: ...

    def use_codec(self, codec: Codec) -> None: ...


_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}"
_MANIFEST_NAME = re.compile(rf"{_SEGMENT}(/{_SEGMENT}){{0,2}}")


def check_manifest_name(name: str) -> None:
    """Reject a name outside the documented alphabet (a caller bug)."""
    if not isinstance(name, str) or not _MANIFEST_NAME.fullmatch(name):
        raise InternalError(f"{name!r:.120} is not a valid manifest name")


def is_manifest_name(name: str) -> bool:
    return bool(_MANIFEST_NAME.fullmatch(name))


_KEY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_key_name(name: str) -> None:
    """Reject a key blob name outside `[A-Za-z0-9_-]{1,64}` (a caller bug)."""
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise InternalError(f"{name!r:.80} is not a valid key name")


def is_key_name(name: str) -> bool:
    return bool(_KEY_NAME.fullmatch(name))


def chunk_id_of(data: Data) -> bytes:
    """The id of a raw chunk: its SHA-256."""
    return hashlib.sha256(data).digest()


def check_chunk_id(chunk_id: bytes) -> None:
    """Reject anything that is not a 32-byte id (a caller bug, not bad data)."""
    if not isinstance(chunk_id, bytes) or len(chunk_id) != CHUNK_ID_SIZE:
        raise TypeError(f"a chunk id is 32 bytes (SHA-256), not {chunk_id!r:.80}")


class Healing:
    """A store whose `put` is the wrapped store's `heal`: a scan through it
    replaces every damaged chunk it would otherwise have reused."""

    def __init__(self, store: ChunkStore) -> None:
        self._store = store

    def chunk_id(self, data: Data) -> bytes:
        return self._store.chunk_id(data)

    def has(self, chunk_id: bytes) -> bool:
        return self._store.has(chunk_id)

    def put(self, chunk_id: bytes, data: Data) -> int:
        return self._store.heal(chunk_id, data)

    def flush(self) -> None:
        self._store.flush()

    def get(self, chunk_id: bytes) -> bytes:
        return self._store.get(chunk_id)

    def delete(self, chunk_id: bytes) -> None:
        self._store.delete(chunk_id)

    def ids(self) -> Iterator[bytes]:
        return self._store.ids()

    def quarantine(self, chunk_id: bytes) -> bool:
        return self._store.quarantine(chunk_id)

    def heal(self, chunk_id: bytes, data: Data) -> int:
        return self._store.heal(chunk_id, data)


class Codec:
    """How a backend turns chunks and manifests into stored bytes: chunk ids
    (`chunk_id`), chunks (`encode`/`decode`: a zstd frame, verified against
    its id on the way out) and manifests (`seal`/`unseal`). Backends take
    one in their constructor; in an encrypted repository
    `encryption.EncryptingCodec` replaces this one. zstd encoding of
    chunks: one compressor and decompressor per thread (zstandard objects
    must not be shared between threads)."""

    def __init__(self, level: int = DEFAULT_LEVEL) -> None:
        self.level = level
        self._local = threading.local()

    def chunk_id(self, data: Data) -> bytes:
        """The id of a raw chunk under this codec: its SHA-256."""
        return hashlib.sha256(data).digest()

    def encode(self, data: Data, chunk_id: bytes | None = None) -> bytes:
        """A chunk's bytes as stored. `chunk_id` (its id, when the caller
        has it) spares an encrypting codec computing it again."""
        compressor: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True)
            self._local.c = compressor
        return bytes(compressor.compress(data))

    def seal(self, data: bytes, name: str | None = None) -> bytes:
        """A manifest's bytes as stored (as they are; an encrypting codec
        encrypts them, bound to the manifest's `name`: every backend passes it)."""
        return bytes(data)

    def unseal(self, stored: bytes, what: str, name: str | None = None) -> bytes:
        """The inverse of `seal` (the same `name`); IntegrityError names
        `what` if it fails."""
        return stored

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
        if self.chunk_id(data) != chunk_id:
            raise IntegrityError(
                f"chunk {chunk_id.hex()} in {where} does not match its SHA-256; "
                "run a repository check and back the affected VMs up again"
            )
        return data


class LockedCodec(Codec):
    """The codec of an encrypted repository until `agent.keys` unlocks it
    (`use_codec`): every chunk and manifest operation is refused (a caller
    bug), so a path that forgot to unlock fails instead of writing
    plaintext (chunks named by their SHA-256, plain manifests) into it."""

    def __init__(self, encryption: str) -> None:
        super().__init__()
        self.encryption = encryption

    def _refuse(self) -> InternalError:
        return InternalError(f"the repository is encrypted ({self.encryption}) and not"
                             " unlocked: agent.keys.unlock must open it first")

    def chunk_id(self, data: Data) -> bytes:
        raise self._refuse()

    def encode(self, data: Data, chunk_id: bytes | None = None) -> bytes:
        raise self._refuse()

    def decode(self, chunk_id: bytes, stored: bytes, where: str) -> bytes:
        raise self._refuse()

    def seal(self, data: bytes, name: str | None = None) -> bytes:
        raise self._refuse()

    def unseal(self, stored: bytes, what: str, name: str | None = None) -> bytes:
        raise self._refuse()
