"""The catalog's schema: every migration, in order. Append; never edit one
that has shipped. Must not: hold queries (the Catalog and its parts do)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a catalog needs migrating: 40 ms of every start-up
    from sqlite_utils import Database, Migrations

MIGRATION_SET = "oneback"
MIGRATIONS_TABLE = "_sqlite_migrations"  # sqlite-utils' record of applied migrations
_KNOWN: list[str] = []
_STEPS: list[Callable[[Database], None]] = []


def _migration(fn: Callable[[Database], None]) -> Callable[[Database], None]:
    """Register a migration under its function name, and remember the name so
    a catalog carrying names we do not know is recognised as newer."""
    _KNOWN.append(fn.__name__)
    _STEPS.append(fn)
    return fn


def migrations() -> Migrations:
    """Every migration as sqlite-utils' `Migrations`, built only when a
    catalog has some pending (a new or older catalog), so commands opening
    an up-to-date catalog do not import sqlite-utils."""
    from sqlite_utils import Migrations

    found = Migrations(MIGRATION_SET)
    for fn in _STEPS:
        found(name=fn.__name__)(fn)
    return found


@_migration
def m001_initial(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE vms (
            id INTEGER PRIMARY KEY,               -- OpenNebula VM id (never reused)
            name TEXT NOT NULL,
            gone INTEGER NOT NULL DEFAULT 0       -- 1 once the VM was deleted in the cloud
        );
        CREATE TABLE documents (                  -- VM and image XML, deduplicated
            id INTEGER PRIMARY KEY,
            sha256 BLOB NOT NULL UNIQUE,
            body TEXT NOT NULL
        );
        CREATE TABLE backups (
            id INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused: orders lineages
            vm_id INTEGER NOT NULL REFERENCES vms(id),
            vm_name TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('full', 'incremental')),
            started REAL NOT NULL,
            finished REAL NOT NULL,
            vm_document INTEGER NOT NULL REFERENCES documents(id),
            warnings TEXT NOT NULL DEFAULT '[]'   -- JSON list of strings
        );
        CREATE INDEX backups_vm ON backups (vm_id, id);
        CREATE TABLE backup_images (
            backup_id INTEGER NOT NULL REFERENCES backups(id),
            image_id INTEGER NOT NULL,
            document INTEGER NOT NULL REFERENCES documents(id),
            PRIMARY KEY (backup_id, image_id)
        ) WITHOUT ROWID;
        CREATE TABLE lineages (                   -- one per (VM, disk): keys block rows
            id INTEGER PRIMARY KEY,
            vm_id INTEGER NOT NULL REFERENCES vms(id),
            disk_id INTEGER NOT NULL,
            UNIQUE (vm_id, disk_id)
        );
        CREATE TABLE disks (
            backup_id INTEGER NOT NULL REFERENCES backups(id),
            disk_id INTEGER NOT NULL,
            lineage INTEGER NOT NULL REFERENCES lineages(id),
            size INTEGER NOT NULL,
            block_size INTEGER NOT NULL,
            image_id INTEGER,
            volatile INTEGER NOT NULL,
            excluded INTEGER NOT NULL,
            bytes_read INTEGER NOT NULL,
            bytes_changed INTEGER NOT NULL,
            bytes_stored INTEGER NOT NULL,
            attributes TEXT NOT NULL DEFAULT '{}', -- JSON object: the DISK vector
            PRIMARY KEY (backup_id, disk_id)
        ) WITHOUT ROWID;
        CREATE INDEX disks_lineage ON disks (lineage, backup_id);
        CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            sha256 BLOB NOT NULL UNIQUE,
            size INTEGER,                         -- stored (compressed) bytes; NULL if unknown
            refs INTEGER NOT NULL DEFAULT 0       -- block rows referencing it
        );
        CREATE TABLE blocks (
            lineage INTEGER NOT NULL REFERENCES lineages(id),
            idx INTEGER NOT NULL,
            backup INTEGER NOT NULL REFERENCES backups(id),
            checksum BLOB NOT NULL,               -- xxh3-128
            chunk INTEGER REFERENCES chunks(id),  -- NULL: an all-zero block (hole)
            PRIMARY KEY (lineage, idx, backup)
        ) WITHOUT ROWID;
        CREATE TABLE journal (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            name TEXT NOT NULL,
            vm_id INTEGER,
            disk_id INTEGER,
            one_id INTEGER,
            job TEXT NOT NULL,
            created REAL NOT NULL
        );
        """
    )




