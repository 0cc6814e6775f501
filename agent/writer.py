"""Writing a backed-up disk back out: the restore side of the block pipeline.

Owns: turning one disk's logical block map (from the catalog) into bytes on a
file or block device: chunks fetched, decompressed and verified in parallel
(SHA-256 by the store, then the recorded xxh3-128 and length here), written
at their offsets, holes skipped where the target already reads as zeros. Any
mismatch is an IntegrityError naming the backup, disk and block. Written
blocks leave the page cache behind the writer (written back, then dropped),
so restoring a large disk does not evict what the proxy had cached. Must not:
touch the catalog or the cloud, or print (it reports through `progress`).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from agent import devices
from agent.diskimage import fetch_block
from agent.errors import DeviceError, IntegrityError, Interrupted
from agent.model import BlockRecord, block_count, block_length
from agent.store import ChunkStore

IN_FLIGHT_PER_WORKER = 2
DROP_BEHIND = 4  # blocks written after one before its pages are dropped (written back by then)


def write_disk(
    target: int | str | Path,
    blocks: Iterable[BlockRecord],
    store: ChunkStore,
    *,
    size: int,
    block_size: int,
    where: str,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    zero_holes: bool | None = None,
    label: str | None = None,
) -> int:
    """Write the disk whose full block map is `blocks` (index order, every
    index below the block count) to `target`: an open fd (left open) or a
    path, where a regular file is created or emptied and a block device must
    be large enough. Holes are written as zeros only when `zero_holes`, which
    by default is true unless the target is a file this call emptied. The
    data is fsynced before returning; returns the bytes written (holes are
    punched where the target supports it, not written). `where`
    ("backup 5 disk 0") prefixes every error; `label` names the target in
    them (default: the path, or the fd). Raises IntegrityError naming
    the block on a missing or damaged chunk, DeviceError on a write error,
    Interrupted when `cancel` is set. The target's pages this call wrote
    are not left in the page cache."""
    if isinstance(target, int):
        fd, fresh, owned = target, False, False
    else:
        fd, fresh = devices.open_for_write(target, size)
        owned = True
    label = label or (f"fd {target}" if isinstance(target, int) else str(target))
    try:
        job = _Restore(store, fd, label, size, block_size, where,
                       zero_holes if zero_holes is not None else not fresh)
        written = job.run(blocks, workers or os.cpu_count() or 1, progress, cancel)
        try:
            os.fdatasync(fd)
        except OSError as e:
            raise DeviceError(f"cannot flush {label}: {e.strerror or e}") from e
        _drop_cache(fd, 0, size)
        return written
    finally:
        if owned:
            os.close(fd)


def export_file(
    path: str | Path,
    blocks: Iterable[BlockRecord],
    store: ChunkStore,
    *,
    size: int,
    block_size: int,
    where: str,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Write the disk to a sparse raw file at `path` (created or replaced;
    holes stay unallocated). Crash-safe: the data goes to a temporary file
    beside the target, is fsynced, and only then renamed over it (and the
    directory fsynced), so a failure or a kill leaves a file that stood there
    as it was, and no temporary file. Returns the bytes written. Errors as
    write_disk."""
    target = Path(os.path.realpath(path))
    if target.is_block_device():
        raise DeviceError(f"{path} is a block device, not a file to export to")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".oneback-part",
                                        dir=target.parent)
    except OSError as e:
        raise DeviceError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(tmp_name)
    try:
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            raise DeviceError(f"cannot size {path}: {e.strerror or e}") from e
        written = write_disk(fd, blocks, store, size=size, block_size=block_size,
                             where=where, workers=workers, progress=progress,
                             cancel=cancel, zero_holes=False, label=str(path))
        os.close(fd)
        fd = -1
        try:
            os.replace(tmp, target)
            dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise DeviceError(f"cannot put the exported disk in place at {path}:"
                              f" {e.strerror or e}") from e
        return written
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _drop_cache(fd: int, offset: int, length: int) -> None:
    """Start writing back [offset, offset+length) and drop its clean pages."""
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass  # advice only


