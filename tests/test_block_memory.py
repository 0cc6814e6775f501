"""Memory per block during a backup: packed records, not a Python object per
block, so the README's bound holds for a 10 TiB disk (2.6 M blocks of 4 MiB).

Measured with tracemalloc on a real scan of a sparse file (small blocks, so
many fit in a small file) with the in-memory store, and on a real SQLite
catalog committing and reading back the map of a 300,000-block disk. The
bounds asserted are the README's: 56 bytes per changed block in a scan's
result (BLOCK_RECORD_BYTES), 48 per block in the previous map
(PREVIOUS_BYTES_PER_BLOCK), and a commit that streams (about a byte per
block)."""

from __future__ import annotations

import hashlib
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import xxhash

from agent import reader
from agent.catalog import Catalog
from agent.model import (
    BLOCK_RECORD_BYTES,
    PREVIOUS_BYTES_PER_BLOCK,
    BlockList,
    BlockRecord,
    DiskBackup,
)
from agent.store.memory import MemoryStore

N = 60_000           # blocks scanned (a scan costs ~30 us of Python per block)
M = 300_000          # blocks committed and read back as a previous map
BS = 512             # bytes per block: N blocks in a 30 MB sparse file
SLACK = 1024 * 1024  # interpreter noise, buffers, the one stored chunk
T = TypeVar("T")


def measured(fn: Callable[[], T]) -> tuple[T, int, int]:
    """fn's result, the memory it still holds when done, and its peak."""
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = fn()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, held - base, peak - base


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N blocks: every 4th holds the same data (one chunk, so the store stays
    small), the rest are holes."""
    path = tmp_path_factory.mktemp("mem") / "disk"
    data = bytes(range(256)) * (BS // 256)
    with open(path, "wb") as f:
        f.truncate(N * BS)
        for i in range(0, N, 4):
            f.seek(i * BS)
            f.write(data)
    return path


@pytest.fixture(scope="module")
def scanned(disk: Path) -> tuple[reader.ScanResult, int, int, MemoryStore]:
    store = MemoryStore()
    result, held, peak = measured(
        lambda: reader.scan(disk, N * BS, BS, None, store, full=True, workers=2))
    return result, held, peak, store


def test_a_full_scan_holds_a_packed_record_per_block(
        scanned: tuple[reader.ScanResult, int, int, MemoryStore]) -> None:
    result, held, peak, store = scanned
    assert len(result.blocks) == N
    assert isinstance(result.blocks, BlockList)
    assert result.blocks.nbytes == N * BLOCK_RECORD_BYTES
    assert len(store.blobs) == 1
    # what the result holds after the scan, and the most the scan ever held
    assert held <= N * BLOCK_RECORD_BYTES * 1.2 + SLACK, held / N
    # (a growing buffer is briefly held twice while it is copied; workers
    # finishing out of order hold a few records more under load)
    assert peak <= N * BLOCK_RECORD_BYTES * 2.5 + SLACK, peak / N
    # still the same records, in index order, with the one chunk's stored size
    assert [r.index for r in result.blocks[:6]] == [0, 1, 2, 3, 4, 5]
    assert result.blocks[0].chunk is not None and result.blocks[1].chunk is None
    assert dict(result.chunk_sizes) == {result.blocks[0].chunk: len(
        store.blobs[result.blocks[0].chunk])}


def synthetic(m: int) -> BlockList:
    """A full map of m blocks: every 16th a distinct chunk, the rest holes."""
    blocks = BlockList()
    hole = xxhash.xxh3_128_digest(bytes(BS))
    for i in range(m):
        if i % 16:
            blocks.append(BlockRecord(i, hole, None))
        else:
            raw = i.to_bytes(8, "big")
            blocks.append(BlockRecord(i, xxhash.xxh3_128_digest(raw),
                                      hashlib.sha256(raw).digest()), stored=100)
    return blocks


def commit(cat: Catalog, vm_id: int, blocks: BlockList) -> int:
    return cat.commit_backup(
        vm_id=vm_id, vm_name="big", kind="full", started=1.0, finished=2.0,
        vm_document="<VM/>", image_documents={},
        disks=[DiskBackup(disk_id=0, size=len(blocks) * BS, block_size=BS, image_id=1,
                          volatile=False, excluded=False)],
        blocks={0: blocks}).id


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    with Catalog.open(tmp_path_factory.mktemp("cat") / "catalog.sqlite") as cat:
        commit(cat, 7, synthetic(M))
        yield cat


def test_commit_streams_the_blocks(catalog: Catalog) -> None:
    blocks = synthetic(N)
    backup_id, _, peak = measured(lambda: commit(catalog, 8, blocks))
    assert peak <= N * 2 + SLACK, peak / N
    assert sum(1 for _ in catalog.blocks(backup_id, 0)) == N


def test_the_previous_map_is_48_bytes_per_block(catalog: Catalog) -> None:
    prev, held, peak = measured(lambda: catalog.previous_map(7, 0))
    assert prev is not None and prev.count == M
    assert held <= M * PREVIOUS_BYTES_PER_BLOCK * 1.1 + SLACK, held / M
    assert peak <= M * PREVIOUS_BYTES_PER_BLOCK * 1.2 + SLACK, peak / M
    assert prev.chunk(16) == hashlib.sha256((16).to_bytes(8, "big")).digest()
    assert prev.chunk(17) is None
    assert prev.checksum(17) == xxhash.xxh3_128_digest(bytes(BS))
