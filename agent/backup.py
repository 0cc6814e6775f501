"""The backup use case: one VM, every chosen disk, into the repository.

Owns: the order of a backup — read the VM, plan its disks, snapshot each
(or not: a stopped VM's disk whose snapshot oned would never delete is
saved as it is; with the opt-in, such a disk's first snapshot is the kept
`oneback-base`), then per disk save the snapshot as an image, attach it to
the proxy VM, scan the block device against the previous backup's checksums, detach, delete the
image and the snapshot — and the rule that a backup becomes visible (one
catalog transaction) only after all its chunks and then its manifest (the
repository's own full record of it, `agent.manifest`) are durable. Must not: print,
or talk to pyone, SQL or /dev directly (it uses cloud, catalog, devices).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol

from agent import devices, reader
from agent import manifest as mf
from agent.attach import Journal, Workspace
from agent.catalog import BaseGone
from agent.cloud import Cloud
from agent.config import Config
from agent.errors import Interrupted, NotFound, OnebackError, RepositoryError, StateError
from agent.lease import VmBusy, vm_lock
from agent.model import (
    CHUNK_ID_SIZE,
    LCM_RUNNING,
    VM_ACTIVE,
    VM_POWEROFF,
    VM_SUSPENDED,
    BackupRecord,
    BlockRecord,
    DiskBackup,
    DiskInfo,
    ReadVia,
    VmInfo,
)
from agent.policy import BASE_SNAPSHOT, DiskPlan, plan_disks
from agent.progress import Progress, Quiet
from agent.store import ChunkStore, Healing, Maintainable, Repository


@contextmanager
def exclusive(catalog_path: Path, vm_id: int) -> Iterator[None]:
    """Hold VM `vm_id` for one backup across every oneback process."""
    try:
        with vm_lock(catalog_path, vm_id):
            yield
    except VmBusy:
        raise StateError(f"a backup of VM {vm_id} is already running (another oneback"
                         f" process); try again when it is done") from None


class BackupCatalog(Journal, Protocol):
    """The part of the catalog a backup needs."""

    def previous_map(self, vm_id: int, disk_id: int) -> reader.PreviousMap | None: ...

    @property
    def catalog_id(self) -> str: ...

    def reserve_backup_id(self) -> int: ...

    def get_backup(self, backup_id: int) -> BackupRecord: ...

    def commit_backup(self, *, vm_id: int, vm_name: str, kind: str, started: float,
                      finished: float, vm_document: str, image_documents: Mapping[int, str],
                      disks: list[DiskBackup], blocks: Mapping[int, Sequence[BlockRecord]],
                      warnings: list[str], chunk_sizes: Mapping[bytes, int] | None = None,
                      backup_id: int | None = None, manifest: str | None = None,
                      based_on: Mapping[int, int] | None = None,
                      ) -> BackupRecord: ...


@dataclass(frozen=True)
class BackupOptions:
    full: bool = False
    exclude: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Settings:
    """Where and how to read and write disks through the proxy VM (backup and
    restore alike)."""

    proxy_vm_id: int
    dev_root: Path
    device_timeout: float
    block_size: int
    workers: int
    sys_root: Path
    qcow2_base: bool = False   # the operator's opt-in to `oneback-base` snapshots
    read_depth: int = 16       # reads of a device in flight (storage.read_depth)
    direct_io: bool = True     # O_DIRECT reads where supported (storage.direct_io)

    @classmethod
    def from_config(cls, cfg: Config) -> Settings:
        return cls(proxy_vm_id=cfg.proxy.vm_id, dev_root=cfg.proxy.dev_root,
                   device_timeout=cfg.proxy.device_timeout,
                   block_size=cfg.storage.block_size, workers=cfg.storage.workers,
                   sys_root=cfg.proxy.sys_root, qcow2_base=cfg.backup.qcow2_base,
                   read_depth=cfg.storage.read_depth, direct_io=cfg.storage.direct_io)

    def device(self, disk: DiskInfo, cancel: threading.Event | None = None) -> Path:
        """The proxy VM's device for `disk` (just attached to it), once it is
        provably that disk (`devices.wait_for_disk`)."""
        return devices.wait_for_disk(disk.serial, disk.size_mb, dev_root=self.dev_root,
                                     sys_root=self.sys_root, timeout=self.device_timeout,
                                     cancel=cancel)

    def device_gone(self, serial: str) -> None:
        """Wait until no device in the proxy VM carries `serial` (after its detach)."""
        devices.wait_serial_gone(serial, dev_root=self.dev_root, sys_root=self.sys_root,
                                 timeout=self.device_timeout)


@dataclass(frozen=True)
class BackupResult:
    record: BackupRecord
    cloud_seconds: float   # everything before the commit but the scan: OpenNebula's
                           # operations (snapshot, save-as, attach, detach, deletes)
    scan_seconds: float    # spent reading, hashing and storing
    leftovers: tuple[str, ...]
    refused: tuple[str, ...] = ()   # disks not read, so no snapshot stays forever, and why
    cloud_bytes_copied: int = 0     # what OpenNebula's drivers copied (attach.tm_copied)


BACKUP_STATES = "RUNNING, POWEROFF or SUSPENDED"


def backup_vm(vm_id: int, options: BackupOptions, *, cloud: Cloud, catalog: BackupCatalog,
              store: Repository, workspace: Workspace, settings: Settings,
              progress: Progress | None = None,
              cancel: threading.Event | None = None) -> BackupResult:
    """Back up VM `vm_id`. On success the backup is committed and every
    temporary cloud object is gone; on failure nothing is committed and every
    temporary object is removed (or left journaled for the next sweep)."""
    progress = progress or Quiet()
    started = time.time()
    t_start = time.monotonic()
    if vm_id == settings.proxy_vm_id:
        raise StateError(f"VM {vm_id} is the proxy VM oneback runs in; it cannot back itself up")

    vm = cloud.wait_settled(vm_id)
    if not ((vm.state == VM_ACTIVE and vm.lcm_state == LCM_RUNNING)
            or vm.state in (VM_POWEROFF, VM_SUSPENDED)):
        raise StateError(
            f"VM {vm_id} is {vm.state_name}; a backup needs it {BACKUP_STATES}")
    plan = plan_disks(vm, options.exclude, qcow2_base=settings.qcow2_base)
    image_documents: dict[int, str] = {}
    for disk in (*plan.read, *plan.excluded, *plan.skipped, *plan.refused):
        if disk.image_id is not None and disk.image_id not in image_documents:
            try:
                image_documents[disk.image_id] = cloud.image(disk.image_id).document
            except NotFound:
                pass

    with running(store, f"backup-vm{vm_id}"):   # before the first chunk, until the manifest
        return _backup_disks(vm_id, vm, plan, image_documents, options, started, t_start,
                             cloud=cloud, catalog=catalog, store=store, workspace=workspace,
                             settings=settings, progress=progress, cancel=cancel)


def _backup_disks(vm_id: int, vm: VmInfo, plan: DiskPlan, image_documents: dict[int, str],
                  options: BackupOptions, started: float, t_start: float, *,
                  cloud: Cloud, catalog: BackupCatalog, store: Repository,
                  workspace: Workspace, settings: Settings, progress: Progress,
                  cancel: threading.Event | None) -> BackupResult:
    scan_seconds = 0.0
    disks: list[DiskBackup] = []
    blocks: dict[int, Sequence[BlockRecord]] = {}  # packed BlockLists, with stored sizes
    previous: dict[int, reader.PreviousMap | None] = {}
    full = options.full
    healed: list[str] = []   # blocks stored anew: their chunks were missing
    with ExitStack() as everything:
        # Snapshot every disk first, one after another, so all disks are
        # taken as close together in time as oned allows.
        per_disk: dict[int, ExitStack] = {}
        snaps: dict[int, int] = {}
        for disk in plan.read:
            _check_cancel(cancel)
            stack = everything.enter_context(ExitStack())
            per_disk[disk.disk_id] = stack
            how = plan.how(disk)
            if how is ReadVia.DIRECT:       # a stopped VM: the disk itself is saved
                snaps[disk.disk_id] = -1
                continue
            progress.phase(disk.disk_id, "snapshot")
            if how is ReadVia.BASE:         # kept on purpose: never removed
                snaps[disk.disk_id] = cloud.snapshot_create(vm_id, disk.disk_id, BASE_SNAPSHOT)
            else:
                snaps[disk.disk_id] = stack.enter_context(
                    workspace.snapshot(vm_id, disk.disk_id))

        # With more than one disk, disk N+1 is saved, attached and found
        # (`_Prepared`, on a thread of its own) while disk N is read.
        ahead: dict[int, _Prepared] = {}
        if len(plan.read) > 1:
            everything.callback(_close_all, ahead)   # before the snapshots are deleted

        def prepare(i: int) -> None:
            if i < len(plan.read) and i not in ahead:
                d = plan.read[i]
                ahead[i] = _Prepared(functools.partial(
                    _attach_disk, vm_id, d, snaps[d.disk_id], workspace=workspace,
                    settings=settings, progress=progress, cancel=cancel))

        for i, disk in enumerate(plan.read):
            with per_disk[disk.disk_id]:
                if len(plan.read) > 1:
                    prepare(i)
                    prepare(i + 1)
                result, s_s = _read_disk(
                    vm_id, disk, snaps[disk.disk_id], options, catalog=catalog,
                    store=store, workspace=workspace, settings=settings, progress=progress,
                    cancel=cancel, healed=healed, prepared=ahead.get(i))
                scan_seconds += s_s
                disk_previous, disk_backup, scan = result
                full = full or disk_previous is None
                previous[disk.disk_id] = disk_previous
                disks.append(disk_backup)
                blocks[disk.disk_id] = scan.blocks
            progress.phase(disk.disk_id, "done")

    for disk in (*plan.excluded, *plan.volatile, *plan.skipped, *plan.refused):
        disks.append(DiskBackup(   # a refused disk is restored empty, like an excluded one
            disk_id=disk.disk_id, size=disk.size_bytes, block_size=settings.block_size,
            image_id=disk.image_id, volatile=disk.volatile,
            excluded=disk in plan.excluded or disk in plan.refused,
            attributes=dict(disk.attributes)))
    disks.sort(key=lambda d: d.disk_id)
    cloud_seconds = time.monotonic() - t_start - scan_seconds
    store.flush()  # data first: every chunk durable before the manifest and the commit
    record = _commit(
        catalog, store, vm_id=vm_id, vm_name=vm.name,
        kind="full" if full or not plan.read else "incremental", started=started,
        vm_document=vm.document, image_documents=image_documents, disks=disks,
        blocks=blocks, previous=previous,
        warnings=[*plan.warnings, *healed, *workspace.leftovers])
    return BackupResult(record, cloud_seconds, scan_seconds, tuple(workspace.leftovers),
                        plan.refusals, workspace.cloud_bytes_copied)


def _commit(catalog: BackupCatalog, store: Repository, *, vm_id: int, vm_name: str,
            kind: str, started: float, vm_document: str, image_documents: Mapping[int, str],
            disks: list[DiskBackup], blocks: Mapping[int, Sequence[BlockRecord]],
            previous: Mapping[int, reader.PreviousMap | None],
            warnings: list[str]) -> BackupRecord:
    """Write the backup's manifest into the repository (durable), then commit
    it to the catalog under the id the manifest records. A failed commit
    removes the manifest; a crash between the two leaves a complete manifest
    that `oneback catalog rebuild` imports (its chunks were durable before it)."""
    finished = time.time()
    backup_id = catalog.reserve_backup_id()
    maps = {d.disk_id: mf.full_map(d, previous.get(d.disk_id), blocks[d.disk_id])
            for d in disks if d.disk_id in blocks}
    manifest = mf.Manifest(
        backup_id=backup_id, catalog=catalog.catalog_id, vm_id=vm_id, vm_name=vm_name,
        kind=kind, started=started, finished=finished, vm_document=vm_document,
        image_documents=image_documents, disks=tuple(disks), warnings=tuple(warnings),
        maps=maps,
        previous={d: (p.backup_id if p is not None else None) for d, p in previous.items()})
    name = mf.new_name(vm_id, started)
    encoded = mf.encode(manifest)
    _touch_all(store, vm_id, maps)
    based_on = {d: p.backup_id for d, p in previous.items() if p is not None}
    del maps, manifest
    try:
        store.put_manifest(name, encoded)
        try:
            return catalog.commit_backup(
                vm_id=vm_id, vm_name=vm_name, kind=kind, started=started, finished=finished,
                vm_document=vm_document, image_documents=image_documents, disks=disks,
                blocks=blocks, warnings=warnings, backup_id=backup_id, manifest=name,
                based_on=based_on)
        except BaseGone:
            # The backup the scan diffed against was forgotten meanwhile: its
            # rows left the catalog, so commit the whole maps instead (every
            # chunk was touched above, so a prune keeps them).
            whole = mf.decode(encoded, name).maps
            return catalog.commit_backup(
                vm_id=vm_id, vm_name=vm_name, kind=kind, started=started, finished=finished,
                vm_document=vm_document, image_documents=image_documents, disks=disks,
                blocks={d: list(m.records()) for d, m in whole.items()}, warnings=warnings,
                backup_id=backup_id, manifest=name)
    except BaseException:
        # Remove the manifest only when the commit provably did not happen (a
        # signal may land just after it): otherwise it stays, a complete backup.
        try:
            catalog.get_backup(backup_id)
        except NotFound:
            try:
                store.delete_manifest(name)
            except OnebackError:
                pass
        except BaseException:
            pass
        raise


def _read_disk(vm_id: int, disk: DiskInfo, snap_id: int, options: BackupOptions, *,
               catalog: BackupCatalog, store: Repository, workspace: Workspace,
               settings: Settings, progress: Progress, cancel: threading.Event | None,
               healed: list[str] | None = None, prepared: _Prepared | None = None,
               ) -> tuple[tuple[reader.PreviousMap | None, DiskBackup, reader.ScanResult],
                          float]:
    """Save, attach, scan, detach, delete one disk's snapshot image. Returns
    (the map the scan diffed against, None when the disk had no usable one;
    its record; the scan) and the seconds spent scanning. Self-healing: a
    block whose chunk the repository lacks (deleted, or quarantined by a
    verify) is read and stored anew even if unchanged (noted in `healed`);
    with --full, every chunk the scan would reuse is read back and a damaged
    one replaced. The saved image is the one copy of the disk OpenNebula
    makes: it is attached read-only and, where its datastore links persistent
    images, persistent (a link, not a clone; `Workspace.saved_image`)."""
    with ExitStack() as stack:
        if prepared is None:
            path = _attach_disk(vm_id, disk, snap_id, stack, threading.Event(),
                                workspace=workspace, settings=settings, progress=progress,
                                cancel=cancel)
        else:   # made ready ahead, on its own thread; released (detached) by the caller
            stack.callback(prepared.close)
            path = prepared.path()
        t1 = time.monotonic()
        size = devices.device_size(path)
        progress.disk_size(disk.disk_id, size)
        previous = None if options.full else catalog.previous_map(vm_id, disk.disk_id)
        if previous is not None and previous.block_size != settings.block_size:
            previous = None
        diff_against: reader.Previous | None = previous
        if previous is not None:
            lost = _lost_blocks(previous, store, settings.workers)
            if lost:
                diff_against = _Changed(previous, lost)
                if healed is not None:
                    healed.append(
                        f"disk {disk.disk_id}: {lost.count(1)} block(s) read and stored"
                        " again: their chunks were missing from the repository (healed)")
        scan_store: ChunkStore = Healing(store) if options.full else store
        progress.phase(disk.disk_id, "read")
        scan = reader.scan(path, size, settings.block_size, diff_against, scan_store,
                           full=options.full or previous is None,
                           workers=settings.workers, read_depth=settings.read_depth,
                           direct=settings.direct_io,
                           progress=progress.advanced,
                           cancel=cancel)
        _check_cancel(cancel)
        scan_seconds = time.monotonic() - t1
        progress.phase(disk.disk_id, "detach")
    backup = DiskBackup(
        disk_id=disk.disk_id, size=size, block_size=settings.block_size,
        image_id=disk.image_id, volatile=False, excluded=False,
        bytes_read=scan.bytes_read, bytes_changed=scan.bytes_changed,
        bytes_stored=scan.bytes_stored, attributes=dict(disk.attributes))
    return (previous, backup, scan), scan_seconds


def _attach_disk(vm_id: int, disk: DiskInfo, snap_id: int, stack: ExitStack,
                 stop: threading.Event, *, workspace: Workspace, settings: Settings,
                 progress: Progress, cancel: threading.Event | None) -> Path:
    """Save `disk`'s snapshot as an image and attach it to the proxy VM (both
    undone when `stack` exits); returns its device once found. `stop` set
    means the caller gave up on this disk: nothing more is created."""
    if snap_id != -1:   # the snapshot taken for this backup (a copy of a raw file)
        workspace.copied("snapshot", disk.attributes, disk.size_bytes)
    progress.phase(disk.disk_id, "save-as")
    image_id = stack.enter_context(workspace.saved_image(vm_id, disk.disk_id, snap_id))
    _check_cancel(cancel)
    _check_cancel(stop)
    progress.phase(disk.disk_id, "attach")
    proxy_disk = stack.enter_context(
        workspace.attached(image_id, gone=settings.device_gone, readonly=True))
    _check_cancel(stop)
    path = settings.device(proxy_disk, cancel)
    progress.phase(disk.disk_id, "ready")
    return path


class _Prepared:
    """One disk saved, attached and found ahead (`_attach_disk`) on a thread
    of its own, while the caller reads the disk before it. The thread owns
    the disk's ExitStack: it holds the attachment until `close`, then
    detaches and deletes the image itself, on every path. Only the blocking
    cloud calls run ahead; oned's one operation per VM at a time holds
    through `Cloud`'s per-VM lock, `agent.max_attached` through the
    workspace's `attach_slots` (taken on this thread)."""

    def __init__(self, prepare: Callable[[ExitStack, threading.Event], Path]) -> None:
        self._release = threading.Event()
        self._ready = threading.Event()
        self._path: Path | None = None
        self._error: BaseException | None = None   # preparing failed
        self._late: BaseException | None = None    # undoing failed (beyond `leftovers`)
        self._thread = threading.Thread(target=self._run, args=(prepare,),
                                        name="oneback-prepare", daemon=True)
        self._thread.start()

    def _run(self, prepare: Callable[[ExitStack, threading.Event], Path]) -> None:
        try:
            with ExitStack() as stack:
                try:
                    self._path = prepare(stack, self._release)
                except BaseException as e:
                    self._error = e
                    raise
                finally:
                    self._ready.set()
                self._release.wait()
        except BaseException as e:
            if e is not self._error:
                self._late = e

    def path(self) -> Path:
        """The disk's device, once ready; what preparing it raised, if it failed."""
        self._ready.wait()
        if self._error is not None:
            raise self._error
        assert self._path is not None
        return self._path

    def close(self) -> None:
        """Let the thread detach and delete what it made, and wait for it."""
        self._release.set()
        self._thread.join()
        if self._late is not None:
            late, self._late = self._late, None
            raise late


