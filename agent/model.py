"""Value types shared by every module of oneback.

Owns: immutable dataclasses that cross module boundaries (what the cloud
boundary returns, what the catalog stores, what the engine reports), and
OpenNebula's state numbers. Must not: do I/O or import anything else from the
package. Boundaries translate XML, pyone objects and SQL rows into these.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import overload

# ---------------------------------------------------------------------------
# OpenNebula state numbers (include/VirtualMachine.h, include/Image.h).
# Kept here as plain ints: pyone's enums stop at LCM 68.

VM_STATES: dict[int, str] = {
    0: "INIT", 1: "PENDING", 2: "HOLD", 3: "ACTIVE", 4: "STOPPED", 5: "SUSPENDED",
    6: "DONE", 7: "FAILED", 8: "POWEROFF", 9: "UNDEPLOYED", 10: "CLONING",
    11: "CLONING_FAILURE",
}

LCM_STATES: dict[int, str] = {
    0: "LCM_INIT", 1: "PROLOG", 2: "BOOT", 3: "RUNNING", 4: "MIGRATE", 5: "SAVE_STOP",
    6: "SAVE_SUSPEND", 7: "SAVE_MIGRATE", 8: "PROLOG_MIGRATE", 9: "PROLOG_RESUME",
    10: "EPILOG_STOP", 11: "EPILOG", 12: "SHUTDOWN", 13: "CANCEL", 14: "FAILURE",
    15: "CLEANUP_RESUBMIT", 16: "UNKNOWN", 17: "HOTPLUG", 18: "SHUTDOWN_POWEROFF",
    19: "BOOT_UNKNOWN", 20: "BOOT_POWEROFF", 21: "BOOT_SUSPENDED", 22: "BOOT_STOPPED",
    23: "CLEANUP_DELETE", 24: "HOTPLUG_SNAPSHOT", 25: "HOTPLUG_NIC", 26: "HOTPLUG_SAVEAS",
    27: "HOTPLUG_SAVEAS_POWEROFF", 28: "HOTPLUG_SAVEAS_SUSPENDED", 29: "SHUTDOWN_UNDEPLOY",
    30: "EPILOG_UNDEPLOY", 31: "PROLOG_UNDEPLOY", 32: "BOOT_UNDEPLOY",
    33: "HOTPLUG_PROLOG_POWEROFF", 34: "HOTPLUG_EPILOG_POWEROFF", 35: "BOOT_MIGRATE",
    36: "BOOT_FAILURE", 37: "BOOT_MIGRATE_FAILURE", 38: "PROLOG_MIGRATE_FAILURE",
    39: "PROLOG_FAILURE", 40: "EPILOG_FAILURE", 41: "EPILOG_STOP_FAILURE",
    42: "EPILOG_UNDEPLOY_FAILURE", 43: "PROLOG_MIGRATE_POWEROFF",
    44: "PROLOG_MIGRATE_POWEROFF_FAILURE", 45: "PROLOG_MIGRATE_SUSPEND",
    46: "PROLOG_MIGRATE_SUSPEND_FAILURE", 47: "BOOT_UNDEPLOY_FAILURE",
    48: "BOOT_STOPPED_FAILURE", 49: "PROLOG_RESUME_FAILURE", 50: "PROLOG_UNDEPLOY_FAILURE",
    51: "DISK_SNAPSHOT_POWEROFF", 52: "DISK_SNAPSHOT_REVERT_POWEROFF",
    53: "DISK_SNAPSHOT_DELETE_POWEROFF", 54: "DISK_SNAPSHOT_SUSPENDED",
    55: "DISK_SNAPSHOT_REVERT_SUSPENDED", 56: "DISK_SNAPSHOT_DELETE_SUSPENDED",
    57: "DISK_SNAPSHOT", 58: "DISK_SNAPSHOT_REVERT", 59: "DISK_SNAPSHOT_DELETE",
    60: "PROLOG_MIGRATE_UNKNOWN", 61: "PROLOG_MIGRATE_UNKNOWN_FAILURE", 62: "DISK_RESIZE",
    63: "DISK_RESIZE_POWEROFF", 64: "DISK_RESIZE_UNDEPLOYED", 65: "HOTPLUG_NIC_POWEROFF",
    66: "HOTPLUG_RESIZE", 67: "HOTPLUG_SAVEAS_UNDEPLOYED", 68: "HOTPLUG_SAVEAS_STOPPED",
    69: "BACKUP", 70: "BACKUP_POWEROFF", 71: "RESTORE",
}

IMAGE_STATES: dict[int, str] = {
    0: "INIT", 1: "READY", 2: "USED", 3: "DISABLED", 4: "LOCKED", 5: "ERROR", 6: "CLONE",
    7: "DELETE", 8: "USED_PERS", 9: "LOCKED_USED", 10: "LOCKED_USED_PERS",
}

# VM STATE numbers used in decisions.
VM_PENDING, VM_HOLD, VM_ACTIVE, VM_STOPPED, VM_SUSPENDED, VM_DONE = 1, 2, 3, 4, 5, 6
VM_POWEROFF, VM_UNDEPLOYED, VM_CLONING, VM_CLONING_FAILURE = 8, 9, 10, 11
LCM_RUNNING = 3

IMAGE_READY, IMAGE_USED, IMAGE_LOCKED, IMAGE_ERROR, IMAGE_USED_PERS = 1, 2, 4, 5, 8

# Prefix of every object oneback creates in the cloud.
OBJECT_PREFIX = "oneback-"


def vm_state_name(state: int, lcm_state: int) -> str:
    """`RUNNING`, `POWEROFF`, `ACTIVE/HOTPLUG` ...: the name a person expects."""
    if state == VM_ACTIVE:
        return LCM_STATES.get(lcm_state, f"LCM_{lcm_state}")
    return VM_STATES.get(state, f"STATE_{state}")


# ---------------------------------------------------------------------------
# What the cloud boundary returns.


@dataclass(frozen=True)
class SnapshotInfo:
    """One disk snapshot as oned lists it under /VM/SNAPSHOTS."""

    disk_id: int
    snapshot_id: int
    name: str
    date: int
    active: bool
    size_mb: int
    parent: int = -1


@dataclass(frozen=True)
class DiskSnapshots:
    """The header of one disk's /VM/SNAPSHOTS: how oned links its snapshots
    (ALLOW_ORPHANS as oned resolved it: YES, NO, MIXED or LINEAR) and the id
    the next snapshot gets. oned keeps it, emptied, once the snapshots are gone."""

    disk_id: int
    allow_orphans: str
    next_snapshot: int


@dataclass(frozen=True)
class DiskInfo:
    """One DISK of a VM. `attributes` is the whole DISK vector as oned shows it
    (strings), kept so a restore can rebuild the disk definition."""

    disk_id: int
    image_id: int | None
    size_mb: int
    target: str
    serial: str
    type: str
    datastore_id: int | None
    persistent: bool
    attach_pending: bool
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def volatile(self) -> bool:
        """Volatile disks (TYPE fs/swap, no IMAGE_ID) cannot be saved as images."""
        return self.image_id is None

    @property
    def size_bytes(self) -> int:
        return self.size_mb * 1024 * 1024


@dataclass(frozen=True)
class VmInfo:
    """A VM as `one.vm.info` shows it. `document` is the verbatim XML, kept
    only to be stored with a backup; decisions use the typed fields."""

    id: int
    name: str
    uid: int
    gid: int
    state: int
    lcm_state: int
    disks: tuple[DiskInfo, ...]
    snapshots: tuple[SnapshotInfo, ...]
    user_template: Mapping[str, str]
    error: str
    document: str
    running_end: int = 0   # RETIME of the last HISTORY record: when it last stopped running
    snapshot_trees: Mapping[int, DiskSnapshots] = field(default_factory=dict)  # by disk id
    cluster_id: int = -1   # CID of the last HISTORY record: the cluster it runs in (-1: never)

    @property
    def state_name(self) -> str:
        return vm_state_name(self.state, self.lcm_state)

    def disk(self, disk_id: int) -> DiskInfo | None:
        return next((d for d in self.disks if d.disk_id == disk_id), None)


@dataclass(frozen=True)
class ImageInfo:
    """An image as `one.image.info` shows it; `document` is the verbatim XML."""

    id: int
    name: str
    state: int
    type: str
    size_mb: int
    datastore_id: int
    persistent: bool
    running_vms: int
    document: str
    uid: int = -1   # the owner's user id

    @property
    def state_name(self) -> str:
        return IMAGE_STATES.get(self.state, f"STATE_{self.state}")


@dataclass(frozen=True)
class DatastoreInfo:
    id: int
    name: str
    type: int  # 0 image, 1 system, 2 file, 3 backup
    free_mb: int
    clusters: tuple[int, ...] = ()   # CLUSTERS/ID: the clusters whose hosts can use it


@dataclass(frozen=True)
class NotServed:
    """An opted-in VM this agent's proxy cannot back up, and why (placement)."""

    vm_id: int
    reason: str
    since: float


