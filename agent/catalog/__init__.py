"""The SQLite catalog: what was backed up, and what is out in the cloud.

Owns: the schema and its migrations (sqlite-utils `Migrations`), VMs,
backups, their disks and block maps, the chunk index, stored VM and image
documents, and the journal of cloud objects. It is the only module that
writes SQL; it hands out value types from `model.py`, never rows, and turns
sqlite3 errors into RepositoryError at this boundary. Must not: touch the
chunk store, the cloud or devices.

Block maps are stored as a lineage per (VM, disk): a backup adds rows only for
the blocks that changed since the previous backup of that disk (all of them
when it is full, or when there is no usable previous one). The logical map of
backup N is, for each index below its block count, the newest row at or before
N. Every backup is logically full, and the catalog grows with changed blocks,
not with disk size: a row is about 40 bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from agent.catalog.jobs import JobQueue
from agent.catalog.schema import _KNOWN, MIGRATION_SET, MIGRATIONS_TABLE, migrations
from agent.catalog.shared import SharedRecords
from agent.catalog.verify import VerifyRecords
from agent.errors import IntegrityError, InternalError, NotFound, RepositoryError, StateError
from agent.model import (
    CHECKSUM_SIZE,
    CHUNK_ID_SIZE,
    BackupRecord,
    BlockList,
    BlockRecord,
    DiskBackup,
    JournalEntry,
    JournalKind,
    PreviousMap,
    block_count,
    block_length,
)

KINDS = ("full", "incremental")


class BaseGone(StateError):
    """The backup a commit's changed blocks are relative to was forgotten."""


# ---------------------------------------------------------------------------