class _Restore:
    def __init__(self, store: ChunkStore, fd: int, label: str, size: int, block_size: int,
                 where: str, zero_holes: bool) -> None:
        self.store, self.fd, self.label = store, fd, label
        self.size, self.block_size = size, block_size
        self.where = where
        self.zero_holes = zero_holes
        self.can_punch = True
        self.zeros = bytes(block_size) if zero_holes else b""

    def run(self, blocks: Iterable[BlockRecord], workers: int,
            progress: Callable[[int], None] | None,
            cancel: threading.Event | None) -> int:
        n = block_count(self.size, self.block_size)
        pending: list[tuple[Future[int], int]] = []  # (the write, its block index)
        behind: deque[int] = deque()  # written blocks whose pages may still be cached
        written = 0
        expected = 0
        holes_from: int | None = None  # first index of the current run of holes

        def flush_holes(end: int) -> None:
            nonlocal holes_from, written
            if holes_from is not None and self.zero_holes:
                written += self._zero(holes_from * self.block_size,
                                      min(end * self.block_size, self.size))
            holes_from = None

        def reap(limit: int) -> None:
            nonlocal written
            while len(pending) > limit:
                future, index = pending.pop(0)
                length = future.result()  # raises the worker's error
                written += length
                if progress is not None:
                    progress(length)
                behind.append(index)
                if len(behind) > DROP_BEHIND:  # written back since: drop it
                    old = behind.popleft()
                    _drop_cache(self.fd, old * self.block_size, self.block_size)

        with ThreadPoolExecutor(workers, thread_name_prefix="oneback-restore") as pool:
            try:
                for record in blocks:
                    if cancel is not None and cancel.is_set():
                        raise Interrupted(f"the restore of {self.where} was stopped")
                    if record.index != expected or record.index >= n:
                        raise IntegrityError(
                            f"{self.where}: the block map lacks block {expected} or has a "
                            f"stray block {record.index}; the catalog is damaged"
                        )
                    expected += 1
                    length = block_length(self.size, self.block_size, record.index)
                    if record.chunk is None:
                        if holes_from is None:
                            holes_from = record.index
                        if progress is not None:
                            progress(length)
                        continue
                    flush_holes(record.index)
                    pending.append((pool.submit(self._restore_block, record, length),
                                    record.index))
                    reap(workers * IN_FLIGHT_PER_WORKER)
                if expected != n:
                    raise IntegrityError(
                        f"{self.where}: the block map ends at block {expected} of {n}; "
                        "the catalog is damaged"
                    )
                flush_holes(n)
                reap(0)
            except BaseException:
                for f, _ in pending:
                    f.cancel()
                raise
        return written

    def _restore_block(self, record: BlockRecord, length: int) -> int:
        assert record.chunk is not None
        data = fetch_block(self.store, record.chunk, record.checksum, length,
                           f"{self.where} block {record.index} (chunk {record.chunk.hex()})")
        self._pwrite(memoryview(data), record.index * self.block_size)
        _drop_cache(self.fd, record.index * self.block_size, length)  # starts the write-back
        return length

    def _zero(self, start: int, end: int) -> int:
        """Make bytes [start, end) read as zeros: a punched hole where the
        target supports it, else written zeros. Returns the bytes written."""
        if self.can_punch:
            if devices.zero_range(self.fd, start, end - start):
                return 0
            self.can_punch = False
        for offset in range(start, end, self.block_size):
            self._pwrite(memoryview(self.zeros)[:min(self.block_size, end - offset)], offset)
        return end - start

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        try:
            while done < len(data):
                done += os.pwrite(self.fd, data[done:], offset + done)
        except OSError as e:
            raise DeviceError(
                f"cannot write {self.label} at byte {offset + done}: {e.strerror or e}"
            ) from e
