"""The repository as a whole: creating it, binding a catalog to it, and
rebuilding a catalog from its manifests.

Owns: `open_store`/`init_store` (the one place that opens either backend,
a directory or an S3 bucket, from `[storage]`), `init` (create a
repository, plain or encrypted, and its catalog, or join an existing
repository with a new catalog), `open_checked` (every other command's
check that the repository is there and is the catalog's own: an unmounted
directory is refused, never replaced; an encrypted one is unlocked,
`agent.keys`), and `rebuild` (a new catalog from the
repository's manifests alone: the same backup ids, VMs, disks, documents and
block maps), and `sync` (import, incrementally, the backups other catalogs
sharing the repository wrote). Must not: write SQL (the catalog does), do file I/O in the
repository (the store does), or print.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from agent import keys, retention
from agent import manifest as mf
from agent.catalog import Catalog
from agent.errors import ConfigError, IntegrityError, OnebackError, RepositoryError
from agent.lease import VmBusy, is_alive, owners_dir, vm_lock
from agent.manifest import DiskMap
from agent.model import CHECKSUM_SIZE, CHUNK_ID_SIZE, BlockList, S3Location, block_count
from agent.retention import Decision, KeepPolicy
from agent.store import Backend, Codec, Locking, Maintainable, Repository
from agent.store.local import LocalStore, fsync_dir

if TYPE_CHECKING:
    from agent.config import StorageConfig
    from agent.store.s3 import S3Settings

def _location(where: Path | StorageConfig) -> Path | S3Location:
    return where if isinstance(where, Path) else where.repository


def _s3_settings(storage: StorageConfig, lock_days: int | None) -> S3Settings:
    from agent.store.s3 import S3Settings  # boto3 only for an S3 repository
    s3 = storage.s3
    if s3 is None:
        raise RepositoryError(f"storage.repository is {storage.repository} but there is no"
                              " [storage.s3] section; add one (see the README, \"S3\")")
    access, secret = s3.read_credentials()
    return S3Settings(
        endpoint_url=s3.endpoint_url, region=s3.region, access_key=access, secret_key=secret,
        addressing_style=s3.addressing_style,
        lock_days=s3.lock_days if lock_days is None else lock_days, lock_mode=s3.lock_mode,
        connections=max(storage.workers, storage.read_depth) + 4, hold=s3.prune_hold)


def open_store(where: Path | StorageConfig, *, lock_days: int | None = None,
               codec: Codec | None = None) -> Backend:
    """Open the existing repository `where` names (never creates one):
    RepositoryError, one line naming it and the fix, when it is missing,
    unreachable or not a repository. `lock_days` overrides
    `storage.s3.lock_days` (a copy's `--lock-days`)."""
    location = _location(where)
    if isinstance(location, Path):
        return LocalStore.open(location)
    from agent.store.s3 import S3Store
    assert not isinstance(where, Path)
    return S3Store.open(location, _s3_settings(where, lock_days), codec=codec)


def init_store(where: Path | StorageConfig, *, lock_days: int | None = None,
               codec: Codec | None = None, encryption: str = "none") -> Backend:
    """Create a new repository where `where` names (an empty directory or
    prefix); RepositoryError if one is there, or anything else is."""
    location = _location(where)
    if isinstance(location, Path):
        return LocalStore.init(location, encryption=encryption)
    from agent.store.s3 import S3Store
    assert not isinstance(where, Path)
    return S3Store.init(location, _s3_settings(where, lock_days), codec=codec,
                        encryption=encryption)


def has_repository(where: Path | StorageConfig) -> bool:
    """True if a repository is there (its config exists). RepositoryError
    when an S3 bucket cannot be reached or read."""
    location = _location(where)
    if isinstance(location, Path):
        return (location / "config").exists()
    try:
        open_store(where)
    except RepositoryError as e:
        if e.message.startswith("no oneback repository at"):
            return False
        raise
    return True


@dataclass(frozen=True)
class InitResult:
    repository: Path | S3Location
    repository_id: str
    catalog: Path
    created_repository: bool      # False: joined an existing repository
    manifests: int                # backups the repository already held
    backfilled: int = 0           # manifests written for an older catalog's backups
    encryption: str = "none"      # the repository's cipher ("none": plain)


def init(where: Path | StorageConfig, catalog_path: Path, *, encrypt: bool = False,
         secrets: keys.Secrets | None = None) -> InitResult:
    """Create the repository `where` names (or join the one there) and bind
    the catalog at `catalog_path` to it (creating it). RepositoryError, with
    nothing changed, if the catalog already belongs to a repository, or holds
    backups while the repository is new. `encrypt`: a new repository is
    encrypted, its master key wrapped under the passphrase of `secrets`
    (which also open an existing encrypted repository; see `keys.unlock`;
    default: `where` when it is the `[storage]` section)."""
    repository = _location(where)
    if secrets is None and not isinstance(where, Path):
        secrets = where
    existing: Catalog | None = None
    if catalog_path.exists():
        existing = Catalog.open(catalog_path)
        try:
            bound = existing.repository_id()
            count = existing.backup_count()
        finally:
            existing.close()
        if bound is not None:
            raise RepositoryError(
                f"catalog {catalog_path} is already initialised (repository {bound}); "
                "nothing to do, or choose another storage.catalog"
            )
        if count and not has_repository(where):
            raise RepositoryError(
                f"catalog {catalog_path} holds {count} backups but there is no repository "
                f"at {repository}; mount the repository there, or fix storage.repository"
            )
    joined = has_repository(where)
    store = open_store(where) if joined else _create(where, encrypt, secrets)
    if joined:
        _check_joined(store, encrypt)
        _unlock_or_finish(store, secrets)
    manifests = sum(1 for _ in store.manifests()) if joined else 0
    with Catalog.open(catalog_path) as catalog:
        backfilled = backfill(catalog, store)
        catalog.bind_repository(store.id)
    return InitResult(repository, store.id, catalog_path, not joined, manifests, backfilled,
                      store.encryption)


# -- encryption (agent.keys): the only encryption-specific part of opening -------------


def _create(where: Path | StorageConfig, encrypt: bool, secrets: keys.Secrets | None
            ) -> Backend:
    """A new repository: plain, or encrypted with a new master key wrapped
    under the configured passphrase (checked before anything is created)."""
    passphrase_file = secrets.passphrase_file if secrets is not None else None
    if not encrypt:
        if passphrase_file is not None or (secrets is not None and secrets.key_file):
            raise ConfigError(
                "storage.passphrase_file (or key_file) is set: run `oneback init "
                "--encryption` to create an encrypted repository, or remove it for a plain one")
        return init_store(where)
    if secrets is None or passphrase_file is None:
        raise ConfigError("`oneback init --encryption` needs storage.passphrase_file: a "
                          "file holding the new repository's passphrase (mode 0600)")
    secrets.read_passphrase()   # a missing or unsafe file: refused before anything is made
    from agent.store.encryption import ALGORITHM
    store = init_store(where, encryption=ALGORITHM)
    keys.create(store, secrets)
    return store


def _unlock_or_finish(store: Backend, secrets: keys.Secrets | None) -> None:
    """Unlock the joined repository; or, when it is encrypted and holds no key
    blob, no manifest and no chunk (an `init --encryption` killed between
    its config and its first key), give it its first key, as that init
    would have. A repository holding data is never given a new key."""
    if (store.encryption == "none" or secrets is None or secrets.passphrase_file is None
            or store.key_names() or next(store.manifests(), None) is not None
            or next(store.chunk_files(), None) is not None):
        keys.unlock(store, secrets)
        return
    try:
        keys.create(store, secrets, keys.FIRST_KEY)
    except RepositoryError:   # another process finished it first: use its key
        keys.unlock(store, secrets)


def _check_joined(store: Backend, encrypt: bool) -> None:
    if encrypt and store.encryption == "none":
        raise ConfigError(f"repository {store} exists and is not encrypted; "
                          "`--encryption` applies to a new repository only: choose another "
                          "storage.repository, or join this one without it")


def backfill(catalog: Catalog, store: Repository) -> int:
    """Write a manifest for every backup of `catalog` that has none (one
    committed by a oneback older than manifests), so the repository describes
    it too. Idempotent; returns how many were written. Like a backup, it
    holds a running marker and touches every chunk of a manifest just before
    writing it: the old backups' chunks are referenced by no manifest yet, so
    a prune running meanwhile (another agent sharing the repository) would
    otherwise delete them under the manifests being written."""
    from agent.backup import running  # lazily: init needs no cloud code otherwise

    with running(store, "backfill"):
        return _backfill(catalog, store)


def _backfill(catalog: Catalog, store: Repository) -> int:
    done = 0
    hole = bytes(CHUNK_ID_SIZE)
    for backup_id in catalog.backups_without_manifest():
        record = catalog.get_backup(backup_id)
        maps = {}
        for disk in record.disks:
            if disk.volatile or disk.excluded:
                continue
            n = block_count(disk.size, disk.block_size)
            checksums = bytearray(CHECKSUM_SIZE * n)
            chunks = bytearray(CHUNK_ID_SIZE * n)
            for r in catalog.blocks(backup_id, disk.disk_id):
                checksums[r.index * CHECKSUM_SIZE:(r.index + 1) * CHECKSUM_SIZE] = r.checksum
                if r.chunk is not None:
                    chunks[r.index * CHUNK_ID_SIZE:(r.index + 1) * CHUNK_ID_SIZE] = r.chunk
            maps[disk.disk_id] = DiskMap(checksums, chunks)
        m = mf.Manifest(
            backup_id=backup_id, catalog=catalog.catalog_id, vm_id=record.vm_id,
            vm_name=record.vm_name, kind=record.kind, started=record.started,
            finished=record.finished, vm_document=catalog.vm_document(backup_id),
            image_documents=catalog.image_documents(backup_id), disks=record.disks,
            warnings=record.warnings, maps=maps)
        name = mf.new_name(record.vm_id, record.started)
        if isinstance(store, Maintainable):
            for dmap in maps.values():
                last = hole
                for i in range(dmap.count):
                    chunk = bytes(dmap.chunks[i * CHUNK_ID_SIZE:(i + 1) * CHUNK_ID_SIZE])
                    if chunk not in (hole, last):
                        store.touch(chunk)   # missing already: `oneback verify` names it
                    last = chunk
        store.put_manifest(name, mf.encode(m))
        catalog.set_manifest(backup_id, name)
        done += 1
    return done


def open_checked(where: Path | StorageConfig, catalog_path: Path,
                 secrets: keys.Secrets | None = None, *,
                 lock_days: int | None = None) -> tuple[Catalog, Backend]:
    """The catalog and its repository, after checking they belong together.
    RepositoryError (one line naming the path and the fix) when either is
    missing, the repository is empty (not mounted?), or is not the catalog's.
    An encrypted repository is unlocked with `secrets` (default: `where` when
    it is the `[storage]` section; ConfigError, one line, if they do not
    open it; see `keys.unlock`)."""
    repository = _location(where)
    if secrets is None and not isinstance(where, Path):
        secrets = where
    catalog = Catalog.open(catalog_path, create=False)
    try:
        bound = catalog.repository_id()
        if (bound is not None and isinstance(repository, Path)
                and not (repository / "config").exists()):
            try:
                LocalStore.open(repository)   # says why: missing, empty, not a repository
            except RepositoryError as e:
                raise RepositoryError(
                    f"{e.message.split(';')[0]}; catalog {catalog_path} belongs to repository "
                    f"{bound}: mount it at {repository} (or fix storage.repository); if it "
                    "is lost, move the catalog away and run `oneback init`"
                ) from e
        try:
            store = open_store(where, lock_days=lock_days)
        except RepositoryError as e:
            if bound is None or not e.message.startswith("no oneback repository at"):
                raise
            raise RepositoryError(
                f"{e.message.split(';')[0]}; catalog {catalog_path} belongs to repository "
                f"{bound}: fix storage.repository (or [storage.s3]) to name it; if it is "
                "lost, move the catalog away and run `oneback init`") from e
        if bound is None:
            raise RepositoryError(
                f"catalog {catalog_path} records no repository (made by an older oneback); "
                f"run `oneback init` to bind it to {repository}"
            )
        if bound != store.id:
            raise RepositoryError(
                f"the repository at {repository} (id {store.id}) is not the one catalog "
                f"{catalog_path} belongs to (id {bound}); is the right filesystem mounted? "
                "Fix storage.repository, or run `oneback catalog rebuild --force` to make "
                "the catalog this repository's"
            )
        keys.unlock(store, secrets)
    except BaseException:
        catalog.close()
        raise
    return catalog, store


# -- rebuild ------------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    backup_id: int
    vm_id: int
    manifest: str
    kind: str
    renumbered_from: int | None = None


@dataclass
class RebuildReport:
    catalog: Path
    repository_id: str
    imported: list[Imported] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)   # (manifest, why)
    duplicates: list[str] = field(default_factory=list)   # a backup's second manifest
    replaced: Path | None = None   # where the old catalog was moved
    catalog_id: str = ""           # the identity the rebuilt catalog has
    foreign: int = 0               # imported backups another catalog wrote


