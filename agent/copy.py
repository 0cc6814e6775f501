"""Copies: backups from one repository into another (off-site, 3-2-1).

Owns: choosing what to copy (`select`), copying it (`copy_backups`: the
manifest and only the chunks the target lacks, each chunk verified by the
source store's `get` on the way), registering each copy in the target's
catalog, opening the target named by another configuration file
(`open_target`), and how far the target lags behind (`lag`). Must not:
print (the CLI renders the report), read configuration files itself (it
asks `agent.config`), or write SQL.

A copy keeps the source manifest's name: the name is the backup's identity
across catalogs, so "already copied" is "the target's catalog lists that
name". The target's catalog numbers the copy as its own backup (the target
manifest records that id and catalog, so `forget`, `prune` and `catalog
rebuild` treat it as the target's), and, where the repositories give a
chunk different ids (an encrypted repository keys its ids), the target
manifest carries the target's ids; the VM, disks, block checksums,
documents, times and warnings are the source's.

Order, so that a kill at any point leaves nothing half visible and a rerun
finishes the work: chunks (`put`), a target `flush`, a touch of every chunk
the copy references (a prune on the target keeps them; one taken meanwhile
is written again), the manifest, then the catalog entry. A rerun skips
what the target's catalog lists, imports a manifest the target holds but
its catalog does not list (killed before the entry), and sends only the
chunks `has` says are missing. A running marker in the target (as a backup
writes) covers the whole copy, so a prune on the target is safe beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from agent import config as config_mod
from agent import manifest as mf
from agent.catalog import BaseGone, Catalog
from agent.errors import (
    IntegrityError,
    Interrupted,
    NotFound,
    OnebackError,
    RepositoryError,
    StateError,
    UsageError,
)
from agent.lease import Lease, VmBusy, vm_lock
from agent.model import CHUNK_ID_SIZE, BlockRecord
from agent.store import Repository

HOLE = bytes(CHUNK_ID_SIZE)
PROBE = b"oneback: do these repositories give a chunk the same id?"
TOUCH_ROUNDS = 3
BACKOFF_KEY = "copy"
"""The agent records a failing copy pass under this key (`oneback status`)."""


@runtime_checkable
class Touching(Protocol):
    """A store whose chunks carry a last-use time a prune respects."""

    def touch(self, chunk_id: bytes) -> bool: ...


@dataclass(frozen=True)
class Wanted:
    """A backup of the source catalog to copy."""

    backup_id: int
    vm_id: int
    manifest: str | None     # None: made before manifests (`oneback init` writes one)
    finished: float


@dataclass
class Copied:
    """What happened to one backup."""

    backup_id: int                 # in the source catalog
    vm_id: int
    manifest: str | None
    outcome: str                   # copied | registered | present | gone | failed
    target_backup_id: int | None = None
    chunks: int = 0                # distinct chunks the backup references
    sent: int = 0                  # chunks written to the target
    bytes_sent: int = 0            # their stored bytes
    error: str | None = None
    exit_code: int = 0


@dataclass
class CopyReport:
    target: str                    # the target's configuration file
    repository: str                # the target repository
    translated: bool = False       # chunk ids differ between the repositories
    backups: list[Copied] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> list[Copied]:
        return [c for c in self.backups if c.outcome == "failed"]

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.backups)

    @property
    def bytes_sent(self) -> int:
        return sum(c.bytes_sent for c in self.backups)


@dataclass
class Target:
    """The repository a copy writes into, with its catalog."""

    config: Path
    cfg: config_mod.Config
    catalog: Catalog
    store: Repository


@contextmanager
def open_target(config: Path, *, source_id: str | None = None,
                lock_days: int | None = None) -> Iterator[Target]:
    """The repository and catalog named by the configuration file `config`
    (checked as every command checks its own: `repository.open_checked`),
    with a lease on its catalog while open. UsageError when it is the
    source repository itself (`source_id`), or `lock_days` is asked of a
    store that cannot lock (Object Lock needs an S3 target)."""
    from agent import repository
    cfg = config_mod.load(config)
    if lock_days is not None and isinstance(cfg.storage.repository, Path):
        raise UsageError(
            f"--lock-days needs an S3 target with Object Lock; the repository of"
            f" {config} ({cfg.storage.repository}) is a local directory: drop"
            " --lock-days (and [copy] lock_days), or copy to an S3 bucket with"
            " Object Lock")
    # lock_days overrides the target's storage.s3.lock_days: every chunk and
    # manifest the copy writes carries that retention (S3 Object Lock)
    catalog, store = repository.open_checked(cfg.storage, cfg.storage.catalog,
                                             lock_days=lock_days)
    try:
        if source_id is not None and store.id == source_id:
            raise UsageError(
                f"--to {config} names the source repository itself ({cfg.storage.repository});"
                " give the configuration of another repository")
        target: Repository = store
        lease = Lease.acquire(cfg.storage.catalog)
        try:
            yield Target(config, cfg, catalog, target)
        finally:
            lease.release()
    finally:
        catalog.close()


# -- what to copy ---------------------------------------------------------------


def select(catalog: Catalog, backup_ids: Sequence[int] = (), vm_ids: Sequence[int] = (),
           ) -> list[Wanted]:
    """The source backups to copy, oldest first: those named (NotFound,
    before anything is copied, for an unknown id), else those of `vm_ids`,
    else every backup of the catalog."""
    names = {i: n for n, i in catalog.manifest_names().items()}
    if backup_ids:
        records = [catalog.get_backup(b) for b in dict.fromkeys(backup_ids)]
    elif vm_ids:
        records = [r for vm in dict.fromkeys(vm_ids) for r in catalog.list_backups(vm)]
    else:
        records = catalog.list_backups()
    records.sort(key=lambda r: r.id)
    return [Wanted(r.id, r.vm_id, names.get(r.id), r.finished) for r in records]


# -- copying ----------------------------------------------------------------------


Progress = Callable[[Copied], None]


def copy_backups(source: Repository, wanted: Sequence[Wanted], target: Target, *,
                 workers: int = 4, cancel: threading.Event | None = None,
                 done: Progress | None = None) -> CopyReport:
    """Copy each backup of `wanted` into `target` (see the module's
    docstring for the order and the guarantees). Idempotent. A backup that
    cannot be copied (a damaged or missing source chunk, an unreadable
    manifest) is reported as failed, with nothing of it visible in the
    target, and the others are still copied. Interrupted when `cancel` is
    set (between two chunks). `done` is called after each backup."""
    t0 = time.monotonic()
    report = CopyReport(str(target.config), str(target.cfg.storage.repository),
                        translated=source.chunk_id(PROBE) != target.store.chunk_id(PROBE))
    from agent.backup import running  # lazily: the CLI's copy imports no cloud code otherwise
    hints: dict[int, dict[bytes, bytes]] = {}   # VM -> source id -> target id
    with running(target.store, "copy"):
        for w in wanted:
            _check(cancel)
            present = target.catalog.manifest_names()
            result = Copied(w.backup_id, w.vm_id, w.manifest, "present")
            if w.manifest is not None and w.manifest in present:
                result.target_backup_id = present[w.manifest]
            else:
                try:
                    _copy_one(source, w, target, result, workers=workers, cancel=cancel,
                              hints=hints.setdefault(w.vm_id, {}) if report.translated
                              else None)
                except Interrupted:
                    raise
                except OnebackError as e:
                    result.outcome = "failed"
                    result.error = (f"backup {w.backup_id} (VM {w.vm_id}, manifest"
                                    f" {w.manifest}) was not copied: {e.message}")
                    result.exit_code = e.exit_code
            report.backups.append(result)
            if done is not None:
                done(result)
    report.seconds = time.monotonic() - t0
    return report


def failure(report: CopyReport) -> OnebackError | None:
    """The error a copy that left backups behind ends with: one line naming
    each backup (and its chunk), with the first failure's exit code."""
    failed = report.failed
    if not failed:
        return None
    if len(failed) == 1:
        message = str(failed[0].error)
    else:
        message = (f"{len(failed)} backups were not copied: "
                   + " | ".join(str(c.error) for c in failed))
    error = OnebackError(message[:4000])
    error.exit_code = failed[0].exit_code or 1
    return error


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Interrupted("copy interrupted; what was copied stays, run it again to finish")