@dataclass(frozen=True)
class StoredLease:
    """A lease object as a repository holds it (`vmlease.LeaseStore`):
    `version` is the store's token for this exact write (a generation, an
    S3 ETag), `written` the time of the write on the repository's clock."""

    version: str
    data: bytes
    written: float


@dataclass(frozen=True)
class HookInfo:
    """A hook registered in oned (one.hookpool.info): its TEMPLATE's
    top-level attributes as oned keeps them (NAME and TYPE are not in it)."""
    id: int
    name: str
    type: str  # "api" | "state"
    template: tuple[tuple[str, str], ...]


class ReadVia(StrEnum):
    """How a backup reads one disk (decided by policy.plan_disks)."""

    SNAPSHOT = "snapshot"  # a temporary snapshot, saved as an image, then deleted
    DIRECT = "direct"      # the stopped VM's disk itself is saved (no snapshot)
    BASE = "base"          # a permanent `oneback-base` snapshot is taken and kept


@dataclass(frozen=True)
class PermanentSnapshot:
    """A disk snapshot oned will never delete, and why (recognised from the
    VM document: Snapshots::test_delete refuses snapshot 0 of a persistent
    disk whose snapshots allow no orphans)."""

    vm_id: int
    disk_id: int
    snapshot_id: int
    name: str
    reason: str