class Catalog(JobQueue, VerifyRecords, SharedRecords):
    """An open catalog. Thread-safe (calls are serialised). Every writing
    call is one transaction, durable on return (WAL, synchronous=FULL)."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._lock = threading.RLock()

    # -- opening ------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, create: bool = True) -> Catalog:
        """Open the catalog at `path`, creating it (when `create`) and applying
        pending migrations. Raises RepositoryError if it does not exist and
        not `create`, if it is not a catalog, or was written by a newer oneback."""
        path = Path(path)
        conn: sqlite3.Connection | None = None
        if not create and not path.exists():
            raise RepositoryError(
                f"no catalog at {path}; run `oneback init` to create the repository and "
                "its catalog, or `oneback catalog rebuild` to rebuild it from the repository"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit at the driver: every write transaction is opened by
            # `_guard` with BEGIN IMMEDIATE, so it waits for the write lock up
            # front instead of failing with "database is locked" on upgrade.
            conn = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA foreign_keys = ON")
            # Several processes may create or upgrade one catalog at once: one
            # at a time (the migrations' scripts commit as they go, so the
            # SQLite lock alone cannot hold them together).
            with _opening(path):
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = wal")
                conn.execute("PRAGMA synchronous = FULL")
                applied = _applied_migrations(conn)
                newer = [name for name in applied if name not in _KNOWN]
                if newer:
                    raise RepositoryError(
                        f"catalog {path} was written by a newer oneback (schema "
                        f"{', '.join(newer)}); upgrade oneback"
                    )
                if set(_KNOWN) - set(applied):  # new or older: sqlite-utils migrates
                    from sqlite_utils import Database

                    migrations().apply(Database(conn, execute_plugins=False))
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise RepositoryError(
                f"cannot open catalog {path}: {e}; check storage.catalog in the "
                "configuration"
            ) from e
        except OSError as e:
            if conn is not None:
                conn.close()
            raise RepositoryError(
                f"cannot open catalog {path}: {e.strerror or e}; check storage.catalog "
                "in the configuration"
            ) from e
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _guard(self, what: str, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Serialise, wrap writes in one BEGIN IMMEDIATE transaction, translate
        sqlite3 errors."""
        with self._lock:
            try:
                if write:
                    # IMMEDIATE: take the write lock (waiting up to the busy
                    # timeout) before the first read, never upgrade later.
                    self._conn.execute("BEGIN IMMEDIATE")
                    try:
                        yield self._conn
                    except BaseException:
                        if self._conn.in_transaction:
                            self._conn.execute("ROLLBACK")
                        raise
                    self._conn.execute("COMMIT")
                else:
                    yield self._conn
            except sqlite3.IntegrityError as e:
                raise InternalError(f"catalog constraint failed while {what}: {e}") from e
            except sqlite3.Error as e:
                raise RepositoryError(
                    f"catalog {self.path} failed while {what}: {e}"
                ) from e

    # -- identity -------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        with self._guard("reading the catalog's identity") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @property
    def catalog_id(self) -> str:
        """This catalog's own random id (recorded in the manifests it numbers)."""
        found = self._meta("catalog_id")
        if found is None:
            raise InternalError(f"catalog {self.path} has no catalog_id")
        return found

    def adopt_catalog_id(self, catalog_id: str) -> None:
        """Take over the identity of a lost catalog (a rebuild): the backups
        its manifests record become this catalog's own again."""
        with self._guard("taking over a catalog's identity", write=True) as conn:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'catalog_id'", (catalog_id,))

    def repository_id(self) -> str | None:
        """The id of the repository this catalog belongs to; None before
        `oneback init` bound it."""
        return self._meta("repository_id")

    def bind_repository(self, repository_id: str) -> None:
        """Record the repository this catalog belongs to. Idempotent for the
        same id; RepositoryError if it belongs to another one."""
        with self._guard("binding the catalog to its repository", write=True) as conn:
            row = conn.execute(
                "SELECT value FROM meta WHERE key = 'repository_id'").fetchone()
            if row is not None and row[0] != repository_id:
                raise RepositoryError(
                    f"catalog {self.path} belongs to repository {row[0]}, not "
                    f"{repository_id}; use that repository, or another catalog path"
                )
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES "
                         "('repository_id', ?)", (repository_id,))

    def reserve_backup_id(self) -> int:
        """A backup id no backup of this catalog has or will be given by any
        other call: ids are never reused, even when the backup that reserved
        one never commits. Durable on return."""
        with self._guard("reserving a backup id", write=True) as conn:
            row = conn.execute(
                "SELECT seq FROM sqlite_sequence WHERE name = 'backups'").fetchone()
            if row is None:
                top = int(conn.execute("SELECT coalesce(max(id), 0) FROM backups").fetchone()[0])
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('backups', ?)",
                             (top + 1,))
                return top + 1
            conn.execute("UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'backups'")
            return int(row[0]) + 1

    def backup_count(self) -> int:
        with self._guard("counting backups") as conn:
            return int(conn.execute("SELECT count(*) FROM backups").fetchone()[0])

    def manifest_of(self, backup_id: int) -> str | None:
        """The name of the backup's manifest in the repository (None for a
        backup committed before manifests existed). NotFound if no backup."""
        with self._guard("reading a manifest name") as conn:
            row = conn.execute("SELECT manifest FROM backups WHERE id = ?",
                               (backup_id,)).fetchone()
        if row is None:
            raise NotFound(f"backup {backup_id} does not exist; `oneback list` shows backups")
        return None if row[0] is None else str(row[0])

    def backups_without_manifest(self) -> list[int]:
        """Ids of backups committed before manifests existed, oldest first."""
        with self._guard("listing backups without a manifest") as conn:
            return [int(r[0]) for r in conn.execute(
                "SELECT id FROM backups WHERE manifest IS NULL ORDER BY id")]

    def set_manifest(self, backup_id: int, name: str) -> None:
        """Record the manifest written for an older backup. Durable on return."""
        with self._guard(f"recording the manifest of backup {backup_id}", write=True) as conn:
            cur = conn.execute("UPDATE backups SET manifest = ? WHERE id = ?", (name, backup_id))
            if cur.rowcount == 0:
                raise NotFound(f"backup {backup_id} does not exist")

    # -- journal of cloud objects ----------------------------------------------

    def journal_record(
        self,
        kind: JournalKind,
        name: str,
        job: str,
        vm_id: int | None = None,
        disk_id: int | None = None,
    ) -> JournalEntry:
        """Record a cloud object about to be created. Durable on return."""
        created = time.time()
        with self._guard("recording a journal entry", write=True) as conn:
            cur = conn.execute(
                "INSERT INTO journal (kind, name, vm_id, disk_id, one_id, job, created) "
                "VALUES (?, ?, ?, ?, NULL, ?, ?)",
                (JournalKind(kind).value, name, vm_id, disk_id, job, created),
            )
            entry_id = cur.lastrowid
        assert entry_id is not None
        return JournalEntry(entry_id, JournalKind(kind), name, vm_id, disk_id, None, job, created)

    def journal_created(self, entry_id: int, one_id: int) -> None:
        """Record the cloud id the creating call returned. Durable on return."""
        with self._guard("updating a journal entry", write=True) as conn:
            cur = conn.execute("UPDATE journal SET one_id = ? WHERE id = ?", (one_id, entry_id))
            if cur.rowcount == 0:
                raise NotFound(f"journal entry {entry_id} does not exist")

    def journal_done(self, entry_id: int) -> None:
        """Forget an object that was removed (or never created). Idempotent."""
        with self._guard("removing a journal entry", write=True) as conn:
            conn.execute("DELETE FROM journal WHERE id = ?", (entry_id,))

    def journal_pending(self) -> list[JournalEntry]:
        """Every recorded object not yet done, oldest first."""
        with self._guard("reading the journal") as conn:
            rows = conn.execute(
                "SELECT id, kind, name, vm_id, disk_id, one_id, job, created "
                "FROM journal ORDER BY id"
            ).fetchall()
        return [
            JournalEntry(r[0], JournalKind(r[1]), r[2], r[3], r[4], r[5], r[6], r[7])
            for r in rows
        ]

    # -- backups --------------------------------------------------------------

    def commit_backup(
        self,
        *,
        vm_id: int,
        vm_name: str,
        kind: str,
        started: float,
        finished: float,
        vm_document: str,
        image_documents: Mapping[int, str],
        disks: Sequence[DiskBackup],
        blocks: Mapping[int, Sequence[BlockRecord]],
        warnings: Sequence[str] = (),
        chunk_sizes: Mapping[bytes, int] | None = None,
        backup_id: int | None = None,
        manifest: str | None = None,
        based_on: Mapping[int, int] | None = None,
        imported_from: str | None = None,
    ) -> BackupRecord:
        """Commit a backup in one transaction; call only when every chunk its
        blocks reference is durable in the store. `blocks[disk_id]` holds the
        blocks that changed since the disk's previous backup (`previous_map`):
        every block when there is none or its block size differs, and always
        the blocks past its end. More is fine (a --full scan gives all).
        Excluded and volatile disks have no blocks. `chunk_sizes` gives the
        stored size of chunks new to the store; a BlockList carries its own.
        Memory stays flat: blocks are written as they are read from `blocks`.
        Raises InternalError if the blocks break that contract; nothing is
        written then. The VM must not be backed up concurrently (its previous
        map must still be the latest when this commits). `backup_id`: one
        from `reserve_backup_id` (or a rebuild's), else a new one is taken;
        `manifest`: the name of the backup's manifest in the repository;
        `based_on`: {disk id: the backup whose map the scan diffed against}:
        BaseGone, with nothing written, if one was forgotten meanwhile (its
        rows are gone, so the changed blocks alone no longer make a map).
        `imported_from`: the catalog that wrote `manifest` (an import by
        sync), recorded in the same transaction (`mark_imported`)."""
        if kind not in KINDS:
            raise InternalError(f"backup kind must be one of {KINDS}, not {kind!r}")
        disk_ids = [d.disk_id for d in disks]
        if len(set(disk_ids)) != len(disk_ids):
            raise InternalError(f"backup of VM {vm_id} lists a disk twice: {disk_ids}")
        unknown = set(blocks) - {d.disk_id for d in disks if _reads(d)}
        if unknown:
            raise InternalError(
                f"backup of VM {vm_id} has blocks for disks it did not read: {sorted(unknown)}"
            )
        sizes = chunk_sizes or {}
        with self._guard(f"committing a backup of VM {vm_id}", write=True) as conn:
            for disk_id, diffed in sorted((based_on or {}).items()):
                if conn.execute("SELECT 1 FROM backups WHERE id = ?",
                                (diffed,)).fetchone() is None:
                    raise BaseGone(f"backup {diffed}, which the backup of VM {vm_id} disk "
                                   f"{disk_id} was compared against, was forgotten")
            conn.execute(
                "INSERT INTO vms (id, name, gone) VALUES (?, ?, 0) "
                "ON CONFLICT (id) DO UPDATE SET name = excluded.name, gone = 0",
                (vm_id, vm_name),
            )
            cur = conn.execute(
                "INSERT INTO backups (id, vm_id, vm_name, kind, started, finished, "
                "vm_document, warnings, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (backup_id, vm_id, vm_name, kind, started, finished,
                 _document(conn, vm_document), json.dumps(list(warnings)), manifest),
            )
            backup_id = cur.lastrowid
            assert backup_id is not None
            conn.executemany(
                "INSERT INTO backup_images (backup_id, image_id, document) VALUES (?, ?, ?)",
                [(backup_id, image_id, _document(conn, xml))
                 for image_id, xml in sorted(image_documents.items())],
            )
            for disk in disks:
                lineage = _lineage(conn, vm_id, disk.disk_id)
                records = blocks.get(disk.disk_id, ())
                if _reads(disk):
                    base = _base(conn, lineage, backup_id)
                    _check_blocks(vm_id, disk, records, base)
                conn.execute(
                    "INSERT INTO disks (backup_id, disk_id, lineage, size, block_size, image_id, "
                    "volatile, excluded, bytes_read, bytes_changed, bytes_stored, attributes) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (backup_id, disk.disk_id, lineage, disk.size, disk.block_size,
                     disk.image_id, int(disk.volatile), int(disk.excluded), disk.bytes_read,
                     disk.bytes_changed, disk.bytes_stored,
                     json.dumps(dict(disk.attributes), sort_keys=True)),
                )
                _insert_blocks(conn, lineage, backup_id, records, sizes)
            if imported_from is not None:
                conn.execute("INSERT OR REPLACE INTO imported (backup_id, manifest, writer) "
                             "VALUES (?, ?, ?)", (backup_id, manifest, imported_from))
        return BackupRecord(
            id=backup_id, vm_id=vm_id, vm_name=vm_name, kind=kind, started=started,
            finished=finished, disks=tuple(disks), warnings=tuple(warnings), vm_gone=False,
        )

    def get_backup(self, backup_id: int) -> BackupRecord:
        """The backup, or NotFound."""
        found = self._backups("b.id = ?", (backup_id,))
        if not found:
            raise NotFound(f"backup {backup_id} does not exist; `oneback list` shows backups")
        return found[0]

    def list_backups(self, vm_id: int | None = None) -> list[BackupRecord]:
        """Every backup (of one VM), oldest first."""
        if vm_id is None:
            return self._backups("1", ())
        return self._backups("b.vm_id = ?", (vm_id,))

    def last_backup(self, vm_id: int) -> BackupRecord | None:
        """The VM's newest backup (the one that started last; an older one
        imported later from another agent has a higher id), or None."""
        found = self._backups(
            "b.id = (SELECT id FROM backups WHERE vm_id = ? ORDER BY started DESC, id DESC"
            " LIMIT 1)", (vm_id,))
        return found[0] if found else None

    def _backups(self, where: str, params: tuple[object, ...]) -> list[BackupRecord]:
        with self._guard("listing backups") as conn:
            rows = conn.execute(
                "SELECT b.id, b.vm_id, b.vm_name, b.kind, b.started, b.finished, b.warnings, "
                f"v.gone FROM backups b JOIN vms v ON v.id = b.vm_id WHERE {where} "
                "ORDER BY b.id",
                params,
            ).fetchall()
            disks: dict[int, list[DiskBackup]] = {r[0]: [] for r in rows}
            for d in conn.execute(
                "SELECT d.backup_id, d.disk_id, d.size, d.block_size, d.image_id, d.volatile, "
                "d.excluded, d.bytes_read, d.bytes_changed, d.bytes_stored, d.attributes "
                f"FROM disks d JOIN backups b ON b.id = d.backup_id WHERE {where} "
                "ORDER BY d.backup_id, d.disk_id",
                params,
            ):
                disks[d[0]].append(DiskBackup(
                    disk_id=d[1], size=d[2], block_size=d[3], image_id=d[4],
                    volatile=bool(d[5]), excluded=bool(d[6]), bytes_read=d[7],
                    bytes_changed=d[8], bytes_stored=d[9], attributes=json.loads(d[10]),
                ))
        return [
            BackupRecord(
                id=r[0], vm_id=r[1], vm_name=r[2], kind=r[3], started=r[4], finished=r[5],
                disks=tuple(disks[r[0]]), warnings=tuple(json.loads(r[6])),
                vm_gone=bool(r[7]),
            )
            for r in rows
        ]

    def last_successes(self) -> dict[int, float]:
        """{VM id: when its newest backup finished} for every VM not gone."""
        with self._guard("reading the last backups") as conn:
            return {int(r[0]): float(r[1]) for r in conn.execute(
                "SELECT b.vm_id, max(b.finished) FROM backups b JOIN vms v ON v.id = b.vm_id"
                " WHERE v.gone = 0 GROUP BY b.vm_id")}

    def stored_totals(self) -> tuple[int, int]:
        """(chunks the backups reference, their stored bytes as recorded)."""
        with self._guard("summing the stored chunks") as conn:
            n, size = conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM chunks"
                                   " WHERE refs > 0").fetchone()
        return int(n), int(size)

    def vm_document(self, backup_id: int) -> str:
        """The VM's XML document as saved with the backup."""
        with self._guard("reading a VM document") as conn:
            row = conn.execute(
                "SELECT d.body FROM backups b JOIN documents d ON d.id = b.vm_document "
                "WHERE b.id = ?",
                (backup_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"backup {backup_id} does not exist; `oneback list` shows backups")
        return str(row[0])

    def image_documents(self, backup_id: int) -> dict[int, str]:
        """{image id: XML document} of the images the VM used at the backup."""
        self.get_backup(backup_id)
        with self._guard("reading image documents") as conn:
            rows = conn.execute(
                "SELECT i.image_id, d.body FROM backup_images i "
                "JOIN documents d ON d.id = i.document WHERE i.backup_id = ? "
                "ORDER BY i.image_id",
                (backup_id,),
            ).fetchall()
        return {int(r[0]): str(r[1]) for r in rows}

    def mark_vm_gone(self, vm_id: int) -> None:
        """Record that the VM no longer exists in the cloud (its backups stay).
        A later backup of the same id clears the mark. Idempotent."""
        with self._guard(f"marking VM {vm_id} gone", write=True) as conn:
            conn.execute("UPDATE vms SET gone = 1 WHERE id = ?", (vm_id,))

    # -- block maps -----------------------------------------------------------

    def previous_map(self, vm_id: int, disk_id: int) -> PreviousMap | None:
        """The block map of the latest committed backup that read this disk,
        or None if none did."""
        with self._guard("reading the previous block map") as conn:
            row = conn.execute(
                "SELECT d.backup_id, d.lineage, d.size, d.block_size FROM disks d "
                "JOIN lineages l ON l.id = d.lineage "
                "WHERE l.vm_id = ? AND l.disk_id = ? AND d.volatile = 0 AND d.excluded = 0 "
                "ORDER BY d.backup_id DESC LIMIT 1",
                (vm_id, disk_id),
            ).fetchone()
            if row is None:
                return None
            backup_id, lineage, size, bsize = row
            n = block_count(size, bsize)
            checksums = bytearray(CHECKSUM_SIZE * n)
            chunks = bytearray(CHUNK_ID_SIZE * n)
            found = 0
            for idx, checksum, chunk in conn.execute(_MAP_QUERY, (lineage, backup_id, n)):
                checksums[idx * CHECKSUM_SIZE:(idx + 1) * CHECKSUM_SIZE] = checksum
                if chunk is not None:
                    chunks[idx * CHUNK_ID_SIZE:(idx + 1) * CHUNK_ID_SIZE] = chunk
                found += 1
        if found != n:
            raise IntegrityError(
                f"catalog {self.path}: block map of backup {backup_id} disk {disk_id} has "
                f"{found} of {n} blocks; run a full backup of VM {vm_id}"
            )
        return PreviousMap(backup_id, disk_id, size, bsize, checksums, chunks)  # no copies

    def blocks(self, backup_id: int, disk_id: int) -> Iterator[BlockRecord]:
        """The whole logical block map of a disk at a backup, in index order
        (empty for an excluded or volatile disk). NotFound if there is no
        such backup or disk."""
        with self._guard("reading a block map") as conn:
            row = conn.execute(
                "SELECT lineage, size, block_size, volatile, excluded FROM disks "
                "WHERE backup_id = ? AND disk_id = ?",
                (backup_id, disk_id),
            ).fetchone()
        if row is None:
            raise NotFound(f"backup {backup_id} has no disk {disk_id}")
        lineage, size, bsize, volatile, excluded = row
        if volatile or excluded:
            return iter(())
        return self._iter_blocks(lineage, backup_id, block_count(size, bsize), disk_id)

    def _iter_blocks(self, lineage: int, backup_id: int, n: int,
                     disk_id: int) -> Iterator[BlockRecord]:
        def incomplete(index: int) -> IntegrityError:
            return IntegrityError(
                f"catalog {self.path}: block map of backup {backup_id} disk {disk_id} "
                f"lacks block {index}; back the VM up again with --full"
            )

        expected = 0
        with self._guard("reading a block map") as conn:
            rows = conn.execute(_MAP_QUERY + " ORDER BY g.idx", (lineage, backup_id, n))
        while True:
            with self._guard("reading a block map"):
                batch = rows.fetchmany(4096)
            if not batch:
                break
            for idx, checksum, chunk in batch:
                if idx != expected:
                    raise incomplete(expected)
                expected += 1
                yield BlockRecord(idx, checksum, chunk)
        if expected != n:
            raise incomplete(expected)

    def forget_backup(self, backup_id: int) -> str | None:
        """Remove the backup from the catalog in one transaction, keeping every
        other backup's map intact: a block row of the forgotten backup that
        the next backup reading the same disk inherited (it has no row of its
        own at that index) moves to that backup; the others go, with their
        chunk references. Returns the backup's manifest name (None: it had
        none). NotFound if there is no such backup."""
        with self._guard(f"forgetting backup {backup_id}", write=True) as conn:
            row = conn.execute("SELECT manifest FROM backups WHERE id = ?",
                               (backup_id,)).fetchone()
            if row is None:
                raise NotFound(f"backup {backup_id} does not exist; `oneback list` shows"
                               " backups")
            manifest = None if row[0] is None else str(row[0])
            for lineage, in conn.execute(
                    "SELECT lineage FROM disks WHERE backup_id = ? AND volatile = 0 AND "
                    "excluded = 0", (backup_id,)).fetchall():
                nxt = conn.execute(
                    "SELECT backup_id, size, block_size FROM disks WHERE lineage = ? AND "
                    "backup_id > ? AND volatile = 0 AND excluded = 0 ORDER BY backup_id "
                    "LIMIT 1", (lineage, backup_id)).fetchone()
                if nxt is not None:
                    conn.execute(
                        "UPDATE blocks SET backup = ? WHERE lineage = ? AND backup = ? "
                        "AND idx < ? AND idx NOT IN (SELECT idx FROM blocks WHERE "
                        "lineage = ? AND backup = ?)",
                        (nxt[0], lineage, backup_id, block_count(nxt[1], nxt[2]),
                         lineage, nxt[0]))
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS forgotten (chunk INTEGER PRIMARY KEY, n INTEGER)")
            conn.execute("DELETE FROM temp.forgotten")
            conn.execute(
                "INSERT INTO temp.forgotten (chunk, n) SELECT chunk, count(*) FROM blocks "
                "WHERE backup = ? AND chunk IS NOT NULL GROUP BY chunk", (backup_id,))
            conn.execute("DELETE FROM blocks WHERE backup = ?", (backup_id,))
            conn.execute(
                "UPDATE chunks SET refs = refs - (SELECT n FROM temp.forgotten f WHERE "
                "f.chunk = chunks.id) WHERE id IN (SELECT chunk FROM temp.forgotten)")
            conn.execute(
                "DELETE FROM chunks WHERE refs <= 0 AND id IN (SELECT chunk FROM "
                "temp.forgotten)")
            conn.execute("DELETE FROM temp.forgotten")
            conn.execute("DELETE FROM disks WHERE backup_id = ?", (backup_id,))
            conn.execute("DELETE FROM backup_images WHERE backup_id = ?", (backup_id,))
            conn.execute("DELETE FROM backups WHERE id = ?", (backup_id,))
            conn.execute(
                "DELETE FROM documents WHERE id NOT IN (SELECT vm_document FROM backups) "
                "AND id NOT IN (SELECT document FROM backup_images)")
        return manifest

    def chunks(self) -> Iterator[bytes]:
        """Every chunk id the catalog references (to find orphans in a store)."""
        with self._guard("listing chunks") as conn:
            ids = [bytes(r[0]) for r in conn.execute("SELECT sha256 FROM chunks WHERE refs > 0")]
        return iter(ids)


def _applied_migrations(conn: sqlite3.Connection) -> list[str]:
    """The names of the migrations applied to the catalog, in order (what
    sqlite-utils' Migrations.applied reads, without importing it)."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                          (MIGRATIONS_TABLE,)).fetchone()
    if exists is None:
        return []
    rows = conn.execute(f"SELECT name FROM {MIGRATIONS_TABLE} WHERE migration_set = ?"
                        " ORDER BY rowid", (MIGRATION_SET,))
    return [str(name) for (name,) in rows]


@contextmanager
def _opening(path: Path) -> Iterator[None]:
    """Hold the catalog's open lock (an flock on `<catalog>.lock`, a file of
    its own: closing a descriptor of the database file itself would drop
    SQLite's POSIX locks)."""
    lock = path.parent / (path.name + ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        try:   # a read-only place: nobody can migrate there anyway
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# Newest row at or before a backup for each index of a lineage. SQLite takes
# the bare columns of a max() aggregate from the row holding the maximum.
_MAP_QUERY = (
    "SELECT g.idx, g.checksum, c.sha256 FROM ("
    " SELECT idx, max(backup) AS backup, checksum, chunk FROM blocks"
    " WHERE lineage = ? AND backup <= ? AND idx < ? GROUP BY idx"
    ") AS g LEFT JOIN chunks c ON c.id = g.chunk"
)


def _reads(disk: DiskBackup) -> bool:
    return not (disk.volatile or disk.excluded)


def _document(conn: sqlite3.Connection, body: str) -> int:
    digest = hashlib.sha256(body.encode()).digest()
    row = conn.execute("SELECT id FROM documents WHERE sha256 = ?", (digest,)).fetchone()
    if row is None:
        row = conn.execute(
            "INSERT INTO documents (sha256, body) VALUES (?, ?) RETURNING id", (digest, body)
        ).fetchone()
    return int(row[0])


def _lineage(conn: sqlite3.Connection, vm_id: int, disk_id: int) -> int:
    row = conn.execute(
        "SELECT id FROM lineages WHERE vm_id = ? AND disk_id = ?", (vm_id, disk_id)
    ).fetchone()
    if row is None:
        row = conn.execute(
            "INSERT INTO lineages (vm_id, disk_id) VALUES (?, ?) RETURNING id", (vm_id, disk_id)
        ).fetchone()
    return int(row[0])


def _base(conn: sqlite3.Connection, lineage: int, backup_id: int) -> tuple[int, int] | None:
    """(size, block_size) of the latest earlier backup that read this lineage."""
    row = conn.execute(
        "SELECT size, block_size FROM disks WHERE lineage = ? AND backup_id < ? "
        "AND volatile = 0 AND excluded = 0 ORDER BY backup_id DESC LIMIT 1",
        (lineage, backup_id),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


def _check_blocks(vm_id: int, disk: DiskBackup, records: Sequence[BlockRecord],
                  base: tuple[int, int] | None) -> None:
    """Hold the lineage invariant: after this backup, every index below its
    block count resolves to a row describing this backup's content."""
    where = f"backup of VM {vm_id} disk {disk.disk_id}"
    if disk.block_size <= 0 or disk.size < 0:
        raise InternalError(f"{where}: size {disk.size}, block size {disk.block_size}")
    n = block_count(disk.size, disk.block_size)
    seen = bytearray(n)  # one byte per block, not a set of ints
    for r in records:
        if not 0 <= r.index < n or seen[r.index]:
            raise InternalError(f"{where}: block {r.index} out of range or repeated")
        if len(r.checksum) != CHECKSUM_SIZE or (r.chunk is not None
                                                and len(r.chunk) != CHUNK_ID_SIZE):
            raise InternalError(f"{where}: block {r.index} has a malformed checksum or chunk")
        seen[r.index] = 1
    if base is None or base[1] != disk.block_size:
        required: Iterator[int] = iter(range(n))
    else:
        old_size, bsize = base
        old_n = block_count(old_size, bsize)
        edges = [
            i for i in {old_n - 1, n - 1}
            if 0 <= i < min(old_n, n)
            and block_length(old_size, bsize, i) != block_length(disk.size, bsize, i)
        ]
        required = iter([*edges, *range(min(old_n, n), n)])
    missing = next((i for i in required if not seen[i]), None)
    if missing is not None:
        raise InternalError(
            f"{where}: block {missing} is missing; a full backup, or blocks past "
            "the previous backup's end, must all be given"
        )


_UPSERT_CHUNK = (
    "INSERT INTO chunks (sha256, size, refs) VALUES (?, ?, 1) "
    "ON CONFLICT (sha256) DO UPDATE SET refs = refs + 1, "
    "size = coalesce(size, excluded.size) RETURNING id"
)
_INSERT_BLOCK = "INSERT INTO blocks (lineage, idx, backup, checksum, chunk) VALUES (?, ?, ?, ?, ?)"


def _insert_blocks(conn: sqlite3.Connection, lineage: int, backup_id: int,
                   records: Sequence[BlockRecord], sizes: Mapping[bytes, int]) -> None:
    """Write the block rows, adding one reference per block to its chunk
    (upserted, with its stored size). Streams `records` in batches: no
    per-block Python object outlives its batch, whatever the disk size."""
    packed = isinstance(records, BlockList)   # it carries the stored sizes itself
    pairs: Iterator[tuple[BlockRecord, int]] = (
        records.with_stored() if isinstance(records, BlockList)
        else ((r, 0) for r in records))
    batch: list[tuple[int, int, int, bytes, int | None]] = []
    for r, stored in pairs:
        chunk_row = None
        if r.chunk is not None:
            size = stored if packed else sizes.get(r.chunk)
            chunk_row = int(conn.execute(_UPSERT_CHUNK, (r.chunk, size or None)).fetchone()[0])
        batch.append((lineage, r.index, backup_id, r.checksum, chunk_row))
        if len(batch) >= 4096:
            conn.executemany(_INSERT_BLOCK, batch)
            batch.clear()
    if batch:
        conn.executemany(_INSERT_BLOCK, batch)