def _copy_one(source: Repository, w: Wanted, target: Target, result: Copied, *,
              workers: int, cancel: threading.Event | None,
              hints: dict[bytes, bytes] | None) -> None:
    if w.manifest is None:
        raise RepositoryError("it has no manifest (made before manifests existed); run"
                              " `oneback init` with the source configuration to write one")
    name = w.manifest
    try:
        with vm_lock(target.cfg.storage.catalog, w.vm_id):
            done = target.catalog.manifest_names().get(name)
            if done is not None:   # another copier was quicker
                result.target_backup_id = done
                return
            try:
                held = target.store.get_manifest(name)
            except NotFound:
                pass
            else:   # killed after the manifest, before the catalog entry: import it
                result.target_backup_id = _register(target, name, mf.decode(held, name))
                result.outcome = "registered"
                return
            try:
                m = mf.decode(source.get_manifest(name), name)
            except NotFound:
                result.outcome = "gone"   # forgotten in the source meanwhile
                return
            if hints is not None and not hints:
                hints.update(_last_translation(source, target, w.vm_id))
            mapping = _send_chunks(source, target.store, m, result, workers=workers,
                                   cancel=cancel, hints=hints)
            maps = m.maps
            if hints is not None:
                maps = {d: mf.DiskMap(dm.checksums, _translate(dm.chunks, mapping))
                        for d, dm in m.maps.items()}
            copy = replace(m, backup_id=target.catalog.reserve_backup_id(),
                           catalog=target.catalog.catalog_id, maps=maps, previous={})
            target.store.put_manifest(name, mf.encode(copy))
            result.target_backup_id = _register(target, name, copy)
            result.outcome = "copied"
            if hints is not None:   # the next backup of the VM mostly reuses these
                hints.clear()
                hints.update(mapping)
    except VmBusy:
        raise StateError(f"another copy or backup of VM {w.vm_id} into"
                         f" {target.cfg.storage.repository} is running; run the copy again"
                         " when it is done") from None


