"""What a catalog keeps about the other agents sharing its repository.

Owns: which backups were imported from another catalog's manifests (and
which catalog wrote them), and the
opted-in VMs this proxy cannot serve (with why), for `oneback status`.
Must not: read the repository or decide placement (repository.sync and
agent.placement do).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

from agent.model import NotServed


class SharedRecords:
    """Mixed into Catalog: uses its serialised, error-translating `_guard`."""

    _guard: Callable[..., AbstractContextManager[sqlite3.Connection]]

    def mark_imported(self, backup_id: int, manifest: str, writer: str) -> None:
        """Record that backup `backup_id` came from catalog `writer`'s
        `manifest`. Durable on return; kept after the backup is forgotten."""
        with self._guard("recording an imported backup", write=True) as conn:
            conn.execute("INSERT OR REPLACE INTO imported (backup_id, manifest, writer) "
                         "VALUES (?, ?, ?)", (backup_id, manifest, writer))

    def imported_backups(self) -> dict[int, tuple[str, str]]:
        """{backup id: (manifest, writer)} of the imported backups still in the catalog."""
        with self._guard("listing imported backups") as conn:
            return {int(r[0]): (str(r[1]), str(r[2])) for r in conn.execute(
                "SELECT b.id, i.manifest, i.writer FROM imported i JOIN backups b "
                "ON b.id = i.backup_id")}

    def imported_manifests(self) -> set[str]:
        """Every manifest ever imported, also of backups forgotten since."""
        with self._guard("listing imported manifests") as conn:
            return {str(r[0]) for r in conn.execute("SELECT manifest FROM imported")}

    def set_not_served(self, vm_id: int, reason: str | None, now: float) -> None:
        """Record (or, with None, clear) why this proxy cannot serve the VM;
        the first time it was seen so is kept while the reason stands."""
        with self._guard("recording a VM this proxy cannot serve", write=True) as conn:
            if reason is None:
                conn.execute("DELETE FROM not_served WHERE vm_id = ?", (vm_id,))
                return
            conn.execute(
                "INSERT INTO not_served (vm_id, reason, since) VALUES (?, ?, ?) "
                "ON CONFLICT (vm_id) DO UPDATE SET reason = excluded.reason, "
                "since = CASE WHEN reason = excluded.reason THEN since ELSE excluded.since END",
                (vm_id, reason, now))

    def keep_not_served(self, vm_ids: Iterable[int]) -> None:
        """Forget the VMs not in `vm_ids` (gone, or no longer opted in)."""
        keep = sorted(set(vm_ids))
        with self._guard("pruning VMs this proxy cannot serve", write=True) as conn:
            marks = ",".join("?" * len(keep))
            conn.execute(f"DELETE FROM not_served WHERE vm_id NOT IN ({marks})"
                         if keep else "DELETE FROM not_served", keep)

    def not_served(self) -> list[NotServed]:
        with self._guard("listing VMs this proxy cannot serve") as conn:
            return [NotServed(int(r[0]), str(r[1]), float(r[2])) for r in conn.execute(
                "SELECT vm_id, reason, since FROM not_served ORDER BY vm_id")]
