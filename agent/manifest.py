"""Backup manifests: the self-describing record of one backup in the repository.

Owns: the manifest's value type, its binary encoding (format 1, below and in
README "Repository format"), its name, and the pure operations on full block
maps (overlaying a backup's changed blocks on the previous map; the blocks
one map changed against another). Must not: do I/O (the store writes the
bytes, the catalog imports the values), print, or read configuration.

Encoding, format 1. The file is one zstd frame (with its content checksum)
holding::

    magic      8 bytes  b"OBMANIF\\n"
    version    u16 LE   1
    hlen       u32 LE   length of the header
    header     hlen bytes of UTF-8 JSON (keys below)
    tables     per disk of header["disks"] with "blocks" > 0, in that order:
               blocks x 16 bytes  xxh3-128 of each block, in index order
               blocks x 32 bytes  SHA-256 chunk id of each block (32 zero
                                  bytes: an all-zero block, no chunk)
    digest     32 bytes SHA-256 of everything before it

so a block costs 48 bytes before compression. The header holds `format`,
`backup_id` (the writing catalog's id), `catalog` (that catalog's id),
`vm_id`, `vm_name`, `kind`, `started`, `finished` (Unix seconds),
`warnings`, `vm_document`, `image_documents` ({image id: XML}), and `disks`:
the DiskBackup fields plus `blocks` (the map's length; 0 for an excluded or
volatile disk) and `previous_backup` (the backup the scan diffed against, or
null). Readers ignore keys they do not know; a change to the binary layout
raises the version.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import zstandard

from agent.errors import IntegrityError, InternalError, RepositoryError
from agent.model import (
    CHECKSUM_SIZE,
    CHUNK_ID_SIZE,
    BlockList,
    BlockRecord,
    DiskBackup,
    PreviousMap,
    block_count,
    block_length,
)

MAGIC = b"OBMANIF\n"
VERSION = 1
_PREFIX = struct.Struct("<8sHI")
_DIGEST = 32
_LEVEL = 10
_NO_CHUNK = bytes(CHUNK_ID_SIZE)
BYTES_PER_BLOCK = CHECKSUM_SIZE + CHUNK_ID_SIZE   # 48, before compression


@dataclass(frozen=True)
class DiskMap:
    """The full block map of one disk: `checksums` 16 bytes per block,
    `chunks` 32 bytes per block (zeros for a hole)."""

    checksums: bytes | bytearray
    chunks: bytes | bytearray

    @property
    def count(self) -> int:
        return len(self.checksums) // CHECKSUM_SIZE

    def record(self, index: int) -> BlockRecord:
        chunk = bytes(self.chunks[index * CHUNK_ID_SIZE:(index + 1) * CHUNK_ID_SIZE])
        return BlockRecord(
            index, bytes(self.checksums[index * CHECKSUM_SIZE:(index + 1) * CHECKSUM_SIZE]),
            None if chunk == _NO_CHUNK else chunk)

    def records(self) -> Iterator[BlockRecord]:
        for i in range(self.count):
            yield self.record(i)


@dataclass(frozen=True)
class Manifest:
    """Everything a restore needs of one backup."""

    backup_id: int
    catalog: str                  # the id of the catalog that numbered the backup
    vm_id: int
    vm_name: str
    kind: str
    started: float
    finished: float
    vm_document: str
    image_documents: Mapping[int, str]
    disks: tuple[DiskBackup, ...]
    warnings: tuple[str, ...]
    maps: Mapping[int, DiskMap]   # disk id -> full map, for each disk that was read
    previous: Mapping[int, int | None] = field(default_factory=dict)  # disk -> diffed against


def new_name(vm_id: int, started: float) -> str:
    """`VM/YYYYmmddTHHMMSSZ-RANDOM`: sorts by time within a VM, and two
    writers (separate catalogs, one repository) never pick the same name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    return f"{vm_id}/{stamp}-{secrets.token_hex(8)}"