def _last_translation(source: Repository, target: Target, vm_id: int) -> dict[bytes, bytes]:
    """{source id: target id} read off the VM's latest copy in the target
    (its manifest and the source's of the same name, block by block), so
    copying the next backup between repositories whose ids differ reads
    only the chunks that changed. Empty when there is none to read."""
    last = target.catalog.last_backup(vm_id)
    name = target.catalog.manifest_of(last.id) if last is not None else None
    if name is None:
        return {}
    try:
        ours = mf.decode(target.store.get_manifest(name), name)
        theirs = mf.decode(source.get_manifest(name), name)
    except OnebackError:
        return {}   # not a copy, or no longer in the source: read every chunk
    found: dict[bytes, bytes] = {}
    for disk_id, dm in ours.maps.items():
        other = theirs.maps.get(disk_id)
        if other is None or len(other.chunks) != len(dm.chunks):
            continue
        for i in range(0, len(dm.chunks), CHUNK_ID_SIZE):
            t = bytes(dm.chunks[i:i + CHUNK_ID_SIZE])
            if t != HOLE:
                found[bytes(other.chunks[i:i + CHUNK_ID_SIZE])] = t
    return found


def _send_chunks(source: Repository, target: Repository, m: mf.Manifest, result: Copied, *,
                 workers: int, cancel: threading.Event | None,
                 hints: dict[bytes, bytes] | None) -> dict[bytes, bytes]:
    """Put every chunk of `m` the target lacks, make them durable, and touch
    them all. Returns {source id: target id} (identity when not translating).
    Memory: at most `workers` chunks are in flight."""
    wanted: dict[bytes, None] = {}
    for dm in m.maps.values():
        view = memoryview(dm.chunks)
        last = HOLE
        for i in range(0, len(view), CHUNK_ID_SIZE):
            chunk = bytes(view[i:i + CHUNK_ID_SIZE])
            if chunk != HOLE and chunk != last:
                wanted[chunk] = None
            last = chunk
    result.chunks = len(wanted)
    mapping: dict[bytes, bytes] = {}
    lock = threading.Lock()

    def one(chunk: bytes, force: bool = False) -> None:
        if hints is None:
            if not force and target.has(chunk):
                tid, written = chunk, 0
            else:
                tid, written = chunk, target.put(chunk, _read(source, chunk))
        else:
            known = hints.get(chunk)
            if known is not None and not force and target.has(known):
                tid, written = known, 0
            else:
                data = _read(source, chunk)
                tid = target.chunk_id(data)
                written = target.put(tid, data) if force or not target.has(tid) else 0
        with lock:
            mapping[chunk] = tid
            if written:
                result.sent += 1
                result.bytes_sent += written

    _run_all(one, wanted, workers, cancel)
    for _ in range(TOUCH_ROUNDS):
        target.flush()   # data first: every chunk durable before the manifest
        if not isinstance(target, Touching):
            return mapping
        lost = [s for s, t in mapping.items() if not target.touch(t)]
        if not lost:
            return mapping
        # a prune on the target took them after `has` said they were there
        _run_all(lambda c: one(c, force=True), dict.fromkeys(lost), workers, cancel)
    raise RepositoryError(f"chunks of the backup kept disappearing from {target} while it"
                          " was copied (a prune running there?); run the copy again")


