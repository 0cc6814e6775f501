"""The verify's memory, part of the catalog.

Owns: the last result of `oneback verify` and the agent's continuous
verify (where its pass is, what it found), so a restart goes on where it
stopped and `oneback status` can show it; and the chunk ids the catalog
references, in id order, for the continuous verify to walk. Must not:
decide what to check or read chunks (agent.verify does).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict

from agent.model import Damage, VerifyProgress

_COLUMNS = ("key, last_run, checked, bytes_read, damage, cursor, pass_started, pass_checked,"
            " last_pass_finished, read_data")


class VerifyRecords:
    """Mixed into Catalog: uses its serialised, error-translating `_guard`."""

    _guard: Callable[..., AbstractContextManager[sqlite3.Connection]]

    def verify_progress(self, key: str) -> VerifyProgress | None:
        with self._guard("reading the verify progress") as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM verify WHERE key = ?",
                               (key,)).fetchone()
        if row is None:
            return None
        try:
            damage = tuple(Damage(**d) for d in json.loads(row[4]))
        except (ValueError, TypeError):
            damage = ()
        return VerifyProgress(
            key=str(row[0]), last_run=float(row[1]), checked=int(row[2]),
            bytes_read=int(row[3]), damage=damage, cursor=bytes(row[5]),
            pass_started=float(row[6]), pass_checked=int(row[7]),
            last_pass_finished=None if row[8] is None else float(row[8]),
            read_data=bool(row[9]))

    def verify_record(self, p: VerifyProgress) -> None:
        """Store `p` under its key (replacing the last one). Durable on return."""
        with self._guard("recording the verify progress", write=True) as conn:
            conn.execute(
                f"INSERT OR REPLACE INTO verify ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (p.key, p.last_run, p.checked, p.bytes_read,
                 json.dumps([asdict(d) for d in p.damage]), p.cursor, p.pass_started,
                 p.pass_checked, p.last_pass_finished, int(p.read_data)))

    def referenced_chunks(self, low: bytes, high: bytes | None) -> list[bytes]:
        """The ids of chunks the catalog's backups reference, from `low`
        (inclusive) to `high` (exclusive; None: to the end), in id order."""
        with self._guard("listing chunks by id") as conn:
            if high is None:
                rows = conn.execute("SELECT sha256 FROM chunks WHERE refs > 0 AND sha256 >= ?"
                                    " ORDER BY sha256", (low,))
            else:
                rows = conn.execute("SELECT sha256 FROM chunks WHERE refs > 0 AND sha256 >= ?"
                                    " AND sha256 < ? ORDER BY sha256", (low, high))
            return [bytes(r[0]) for r in rows]

    def referenced_chunk_count(self) -> int:
        """How many chunks the catalog's backups reference."""
        with self._guard("counting chunks") as conn:
            row = conn.execute("SELECT count(*) FROM chunks WHERE refs > 0").fetchone()
        return int(row[0])

    def manifest_names(self) -> dict[str, int]:
        """{manifest name: backup id} of every backup that has a manifest."""
        with self._guard("listing manifests") as conn:
            return {str(r[0]): int(r[1]) for r in conn.execute(
                "SELECT manifest, id FROM backups WHERE manifest IS NOT NULL")}
