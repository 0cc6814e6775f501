"""The export use case: one disk of a backup to a sparse raw file.

Owns: checking that the disk holds data and that the target is a file, and
handing the disk's blocks to the writer. Needs only the catalog and the
store, so `oneback export` works (and starts) without the cloud.
Must not: print, or import anything that talks to OpenNebula (the CLI's
offline commands are held to that by tests/test_speed.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from agent import policy, writer
from agent.errors import NotFound, UsageError
from agent.model import BackupRecord, BlockRecord, DiskBackup
from agent.progress import Progress, Quiet
from agent.store import ChunkStore


class ExportCatalog(Protocol):
    def get_backup(self, backup_id: int) -> BackupRecord: ...
    def blocks(self, backup_id: int, disk_id: int) -> Iterator[BlockRecord]: ...


def disk_kind(disk: DiskBackup) -> str:
    """'volatile', 'excluded', 'readonly' (the original image is reused) or 'data'."""
    if disk.volatile:
        return "volatile"
    if disk.excluded:
        return "excluded"
    return "readonly" if policy.is_readonly(disk.attributes) else "data"


def export_disk(backup_id: int, disk_id: int, output: Path, *, catalog: ExportCatalog,
                store: ChunkStore, workers: int, progress: Progress | None = None,
                cancel: threading.Event | None = None) -> int:
    """Write one disk of a backup to a sparse raw file (no cloud needed)."""
    backup = catalog.get_backup(backup_id)
    disk = next((d for d in backup.disks if d.disk_id == disk_id), None)
    if disk is None:
        raise NotFound(f"backup {backup_id} has no disk {disk_id}; 'oneback show {backup_id}'"
                       f" lists its disks")
    if disk_kind(disk) != "data":
        raise UsageError(f"disk {disk_id} of backup {backup_id} holds no data"
                         f" ({disk_kind(disk)})")
    if output.exists() and not output.is_file():
        raise UsageError(f"{output} exists and is not a regular file: choose another -o FILE")
    return writer.export_file(output, catalog.blocks(backup_id, disk_id), store,
                              size=disk.size, block_size=disk.block_size, workers=workers,
                              progress=(progress or Quiet()).advanced, cancel=cancel,
                              where=f"backup {backup_id} disk {disk_id}")
