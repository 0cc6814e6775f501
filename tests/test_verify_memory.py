"""`verify --read-data` holds a bounded number of chunks at once: however many
workers it is given (the command gives it read_depth, 16), the reads in flight
are what fits twice the backups' block size in its memory budget. A real
backup through the CLI against onesim, then the real verify on the real
repository and catalog, with the store's reads counted."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from agent import repository, verify
from agent.store.local import LocalStore
from tests.agentkit import BLOCK, Cloud, pattern


class CountingStore(LocalStore):
    """The repository, counting the chunk reads in flight at once."""

    in_flight = 0
    most = 0
    lock = threading.Lock()

    def get(self, chunk_id: bytes) -> bytes:
        with self.lock:
            type(self).in_flight += 1
            type(self).most = max(self.most, self.in_flight)
        try:
            time.sleep(0.01)  # a read takes time: let the other workers start theirs
            return super().get(chunk_id)
        finally:
            with self.lock:
                type(self).in_flight -= 1


def test_verify_read_data_holds_at_most_its_memory_budget_of_chunks(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("big", [cloud.image("big-os", pattern(12 * BLOCK, 5))])
    done = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert done.code == 0, done.err
    catalog, _ = repository.open_checked(cloud.tmp / "repo", cloud.tmp / "catalog.sqlite")
    store = CountingStore.open(Path(cloud.tmp / "repo"))
    try:
        # the budget fits two reads of this backup's blocks (2 x BLOCK each)
        report = verify.verify(store, catalog, read_data=True, workers=16,
                               memory=4 * BLOCK)
        assert report.checked >= 6 and not report.damage
        assert CountingStore.most <= 2, f"{CountingStore.most} chunks read at once"
        # without read_data nothing is held: all the workers check at once
        CountingStore.most = 0
        assert verify.verify(store, catalog, workers=16, memory=4 * BLOCK).checked == \
            report.checked
    finally:
        catalog.close()


class OrderStore(LocalStore):
    """The repository, recording the order chunks are checked in."""

    seen: list[bytes] = []

    def has(self, chunk_id: bytes) -> bool:
        type(self).seen.append(chunk_id)
        return super().has(chunk_id)

    def get(self, chunk_id: bytes) -> bytes:
        type(self).seen.append(chunk_id)
        return super().get(chunk_id)


def test_verify_checks_many_chunks_in_slices_of_the_id_space_and_still_finds_damage(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("many", [cloud.image("many-os", pattern(12 * BLOCK, 9))])
    done = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert done.code == 0, done.err
    catalog, _ = repository.open_checked(cloud.tmp / "repo", cloud.tmp / "catalog.sqlite")
    store = OrderStore.open(Path(cloud.tmp / "repo"))
    try:
        whole = verify.verify(store, catalog, read_data=True)
        assert whole.slices == 1 and whole.checked >= 6 and not whole.damage
        OrderStore.seen = []
        # a budget of 2 chunks: the id space is cut into slices, each checked alone
        sliced = verify.verify(store, catalog, read_data=True,
                               chunk_memory=2 * verify.PER_CHUNK)
        assert sliced.slices > 1
        assert (sliced.chunks, sliced.checked, sliced.bytes_read, sliced.damage) == \
            (whole.chunks, whole.checked, whole.bytes_read, [])
        assert OrderStore.seen == sorted(OrderStore.seen) and len(set(OrderStore.seen)) == \
            whole.checked
        # a chunk lost from the repository is found, and its block named, slice or not
        lost = max(OrderStore.seen)
        (cloud.tmp / "repo" / "chunks" / lost.hex()[:2] / lost.hex()).unlink()
        found = verify.verify(store, catalog, chunk_memory=2 * verify.PER_CHUNK)
        assert [(d.chunk, d.problem) for d in found.damage][:1] == [(lost.hex(), "missing")]
        assert all(d.backup_id is not None and d.block is not None for d in found.damage)
    finally:
        catalog.close()