# ---------------------------------------------------------------------------
# What the catalog stores.


class JournalKind(StrEnum):
    """Kinds of cloud objects oneback creates and must always be able to remove."""

    SNAPSHOT = "snapshot"      # a disk snapshot of a VM (vm_id, disk_id, one_id = snapshot id)
    IMAGE = "image"            # an image (one_id = image id)
    ATTACHMENT = "attachment"  # a disk attached to the proxy VM (vm_id = proxy, one_id = disk id)
    TEMPLATE = "template"      # a VM template (one_id = template id)
    VM = "vm"                  # a VM being built by a restore (one_id = VM id)


@dataclass(frozen=True)
class JournalEntry:
    """A cloud object oneback is about to create or has created. Recorded
    *before* the creating call, so a crash between the two is still found by
    name; `one_id` is None until the creating call returned."""

    id: int
    kind: JournalKind
    name: str
    vm_id: int | None
    disk_id: int | None
    one_id: int | None
    job: str
    created: float


@dataclass(frozen=True)
class BlockRecord:
    """One fixed-size block of a disk at one backup. `chunk` is the SHA-256 of
    the block's bytes, or None for an all-zero block (a hole, never stored)."""

    index: int
    checksum: bytes  # xxh3-128, 16 bytes
    chunk: bytes | None