def _read(source: Repository, chunk: bytes) -> bytes:
    """The verified chunk; IntegrityError naming it when it is damaged or missing."""
    try:
        return source.get(chunk)
    except NotFound as e:
        raise IntegrityError(f"chunk {chunk.hex()} is missing from the source repository"
                             f" ({e.message}); run `oneback verify` there") from e


def _run_all(task: Callable[[bytes], None], chunks: dict[bytes, None], workers: int,
             cancel: threading.Event | None) -> None:
    """`task` on every chunk, `workers` at a time; the first error stops the
    rest and is raised."""
    workers = max(1, workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="oneback-copy") as pool:
        pending: set[Future[None]] = set()
        try:
            for chunk in chunks:
                _check(cancel)
                if len(pending) >= 2 * workers:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in finished:
                        f.result()
                pending.add(pool.submit(task, chunk))
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def _translate(chunks: bytes | bytearray, mapping: dict[bytes, bytes]) -> bytearray:
    out = bytearray(len(chunks))
    view = memoryview(chunks)
    for i in range(0, len(view), CHUNK_ID_SIZE):
        chunk = bytes(view[i:i + CHUNK_ID_SIZE])
        if chunk != HOLE:
            out[i:i + CHUNK_ID_SIZE] = mapping[chunk]
    return out


def _register(target: Target, name: str, m: mf.Manifest) -> int:
    """Commit the backup of manifest `name` (in the target) to the target's
    catalog; returns its id there. Its blocks are the changes against the
    VM's latest backup in the target (whole maps when there is none).
    Called with the VM's lock on the target catalog held."""
    catalog = target.catalog
    last = catalog.last_backup(m.vm_id)
    backup_id = m.backup_id
    if (m.catalog != catalog.catalog_id or (last is not None and last.id >= backup_id)
            or _taken(catalog, backup_id)):
        backup_id = catalog.reserve_backup_id()   # not this catalog's number to take
    blocks: dict[int, Sequence[BlockRecord]] = {}
    based_on: dict[int, int] = {}
    for disk in m.disks:
        if disk.disk_id not in m.maps:
            continue
        prev = catalog.previous_map(m.vm_id, disk.disk_id)
        base = None
        if prev is not None and prev.block_size == disk.block_size:
            base = (prev.size, mf.DiskMap(prev.checksums, prev.chunks))
            based_on[disk.disk_id] = prev.backup_id
        blocks[disk.disk_id] = mf.changed_blocks(disk, m.maps[disk.disk_id], base)

    def commit(blocks: dict[int, Sequence[BlockRecord]], based_on: dict[int, int]) -> None:
        catalog.commit_backup(
            vm_id=m.vm_id, vm_name=m.vm_name, kind=m.kind, started=m.started,
            finished=m.finished, vm_document=m.vm_document,
            image_documents=m.image_documents, disks=m.disks, blocks=blocks,
            warnings=m.warnings, backup_id=backup_id, manifest=name, based_on=based_on)

    try:
        commit(blocks, based_on)
    except BaseGone:   # the base was forgotten meanwhile: the whole maps
        commit({d: list(dm.records()) for d, dm in m.maps.items()}, {})
    return backup_id


def _taken(catalog: Catalog, backup_id: int) -> bool:
    try:
        catalog.get_backup(backup_id)
    except NotFound:
        return False
    return True


# -- lag ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    """How far the target is behind the source."""

    target: str
    pending: int                   # source backups not (yet) in the target
    oldest: float | None           # when the oldest of them finished
    error: str | None = None       # the target's catalog could not be read


def pending(source: Catalog, target_catalog: Catalog) -> list[tuple[int, str]]:
    """(backup id, manifest) of the source backups the target does not list."""
    copied = target_catalog.manifest_names()
    return sorted((i, n) for n, i in source.manifest_names().items() if n not in copied)


def lag(source: Catalog, target_config: Path) -> Lag:
    """The copy lag, from the two catalogs alone (the target repository is
    not touched, so this answers while it is unreachable). When the target's
    catalog cannot be read, every source backup counts as pending."""
    error = None
    try:
        cfg = config_mod.load(target_config)
        target = Catalog.open(cfg.storage.catalog, create=False)
        try:
            behind = [i for i, _ in pending(source, target)]
        finally:
            target.close()
    except OnebackError as e:
        error = e.message
        behind = sorted(source.manifest_names().values())
    oldest = source.get_backup(behind[0]).finished if behind else None
    return Lag(str(target_config), len(behind), oldest, error)
