"""The export use case: one disk of a backup to a sparse raw file.

Owns: checking that the target is a file (the disk is looked up, and must
hold data, by `diskimage.data_disk`), and handing the disk's blocks to the
writer. Needs only the catalog and the store, so `oneback export` works (and
starts) without the cloud.
Must not: print, or import anything that talks to OpenNebula (the CLI's
offline commands are held to that by tests/test_speed.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from agent import writer
from agent.diskimage import data_disk
from agent.errors import UsageError
from agent.model import BackupRecord, BlockRecord
from agent.progress import Progress, Quiet
from agent.store import ChunkStore


class ExportCatalog(Protocol):
    def get_backup(self, backup_id: int) -> BackupRecord: ...
    def blocks(self, backup_id: int, disk_id: int) -> Iterator[BlockRecord]: ...


def export_disk(backup_id: int, disk_id: int, output: Path, *, catalog: ExportCatalog,
                store: ChunkStore, workers: int, progress: Progress | None = None,
                cancel: threading.Event | None = None) -> int:
    """Write one disk of a backup to a sparse raw file (no cloud needed)."""
    _, disk = data_disk(catalog, backup_id, disk_id)
    if output.exists() and not output.is_file():
        raise UsageError(f"{output} exists and is not a regular file: choose another -o FILE")
    return writer.export_file(output, catalog.blocks(backup_id, disk_id), store,
                              size=disk.size, block_size=disk.block_size, workers=workers,
                              progress=(progress or Quiet()).advanced, cancel=cancel,
                              where=f"backup {backup_id} disk {disk_id}")