def full_map(disk: DiskBackup, previous: PreviousMap | None,
             changed: Sequence[BlockRecord]) -> DiskMap:
    """The disk's whole map at this backup: `previous` (same block size, or
    None) overlaid with the `changed` blocks. InternalError if a block is
    covered by neither (the catalog's commit contract)."""
    n = block_count(disk.size, disk.block_size)
    checksums = bytearray(CHECKSUM_SIZE * n)
    chunks = bytearray(CHUNK_ID_SIZE * n)
    seen = bytearray(n)
    if previous is not None and previous.block_size == disk.block_size:
        keep = min(n, previous.count)
        checksums[:keep * CHECKSUM_SIZE] = previous.checksums[:keep * CHECKSUM_SIZE]
        chunks[:keep * CHUNK_ID_SIZE] = previous.chunks[:keep * CHUNK_ID_SIZE]
        for i in range(keep):   # a resized disk's last block must come from the scan
            if block_length(previous.size, disk.block_size, i) == block_length(
                    disk.size, disk.block_size, i):
                seen[i] = 1
    pairs: Iterable[tuple[BlockRecord, int]] = (
        changed.with_stored() if isinstance(changed, BlockList) else ((r, 0) for r in changed))
    for r, _ in pairs:
        if not 0 <= r.index < n:
            raise InternalError(f"disk {disk.disk_id}: block {r.index} past its end")
        checksums[r.index * CHECKSUM_SIZE:(r.index + 1) * CHECKSUM_SIZE] = r.checksum
        chunks[r.index * CHUNK_ID_SIZE:(r.index + 1) * CHUNK_ID_SIZE] = (
            _NO_CHUNK if r.chunk is None else r.chunk)
        seen[r.index] = 1
    missing = seen.find(0)
    if missing >= 0:
        raise InternalError(f"disk {disk.disk_id}: block {missing} is in no map")
    return DiskMap(checksums, chunks)


def changed_blocks(disk: DiskBackup, new: DiskMap,
                   base: tuple[int, DiskMap] | None) -> BlockList:
    """The blocks of `new` that a lineage must record after `base` (size and
    map of the previous backup of the same disk, or None): every block that
    differs, lies past the old end, or whose length changed."""
    out = BlockList()
    if base is None:
        for r in new.records():
            out.append(r)
        return out
    old_size, old = base
    bs = disk.block_size
    for i in range(new.count):
        if (i >= old.count
                or block_length(old_size, bs, i) != block_length(disk.size, bs, i)
                or new.checksums[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE]
                != old.checksums[i * CHECKSUM_SIZE:(i + 1) * CHECKSUM_SIZE]
                or new.chunks[i * CHUNK_ID_SIZE:(i + 1) * CHUNK_ID_SIZE]
                != old.chunks[i * CHUNK_ID_SIZE:(i + 1) * CHUNK_ID_SIZE]):
            out.append(new.record(i))
    return out


# -- encoding -------------------------------------------------------------------


def encode(m: Manifest) -> bytes:
    """The manifest's bytes (format VERSION)."""
    disks = []
    for d in m.disks:
        blocks = m.maps[d.disk_id].count if d.disk_id in m.maps else 0
        if d.disk_id in m.maps and blocks != block_count(d.size, d.block_size):
            raise InternalError(f"manifest of VM {m.vm_id}: disk {d.disk_id} map has "
                                f"{blocks} blocks, not {block_count(d.size, d.block_size)}")
        disks.append({
            "disk_id": d.disk_id, "size": d.size, "block_size": d.block_size,
            "image_id": d.image_id, "volatile": d.volatile, "excluded": d.excluded,
            "bytes_read": d.bytes_read, "bytes_changed": d.bytes_changed,
            "bytes_stored": d.bytes_stored, "attributes": dict(d.attributes),
            "blocks": blocks, "previous_backup": m.previous.get(d.disk_id),
        })
    header = json.dumps({
        "format": VERSION, "backup_id": m.backup_id, "catalog": m.catalog,
        "vm_id": m.vm_id, "vm_name": m.vm_name, "kind": m.kind, "started": m.started,
        "finished": m.finished, "warnings": list(m.warnings), "vm_document": m.vm_document,
        "image_documents": {str(k): v for k, v in sorted(m.image_documents.items())},
        "disks": disks,
    }, sort_keys=True, separators=(",", ":")).encode()
    parts: list[bytes | bytearray] = [_PREFIX.pack(MAGIC, VERSION, len(header)), header]
    for d in m.disks:
        if d.disk_id in m.maps:
            parts += [m.maps[d.disk_id].checksums, m.maps[d.disk_id].chunks]
    body = b"".join(parts)
    body += hashlib.sha256(body).digest()
    cctx = zstandard.ZstdCompressor(level=_LEVEL, write_checksum=True, write_content_size=True)
    return bytes(cctx.compress(body))