def _close_all(ahead: Mapping[int, _Prepared]) -> None:
    """On any way out: every disk prepared ahead is released and undone
    before its snapshot is deleted."""
    for prepared in ahead.values():
        try:
            prepared.close()
        except Exception:   # the first failure is already on its way up
            pass


class _Changed:
    """A previous map whose `lost` blocks count as changed (the scan reads
    and stores them again): their chunks are not in the repository."""

    def __init__(self, previous: reader.PreviousMap, lost: bytearray) -> None:
        self._previous, self._lost = previous, lost

    @property
    def size(self) -> int:
        return self._previous.size

    @property
    def block_size(self) -> int:
        return self._previous.block_size

    def checksum(self, index: int) -> bytes | None:
        if 0 <= index < len(self._lost) and self._lost[index]:
            return None
        return self._previous.checksum(index)


def _lost_blocks(previous: reader.PreviousMap, store: ChunkStore, workers: int) -> bytearray:
    """One byte per block of `previous`: 1 where its chunk is not in `store`
    (a hole has none). Empty when every chunk is there. Asks the store once
    per run of equal chunk ids, `workers` questions at a time, in batches
    (memory stays flat whatever the disk size)."""
    n, size = previous.count, CHUNK_ID_SIZE
    chunks = previous.chunks
    hole = bytes(size)

    def runs() -> Iterator[tuple[int, int, bytes]]:
        i = 0
        while i < n:
            c = bytes(chunks[i * size:(i + 1) * size])
            j = i + 1
            while j < n and chunks[j * size:(j + 1) * size] == c:
                j += 1
            if c != hole:
                yield i, j, c
            i = j

    lost = bytearray()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="oneback-has") as pool:
        pending = runs()
        while batch := list(islice(pending, 4096)):
            for (a, b, _), there in zip(batch, pool.map(lambda r: store.has(r[2]), batch),
                                        strict=True):
                if not there:
                    if not lost:
                        lost = bytearray(n)
                    lost[a:b] = b"\x01" * (b - a)
    return lost


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Interrupted("backup interrupted; its temporary cloud objects were removed")