def rebuild(store: Repository, repository_id: str, catalog_path: Path, *,
            force: bool = False, as_catalog: str | None = None) -> RebuildReport:
    """Build a new catalog at `catalog_path` from the manifests in `store`.
    Each backup keeps the id its manifest records; when manifests from two
    catalogs claim one id, the one that finished first keeps it and the others
    get new ids past the largest (reported as renumbered). A damaged manifest
    is reported and skipped (every manifest holds a full map, so the others
    stay whole). Refuses an existing catalog unless `force` (the old one is
    then kept beside it as `<catalog>.replaced-<time>`), and one in use by a
    running oneback process.

    The rebuilt catalog takes over the identity of the catalog whose
    backups it is rebuilding (`as_catalog`, or the only catalog the manifests
    name): those backups are its own again, and `forget` deletes their
    manifests. Backups another catalog sharing the repository wrote are
    imported for listing and restoring, but stay that catalog's: forgetting
    them here never deletes their manifests (`foreign`)."""
    if catalog_path.exists() and not force:
        raise RepositoryError(
            f"catalog {catalog_path} exists; pass --force to replace it (the old one is "
            "kept beside it), or choose another storage.catalog"
        )
    _refuse_if_in_use(catalog_path)
    report = RebuildReport(catalog_path, repository_id)

    # Pass 1: read every manifest's header (whole, so damage is found now).
    found: list[tuple[int, float, str, str]] = []
    for name in store.manifests():
        try:
            m = mf.decode(store.get_manifest(name), name)
        except OnebackError as e:
            report.damaged.append((name, e.message))
            continue
        found.append((m.backup_id, m.finished, name, m.catalog))
    found.sort()
    owners = {f[3] for f in found}
    if as_catalog is not None and as_catalog not in owners:
        raise RepositoryError(
            f"no manifest in the repository was written by catalog {as_catalog!r}; the"
            f" catalogs there are: {', '.join(sorted(owners)) or 'none'}")
    adopt = as_catalog if as_catalog is not None else (
        next(iter(owners)) if len(owners) == 1 else None)
    ids: dict[str, tuple[int, int | None]] = {}
    taken: set[int] = set()
    seen: set[tuple[str, int]] = set()
    top = max((f[0] for f in found), default=0)
    for backup_id, _, name, catalog_id in found:
        if (catalog_id, backup_id) in seen:
            report.duplicates.append(name)   # one backup written twice (a re-run backfill)
            continue
        seen.add((catalog_id, backup_id))
        if backup_id in taken:
            top += 1
            ids[name] = (top, backup_id)
        else:
            taken.add(backup_id)
            ids[name] = (backup_id, None)
    order = sorted(ids.items(), key=lambda kv: kv[1][0])

    # Pass 2: import in id order into a new file, then move it into place.
    tmp = catalog_path.parent / f"{catalog_path.name}.rebuild-{os.getpid()}"
    _remove_sqlite(tmp)
    try:
        with Catalog.open(tmp) as catalog:
            catalog.bind_repository(repository_id)
            if adopt is not None:
                catalog.adopt_catalog_id(adopt)
            report.catalog_id = catalog.catalog_id
            report.foreign = sum(1 for f in found if f[3] != report.catalog_id)
            # the previous imported map of each (VM, disk): size, block size, map
            bases: dict[tuple[int, int], tuple[int, int, DiskMap]] = {}
            for name, (backup_id, old_id) in order:
                try:
                    m = mf.decode(store.get_manifest(name), name)
                except OnebackError as e:   # changed since pass 1
                    report.damaged.append((name, e.message))
                    continue
                blocks: dict[int, BlockList] = {}
                for disk in m.disks:
                    if disk.disk_id not in m.maps:
                        continue
                    key = (m.vm_id, disk.disk_id)
                    prev = bases.get(key)
                    base = (prev[0], prev[2]) if prev and prev[1] == disk.block_size else None
                    blocks[disk.disk_id] = mf.changed_blocks(disk, m.maps[disk.disk_id], base)
                    bases[key] = (disk.size, disk.block_size, m.maps[disk.disk_id])
                catalog.commit_backup(
                    vm_id=m.vm_id, vm_name=m.vm_name, kind=m.kind, started=m.started,
                    finished=m.finished, vm_document=m.vm_document,
                    image_documents=m.image_documents, disks=m.disks, blocks=blocks,
                    warnings=m.warnings, backup_id=backup_id, manifest=name)
                if m.catalog != report.catalog_id:   # another catalog's: `sync` keeps it
                    catalog.mark_imported(backup_id, name, m.catalog)
                report.imported.append(Imported(backup_id, m.vm_id, name, m.kind, old_id))
        _remove_sqlite(tmp, keep_main=True)
        if catalog_path.exists():
            report.replaced = catalog_path.parent / (
                f"{catalog_path.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(catalog_path, report.replaced)
            wal = Path(f"{catalog_path}-wal")
            if wal.exists():
                os.replace(wal, Path(f"{report.replaced}-wal"))
            Path(f"{catalog_path}-shm").unlink(missing_ok=True)
        os.replace(tmp, catalog_path)
        fsync_dir(catalog_path.parent)
    except BaseException:
        _remove_sqlite(tmp)
        raise
    return report


def _remove_sqlite(path: Path, keep_main: bool = False) -> None:
    """Remove a SQLite file's companions (and the file itself unless `keep_main`)."""
    for suffix in ("-wal", "-shm", "-journal", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if not keep_main:
        path.unlink(missing_ok=True)


def _refuse_if_in_use(catalog_path: Path) -> None:
    directory = owners_dir(catalog_path)
    if not directory.is_dir():
        return
    for lock in directory.glob("*.lock"):
        if is_alive(catalog_path, lock.stem):
            raise RepositoryError(
                f"catalog {catalog_path} is in use by a running oneback process (the agent?); "
                "stop it, then run `oneback catalog rebuild` again"
            )


def damaged_error(report: RebuildReport) -> IntegrityError | None:
    """The error a rebuild that skipped damaged manifests ends with."""
    if not report.damaged:
        return None
    names = ", ".join(n for n, _ in report.damaged)
    return IntegrityError(
        f"{len(report.damaged)} damaged manifest(s) skipped: {names}; their backups are "
        "not in the rebuilt catalog"
    )


# -- retention ---------------------------------------------------------------


@dataclass(frozen=True)
class ForgetPlan:
    """What a forget decided: each backup of the VMs it looked at, newest first
    per VM, with why it stays (no reasons: forgotten)."""

    decisions: tuple[tuple[int, Decision], ...]    # (VM id, decision)

    @property
    def forget(self) -> list[int]:
        return sorted(d.backup_id for _, d in self.decisions if not d.keep)


def plan_forget(catalog: Catalog, policy: KeepPolicy, vm_ids: list[int] | None = None
                ) -> ForgetPlan:
    """Apply `policy` to each VM of `vm_ids` (None: every VM with backups)."""
    backups = catalog.list_backups()
    by_vm: dict[int, list[tuple[int, float]]] = {}
    for b in backups:
        if vm_ids is None or b.vm_id in vm_ids:
            by_vm.setdefault(b.vm_id, []).append((b.id, b.started))
    decisions = [(vm, d) for vm in sorted(by_vm) for d in retention.apply(policy, by_vm[vm])]
    return ForgetPlan(tuple(decisions))


def forget(catalog: Catalog, store: Repository, backup_ids: list[int], *,
           locked: list[tuple[int, float]] | None = None) -> list[int]:
    """Forget each backup: first from the catalog (one transaction, which
    keeps every other backup's map whole), then its manifest from the
    repository, so a crash between the two leaves a manifest (its chunks
    stay until a later forget or a rebuild), never a catalog backup whose
    chunks a prune may take. Chunks are freed by `oneback prune`. Returns
    the ids forgotten; NotFound for an unknown id (the earlier ones stay
    forgotten). A backup whose manifest is under Object Lock is not
    forgotten (its manifest cannot be deleted before its retention date):
    it is appended to `locked` as (id, date) and stays in the catalog."""
    done = []
    own = catalog.catalog_id
    for backup_id in backup_ids:
        if isinstance(store, Locking):
            name = catalog.manifest_of(backup_id)
            until = store.manifest_locked_until(name) if name else None
            if until is not None:
                if locked is not None:
                    locked.append((backup_id, until))
                continue
        manifest = catalog.forget_backup(backup_id)
        if manifest is not None and _written_by(store, manifest) == own:
            store.delete_manifest(manifest)
        done.append(backup_id)
    return done


def _written_by(store: Repository, manifest: str) -> str | None:
    """The catalog that wrote a manifest; None if it cannot be read. Only
    that catalog may delete it: another catalog sharing the repository (or a
    rebuilt one that imported it) forgets the backup for itself alone, and
    the chunks stay for the catalog that still lists it."""
    try:
        return mf.decode(store.get_manifest(manifest), manifest).catalog
    except OnebackError:
        return None


# -- sync: the backups other catalogs wrote ------------------------------------------


@dataclass
class SyncReport:
    """What one `sync` did."""

    imported: list[Imported] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)   # (backup, gone manifest)
    damaged: list[tuple[str, str]] = field(default_factory=list)   # (manifest, why)
    busy: list[str] = field(default_factory=list)   # skipped: that VM's backup runs here
    known: int = 0                                  # manifests the catalog already had


def sync(catalog: Catalog, store: Repository, *, vm_id: int | None = None,
         vm_locked: bool = False) -> SyncReport:
    """Import into `catalog` the backups other catalogs sharing the
    repository wrote since the last sync (their manifests it does not know),
    and drop the imported backups whose manifest their writer forgot (their
    chunks are no longer kept for them). `vm_id`: only that VM's manifests.
    Incremental and idempotent: a second run finds nothing new, and an
    imported backup forgotten here (retention) is not imported again.

    An imported backup gets a new id in this catalog (past every id it
    has), its block map is stored against the catalog's latest map of the
    same disk, and it stays the writer's: `forget` here never deletes its
    manifest. The catalog's own manifests are never imported (one it does
    not know is a backup being committed, or one it forgot). A VM that a
    backup of this catalog is working on is skipped (its lineage must not
    move under the backup) and imported by the next sync. A damaged
    manifest is reported and skipped. `vm_locked`: the caller holds
    `vm_id`'s lock (`lease.vm_lock`) itself, and is not backing it up."""
    report = SyncReport()
    own = catalog.catalog_id
    known = set(catalog.manifest_names()) | catalog.imported_manifests()
    prefix = None if vm_id is None else f"{int(vm_id)}/"
    listed = [n for n in store.manifests() if prefix is None or n.startswith(prefix)]
    present = set(listed)
    for backup_id, (name, _writer) in sorted(catalog.imported_backups().items()):
        if (prefix is None or name.startswith(prefix)) and name not in present:
            try:
                catalog.forget_backup(backup_id)
            except OnebackError:
                continue
            report.dropped.append((backup_id, name))
    found: list[tuple[float, str, mf.Manifest]] = []
    for name in listed:
        if name in known:
            report.known += 1
            continue
        try:
            m = mf.decode(store.get_manifest(name), name)
        except OnebackError as e:
            report.damaged.append((name, e.message))
            continue
        if m.catalog != own:
            found.append((m.finished, name, m))
    found.sort(key=lambda f: (f[0], f[1]))
    for _, name, m in found:
        try:
            with (nullcontext() if vm_locked and m.vm_id == vm_id
                  else vm_lock(catalog.path, m.vm_id)):
                if name in catalog.manifest_names():   # another sync got there first
                    continue
                record = _import(catalog, m, name)   # marked imported in its transaction
        except VmBusy:
            report.busy.append(name)
            continue
        report.imported.append(Imported(record, m.vm_id, name, m.kind,
                                        renumbered_from=m.backup_id))
    return report


def _import(catalog: Catalog, m: mf.Manifest, name: str) -> int:
    blocks: dict[int, BlockList] = {}
    for disk in m.disks:
        if disk.disk_id not in m.maps:
            continue
        prev = catalog.previous_map(m.vm_id, disk.disk_id)
        base = ((prev.size, DiskMap(prev.checksums, prev.chunks))
                if prev is not None and prev.block_size == disk.block_size else None)
        blocks[disk.disk_id] = mf.changed_blocks(disk, m.maps[disk.disk_id], base)
    record = catalog.commit_backup(
        vm_id=m.vm_id, vm_name=m.vm_name, kind=m.kind, started=m.started,
        finished=m.finished, vm_document=m.vm_document, image_documents=m.image_documents,
        disks=m.disks, blocks=blocks, warnings=m.warnings, manifest=name,
        imported_from=m.catalog)
    return record.id