@dataclass(frozen=True)
class DiskBackup:
    """What one backup holds of one disk."""

    disk_id: int
    size: int                     # bytes
    block_size: int
    image_id: int | None
    volatile: bool
    excluded: bool
    bytes_read: int = 0
    bytes_changed: int = 0
    bytes_stored: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BackupRecord:
    """A committed backup: visible only once all its data is durable."""

    id: int
    vm_id: int
    vm_name: str
    kind: str                     # "full" | "incremental"
    started: float
    finished: float
    disks: tuple[DiskBackup, ...]
    warnings: tuple[str, ...]
    vm_gone: bool = False


# ---------------------------------------------------------------------------
# Block maps: shared by the catalog (which builds them), the reader (which
# diffs against them) and the writer (which restores from them).

CHECKSUM_SIZE = 16  # xxh3-128
CHUNK_ID_SIZE = 32  # SHA-256
_NO_CHUNK = bytes(CHUNK_ID_SIZE)


def block_count(size: int, block_size: int) -> int:
    """Blocks of a disk of `size` bytes; the last one may be short."""
    return -(-size // block_size)


def block_length(size: int, block_size: int, index: int) -> int:
    """Bytes in block `index` of a disk of `size` bytes (0 past the end)."""
    return max(0, min(block_size, size - index * block_size))


@dataclass(frozen=True)
class PreviousMap:
    """The logical block map of one disk at one committed backup, packed so a
    1 TiB disk at 4 MiB blocks costs 12 MiB, not 262144 objects: `checksums`
    holds 16 bytes per block, `chunks` 32 bytes per block (zeros for a hole):
    PREVIOUS_BYTES_PER_BLOCK in all. Treat the buffers as read-only."""

    backup_id: int
    disk_id: int
    size: int
    block_size: int
    checksums: bytes | bytearray
    chunks: bytes | bytearray

    @property
    def count(self) -> int:
        return len(self.checksums) // CHECKSUM_SIZE

    def checksum(self, index: int) -> bytes | None:
        """xxh3-128 of block `index`, None past the end."""
        if not 0 <= index < self.count:
            return None
        return bytes(self.checksums[index * CHECKSUM_SIZE : (index + 1) * CHECKSUM_SIZE])

    def chunk(self, index: int) -> bytes | None:
        """SHA-256 of block `index`; None for a hole or past the end."""
        if not 0 <= index < self.count:
            return None
        chunk = bytes(self.chunks[index * CHUNK_ID_SIZE:(index + 1) * CHUNK_ID_SIZE])
        return None if chunk == _NO_CHUNK else chunk

    def block_length(self, index: int) -> int:
        return block_length(self.size, self.block_size, index)


PREVIOUS_BYTES_PER_BLOCK = CHECKSUM_SIZE + CHUNK_ID_SIZE  # 48


class BlockList(Sequence[BlockRecord]):
    """Block records of one disk, packed in one bytearray in the order they
    were appended (a scan appends in index order): per block a 4-byte index,
    the 16-byte checksum, the 32-byte chunk id (zeros for a hole) and the
    4-byte stored size of a chunk the scan wrote (0 otherwise) --
    BLOCK_RECORD_BYTES, where a BlockRecord object costs about 200. Reading
    it gives BlockRecord values made on the fly."""

    _RECORD = struct.Struct("<I16s32sI")

    def __init__(self, records: Iterable[BlockRecord] = ()) -> None:
        self._data = bytearray()
        for r in records:
            self.append(r)

    def append(self, record: BlockRecord, stored: int = 0) -> None:
        """Add a record; `stored` is the size the store gave the chunk when
        this scan wrote it (0: not written by this scan)."""
        if len(record.checksum) != CHECKSUM_SIZE or (
                record.chunk is not None and len(record.chunk) != CHUNK_ID_SIZE):
            raise ValueError(f"block {record.index}: malformed checksum or chunk id")
        self._data += self._RECORD.pack(record.index, record.checksum,
                                        _NO_CHUNK if record.chunk is None else record.chunk,
                                        stored)

    def __len__(self) -> int:
        return len(self._data) // self._RECORD.size

    @overload
    def __getitem__(self, i: int) -> BlockRecord: ...

    @overload
    def __getitem__(self, i: slice) -> list[BlockRecord]: ...

    def __getitem__(self, i: int | slice) -> BlockRecord | list[BlockRecord]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("block list index out of range")
        return self._unpack(i)[0]

    def __iter__(self) -> Iterator[BlockRecord]:
        for record, _ in self.with_stored():
            yield record

    def with_stored(self) -> Iterator[tuple[BlockRecord, int]]:
        """(record, stored size) pairs, in order."""
        for i in range(len(self)):
            yield self._unpack(i)

    def _unpack(self, i: int) -> tuple[BlockRecord, int]:
        index, checksum, chunk, stored = self._RECORD.unpack_from(self._data,
                                                                  i * self._RECORD.size)
        return BlockRecord(index, checksum, None if chunk == _NO_CHUNK else chunk), stored

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same records (a list of BlockRecord too)."""
        if not isinstance(other, Sequence) or isinstance(other, str | bytes | bytearray):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"BlockList({list(self)!r})"

    @property
    def nbytes(self) -> int:
        return len(self._data)


BLOCK_RECORD_BYTES = struct.calcsize("<I16s32sI")  # 56


@dataclass(frozen=True)
class Job:
    """One unit of the agent's work, durable in the catalog."""

    id: int
    vm_id: int
    kind: str                     # "backup" | "snapshot"
    params: Mapping[str, str]
    state: str                    # "queued" | "running" | "done" | "failed"
    reason: str
    attempts: int
    not_before: float
    owner: str | None
    created: float
    updated: float
    result: str
    error: str
    uid: int | None = None        # the VM owner's user id (the queue takes turns by owner)


@dataclass(frozen=True)
class Backoff:
    """Something the agent keeps failing at (one VM's reconcile, one expired
    snapshot set, one VM's jobs of a kind), and when it tries again."""

    key: str                      # "reconcile:VM", "expire:VM:SET", "job:VM:KIND", ...
    vm_id: int | None
    what: str
    failures: int
    error: str
    first_failed: float
    last_failed: float
    next_try: float


ONE_ID_MAX = 2**31 - 1
"""oned's object ids are C ints: 0 .. 2^31-1. Anything else is not an id."""


def is_one_id(value: object) -> bool:
    """True for an int (not a bool) in oned's id range."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= ONE_ID_MAX


@dataclass(frozen=True)
class Damage:
    """One block of one backup whose data the repository cannot give back
    (found by a verify). `backup_id` is the catalog's (None: a backup of
    another catalog sharing the repository); `problem` is `missing`,
    `corrupt` (the chunk does not decode to its SHA-256), `unreadable` (an
    I/O error), `checksum` (the chunk is whole but the manifest's xxh3-128
    differs) or `manifest` (the manifest itself is missing or damaged;
    disk and block are then None)."""

    manifest: str
    backup_id: int | None
    vm_id: int | None
    disk_id: int | None
    block: int | None
    chunk: str | None              # hex SHA-256
    problem: str
    detail: str = ""
    quarantined: bool = False


@dataclass(frozen=True)
class VerifyProgress:
    """The last verify's result, kept in the catalog: `key` is `background`
    (the agent's continuous verify; `cursor` is where its pass goes on) or
    `command` (the last `oneback verify`)."""

    key: str
    last_run: float                # when it last finished (a slice, or a run)
    checked: int                   # chunks checked by that slice or run
    bytes_read: int
    damage: tuple[Damage, ...]     # found by the current pass (background) or the run
    cursor: bytes = b""            # background: the next chunk id of the pass
    pass_started: float = 0.0
    pass_checked: int = 0          # chunks checked by the current pass so far
    last_pass_finished: float | None = None
    read_data: bool = True


@dataclass(frozen=True)
class S3Location:
    """Where an S3 repository lives: `s3://BUCKET/PREFIX` (`storage.repository`).
    `prefix` has no leading or trailing `/` and may be empty (the bucket's root)."""

    bucket: str
    prefix: str = ""

    def key(self, name: str) -> str:
        """The object key of `name` (e.g. `chunks/ab/abcd...`) under the prefix."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