HEARTBEAT = 30.0
"""Seconds between two heartbeats of a running backup's marker (a prune
ignores a marker whose heartbeat is older than `agent.prune.STALE`)."""


@contextmanager
def running(store: Repository, what: str) -> Iterator[None]:
    """Hold a marker in the repository's running/ directory while the block
    runs, refreshed every HEARTBEAT seconds: a prune (in any process or on
    any host) keeps every chunk written or touched since it started."""
    if not isinstance(store, Maintainable):
        yield
        return
    marker = store.running_start(what)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT):
            marker.beat()

    thread = threading.Thread(target=beat, name="oneback-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        marker.end()


TOUCHERS = 8
"""Touches in flight just before a manifest is written."""


RESTORING = "restore-"
"""A restore's marker in running/ is `restore-<owner>-...`: `oneback cleanup`
on another proxy (another catalog, the same oned user) spares the objects
named after `owner` while it is fresh; a restore holds no VM lease."""


@contextmanager
def restoring(store: Repository, owner: str) -> Iterator[None]:
    """Hold a `running` marker naming `owner` around a restore. Best effort:
    a repository this process cannot write (a read-only copy) still restores."""
    with ExitStack() as stack:
        try:
            stack.enter_context(running(store, f"{RESTORING}{owner}"))
        except OnebackError:
            pass
        yield


def restoring_owners(store: Repository) -> set[str]:
    """The owners of the restores running now on any proxy (fresh markers)."""
    from agent.prune import STALE
    if not isinstance(store, Maintainable):
        return set()
    now = store.now()
    return {name[len(RESTORING):].split("-", 1)[0] for name, _, beat in store.running()
            if name.startswith(RESTORING) and beat >= now - STALE}


def _touch_all(store: Repository, vm_id: int, maps: Mapping[int, mf.DiskMap]) -> None:
    """Touch every chunk the backup references, just before its manifest: a
    block unchanged since the previous backup was never written, and its
    chunk file may be old; touched, a prune that has not yet taken it keeps
    it (`Maintainable.retire_all`). A chunk already gone (its last backup
    was forgotten and pruned during this one) fails the backup: it is never
    committed referencing a missing chunk."""
    if not isinstance(store, Maintainable):
        return
    hole = bytes(CHUNK_ID_SIZE)
    todo: list[tuple[int, int, bytes]] = []   # (disk, block, chunk)
    for disk_id, m in sorted(maps.items()):
        last = hole
        chunks = memoryview(m.chunks)
        for i in range(m.count):
            chunk = bytes(chunks[i * CHUNK_ID_SIZE:(i + 1) * CHUNK_ID_SIZE])
            if chunk == hole or chunk == last:
                continue
            last = chunk
            todo.append((disk_id, i, chunk))
    touch = store.touch   # in parallel: on S3 a touch is two round trips
    with ThreadPoolExecutor(TOUCHERS, thread_name_prefix="oneback-touch") as pool:
        for (disk_id, i, chunk), ok in zip(todo, pool.map(lambda t: touch(t[2]), todo),
                                           strict=True):
            if not ok:
                raise RepositoryError(
                    f"chunk {chunk.hex()} of VM {vm_id} disk {disk_id} block {i} was removed"
                    " while the backup ran (the backup it was compared against was forgotten"
                    f" and pruned); back VM {vm_id} up again")