def decode(data: bytes, name: str) -> Manifest:
    """The manifest in `data`. IntegrityError (naming `name`) when it is
    truncated, damaged or malformed; RepositoryError when it is of a newer
    format than this oneback reads."""
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"manifest {name} is damaged ({why}); its backup cannot be "
                              "read from the repository")

    try:
        body = zstandard.ZstdDecompressor().decompress(data)
    except zstandard.ZstdError as e:
        raise bad(f"not a complete zstd frame: {e}") from e
    if len(body) < _PREFIX.size + _DIGEST:
        raise bad("too short")
    if hashlib.sha256(body[:-_DIGEST]).digest() != body[-_DIGEST:]:
        raise bad("its SHA-256 does not match")
    magic, version, hlen = _PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise bad("no manifest magic")
    if version > VERSION:
        raise RepositoryError(f"manifest {name} has format {version}, newer than this "
                              f"oneback reads ({VERSION}); upgrade oneback")
    try:
        h = json.loads(body[_PREFIX.size:_PREFIX.size + hlen])
        disks: list[DiskBackup] = []
        counts: list[tuple[int, int]] = []
        previous: dict[int, int | None] = {}
        for d in h["disks"]:
            disks.append(DiskBackup(
                disk_id=int(d["disk_id"]), size=int(d["size"]),
                block_size=int(d["block_size"]),
                image_id=None if d["image_id"] is None else int(d["image_id"]),
                volatile=bool(d["volatile"]), excluded=bool(d["excluded"]),
                bytes_read=int(d["bytes_read"]), bytes_changed=int(d["bytes_changed"]),
                bytes_stored=int(d["bytes_stored"]),
                attributes={str(k): str(v) for k, v in d["attributes"].items()}))
            counts.append((int(d["disk_id"]), int(d["blocks"])))
            prev = d.get("previous_backup")
            previous[int(d["disk_id"])] = None if prev is None else int(prev)
        m = Manifest(
            backup_id=int(h["backup_id"]), catalog=str(h["catalog"]), vm_id=int(h["vm_id"]),
            vm_name=str(h["vm_name"]), kind=str(h["kind"]), started=float(h["started"]),
            finished=float(h["finished"]), vm_document=str(h["vm_document"]),
            image_documents={int(k): str(v) for k, v in h["image_documents"].items()},
            warnings=tuple(str(w) for w in h["warnings"]), disks=tuple(disks), maps={},
            previous=previous)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise bad(f"unreadable header: {type(e).__name__}: {e}") from e
    if m.kind not in ("full", "incremental") or m.backup_id < 1:
        raise bad("header has an impossible kind or backup id")
    maps: dict[int, DiskMap] = {}
    at = _PREFIX.size + hlen
    end = len(body) - _DIGEST
    for disk, (disk_id, n) in zip(disks, counts, strict=True):
        if n == 0:
            continue
        if n != block_count(disk.size, disk.block_size) or disk.block_size <= 0:
            raise bad(f"disk {disk_id} lists {n} blocks for its size")
        c_end = at + n * CHECKSUM_SIZE
        k_end = c_end + n * CHUNK_ID_SIZE
        if k_end > end:
            raise bad(f"disk {disk_id}'s block table is cut short")
        maps[disk_id] = DiskMap(body[at:c_end], body[c_end:k_end])
        at = k_end
    if at != end:
        raise bad("bytes after the last block table")
    return replace(m, maps=maps)