@_migration
def m002_jobs(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE jobs (                       -- the agent's durable work queue
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            vm_id INTEGER NOT NULL,
            kind TEXT NOT NULL,                   -- 'backup' | 'snapshot'
            params TEXT NOT NULL DEFAULT '{}',    -- JSON object of strings
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
            reason TEXT NOT NULL DEFAULT '',
            attempts INTEGER NOT NULL DEFAULT 0,
            not_before REAL NOT NULL DEFAULT 0,
            owner TEXT,                           -- lease of the process running it
            created REAL NOT NULL,
            updated REAL NOT NULL,
            result TEXT NOT NULL DEFAULT '',
            error TEXT NOT NULL DEFAULT ''
        );
        -- events for the same VM collapse into one queued job per kind
        CREATE UNIQUE INDEX jobs_queued ON jobs (vm_id, kind) WHERE state = 'queued';
        CREATE INDEX jobs_state ON jobs (state, not_before);
        """
    )


@_migration
def m003_agent_safety(db: Database) -> None:
    db.executescript(
        """
        -- the VM owner's user id: the queue takes turns between owners
        ALTER TABLE jobs ADD COLUMN uid INTEGER;
        ALTER TABLE jobs ADD COLUMN claimed REAL NOT NULL DEFAULT 0;
        CREATE INDEX jobs_uid ON jobs (uid, claimed);
        CREATE TABLE nonces (                     -- hook requests seen (replays refused)
            nonce TEXT PRIMARY KEY,
            seen REAL NOT NULL
        ) WITHOUT ROWID;
        CREATE INDEX nonces_seen ON nonces (seen);
        CREATE TABLE backoff (                    -- what keeps failing, and when to try again
            key TEXT PRIMARY KEY,                 -- e.g. 'reconcile:VM', 'expire:VM:SET'
            vm_id INTEGER,
            what TEXT NOT NULL,
            failures INTEGER NOT NULL,
            error TEXT NOT NULL,
            first_failed REAL NOT NULL,
            last_failed REAL NOT NULL,
            next_try REAL NOT NULL
        ) WITHOUT ROWID;
        """
    )


@_migration
def m004_repository(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE meta (                       -- this catalog's identity and binding
            key TEXT PRIMARY KEY,                 -- 'catalog_id', 'repository_id'
            value TEXT NOT NULL
        ) WITHOUT ROWID;
        INSERT INTO meta (key, value) VALUES ('catalog_id', lower(hex(randomblob(16))));
        -- the backup's manifest in the repository (NULL: committed before manifests)
        ALTER TABLE backups ADD COLUMN manifest TEXT;
        """
    )


@_migration
def m005_verify(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE verify (                     -- the last verify's result, and progress
            key TEXT PRIMARY KEY,                 -- 'background' (the agent) | 'command'
            last_run REAL NOT NULL,
            checked INTEGER NOT NULL,             -- chunks checked by the last slice / run
            bytes_read INTEGER NOT NULL,
            damage TEXT NOT NULL DEFAULT '[]',    -- JSON list of what was found damaged
            cursor BLOB NOT NULL DEFAULT x'',     -- background: next chunk id of the pass
            pass_started REAL NOT NULL DEFAULT 0,
            pass_checked INTEGER NOT NULL DEFAULT 0,
            last_pass_finished REAL,
            read_data INTEGER NOT NULL DEFAULT 1
        ) WITHOUT ROWID;
        """
    )


@_migration
def m006_retention(db: Database) -> None:
    db.executescript(
        """
        -- forgetting a backup finds its block rows without scanning lineages
        CREATE INDEX blocks_backup ON blocks (backup);
        """
    )


@_migration
def m007_multi_agent(db: Database) -> None:
    db.executescript(
        """
        CREATE TABLE imported (                   -- backups another catalog wrote (sync)
            backup_id INTEGER PRIMARY KEY,        -- no REFERENCES: forget leaves the row,
            manifest TEXT NOT NULL,               -- so a sync never imports it again
            writer TEXT NOT NULL                  -- that catalog's id
        ) WITHOUT ROWID;
        CREATE TABLE not_served (                 -- opted-in VMs this proxy cannot attach
            vm_id INTEGER PRIMARY KEY,
            reason TEXT NOT NULL,
            since REAL NOT NULL
        ) WITHOUT ROWID;
        """
    )
