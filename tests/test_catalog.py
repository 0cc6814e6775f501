"""The catalog, driven through its public API on real SQLite files."""

from __future__ import annotations

import hashlib
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from sqlite_utils import Database, Migrations

from agent.catalog import Catalog
from agent.catalog.schema import m001_initial, m002_jobs
from agent.errors import InternalError, NotFound, RepositoryError
from agent.model import BackupRecord, BlockRecord, DiskBackup, JournalKind

BS = 64 * 1024


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    with Catalog.open(tmp_path / "catalog.sqlite") as cat:
        yield cat


def rec(index: int, content: int | None) -> BlockRecord:
    """A block record for synthetic content `content` (None: a hole)."""
    if content is None:
        return BlockRecord(index, xxhash.xxh3_128_digest(bytes(BS)), None)
    raw = content.to_bytes(8, "big")
    return BlockRecord(index, xxhash.xxh3_128_digest(raw), hashlib.sha256(raw).digest())


def disk(disk_id: int, blocks: int, *, size: int | None = None, excluded: bool = False,
         volatile: bool = False, block_size: int = BS) -> DiskBackup:
    return DiskBackup(disk_id=disk_id, size=size if size is not None else blocks * block_size,
                      block_size=block_size, image_id=None if volatile else 100 + disk_id,
                      volatile=volatile, excluded=excluded, attributes={"TARGET": "vda"})


def commit(cat: Catalog, vm_id: int, disks: list[DiskBackup],
           blocks: dict[int, list[BlockRecord]], kind: str = "incremental",
           vm_document: str = "<VM/>", images: dict[int, str] | None = None) -> BackupRecord:
    return cat.commit_backup(
        vm_id=vm_id, vm_name=f"vm-{vm_id}", kind=kind, started=1.0, finished=2.0,
        vm_document=vm_document, image_documents=images or {}, disks=disks, blocks=blocks,
        warnings=["disk 3 is volatile"])


def contents_of(cat: Catalog, backup_id: int, disk_id: int) -> list[BlockRecord]:
    return list(cat.blocks(backup_id, disk_id))


# -- opening -----------------------------------------------------------------------


def test_open_creates_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "catalog.sqlite"
    with Catalog.open(path) as cat:
        commit(cat, 1, [disk(0, 2)], {0: [rec(0, 1), rec(1, 2)]}, kind="full")
    with Catalog.open(path) as cat:
        assert [b.id for b in cat.list_backups()] == [1]


def test_open_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    future = Migrations("oneback")  # what a later oneback would ship
    future(name="m001_initial")(m001_initial)
    future(name="m002_jobs")(m002_jobs)

    @future(name="m999_from_the_future")
    def m999(db: Database) -> None:
        db.table("novelty").create({"id": int}, pk="id")

    db = Database(path)
    future.apply(db)
    db.close()
    with pytest.raises(RepositoryError, match="newer oneback.*m999_from_the_future"):
        Catalog.open(path)


def test_open_refuses_a_file_that_is_not_a_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(RepositoryError, match="cannot open catalog"):
        Catalog.open(path)


# -- journal -----------------------------------------------------------------------


def test_journal_lifecycle_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with Catalog.open(path) as cat:
        a = cat.journal_record(JournalKind.SNAPSHOT, "oneback-7-0", "job-1", vm_id=7, disk_id=0)
        b = cat.journal_record(JournalKind.IMAGE, "oneback-7-0-img", "job-1")
        assert a.one_id is None and a.kind is JournalKind.SNAPSHOT
        cat.journal_created(a.id, 3)
    with Catalog.open(path) as cat:  # survives a restart
        pending = cat.journal_pending()
        assert [(e.id, e.name, e.one_id, e.vm_id, e.disk_id) for e in pending] == [
            (a.id, "oneback-7-0", 3, 7, 0),
            (b.id, "oneback-7-0-img", None, None, None),
        ]
        cat.journal_done(a.id)
        cat.journal_done(a.id)  # idempotent
        assert [e.id for e in cat.journal_pending()] == [b.id]
        with pytest.raises(NotFound):
            cat.journal_created(a.id, 4)


def test_journal_from_many_threads(catalog: Catalog) -> None:
    def record(k: int) -> None:
        for i in range(20):
            e = catalog.journal_record(JournalKind.ATTACHMENT, f"oneback-{k}-{i}", f"job-{k}")
            catalog.journal_created(e.id, i)

    threads = [threading.Thread(target=record, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(catalog.journal_pending()) == 80


# -- backups -------------------------------------------------------------------------


def test_commit_and_read_back(catalog: Catalog) -> None:
    disks = [disk(0, 3), disk(1, 0, excluded=True), disk(3, 0, volatile=True)]
    made = commit(catalog, 5, disks, {0: [rec(0, 1), rec(1, None), rec(2, 2)]}, kind="full",
                  vm_document="<VM><ID>5</ID></VM>", images={100: "<IMAGE>100</IMAGE>"})
    got = catalog.get_backup(made.id)
    assert got == made
    assert got.disks[0].attributes == {"TARGET": "vda"}
    assert got.warnings == ("disk 3 is volatile",)
    assert catalog.vm_document(made.id) == "<VM><ID>5</ID></VM>"
    assert catalog.image_documents(made.id) == {100: "<IMAGE>100</IMAGE>"}
    assert contents_of(catalog, made.id, 0) == [rec(0, 1), rec(1, None), rec(2, 2)]
    assert contents_of(catalog, made.id, 1) == []
    assert catalog.previous_map(5, 1) is None and catalog.previous_map(5, 3) is None


def test_list_backups_by_vm_and_not_found(catalog: Catalog) -> None:
    a = commit(catalog, 1, [disk(0, 1)], {0: [rec(0, 1)]}, kind="full")
    b = commit(catalog, 2, [disk(0, 1)], {0: [rec(0, 1)]}, kind="full")
    c = commit(catalog, 1, [disk(0, 1)], {})
    assert [r.id for r in catalog.list_backups()] == [a.id, b.id, c.id]
    assert [r.id for r in catalog.list_backups(1)] == [a.id, c.id]
    assert catalog.list_backups(99) == []
    for call in (catalog.get_backup, catalog.vm_document, catalog.image_documents):
        with pytest.raises(NotFound, match="backup 42"):
            call(42)
    with pytest.raises(NotFound):
        catalog.blocks(a.id, 7)


def test_mark_vm_gone(catalog: Catalog) -> None:
    commit(catalog, 1, [disk(0, 1)], {0: [rec(0, 1)]}, kind="full")
    catalog.mark_vm_gone(1)
    catalog.mark_vm_gone(2)  # never backed up: nothing to mark
    assert [r.vm_gone for r in catalog.list_backups()] == [True]
    commit(catalog, 1, [disk(0, 1)], {})
    assert [r.vm_gone for r in catalog.list_backups()] == [False, False]


def test_every_backup_is_logically_full(catalog: Catalog) -> None:
    """Random incrementals over a disk: each backup's map equals the disk as
    it was then, and previous_map always equals the latest."""
    rng = random.Random(7)
    n = 200
    content: list[int | None] = [rng.choice([None, *range(50)]) for _ in range(n)]
    history = []
    made = commit(catalog, 1, [disk(0, n)], {0: [rec(i, c) for i, c in enumerate(content)]},
                  kind="full")
    history.append((made.id, list(content)))
    for round_ in range(15):
        changed = rng.sample(range(n), rng.randint(0, 12))
        for i in changed:
            content[i] = rng.choice([None, 1000 + round_ * 100 + i])
        made = commit(catalog, 1, [disk(0, n)], {0: [rec(i, content[i]) for i in changed]})
        history.append((made.id, list(content)))
        prev = catalog.previous_map(1, 0)
        assert prev is not None and prev.backup_id == made.id
        assert [prev.checksum(i) for i in range(n)] == [rec(i, c).checksum
                                                        for i, c in enumerate(content)]
        assert [prev.chunk(i) for i in range(n)] == [rec(i, c).chunk
                                                     for i, c in enumerate(content)]
    for backup_id, snapshot in history:
        assert contents_of(catalog, backup_id, 0) == [rec(i, c) for i, c in enumerate(snapshot)]


def test_previous_map_skips_backups_that_excluded_the_disk(catalog: Catalog) -> None:
    a = commit(catalog, 1, [disk(0, 2)], {0: [rec(0, 1), rec(1, 2)]}, kind="full")
    commit(catalog, 1, [disk(0, 2, excluded=True)], {})
    prev = catalog.previous_map(1, 0)
    assert prev is not None and prev.backup_id == a.id
    c = commit(catalog, 1, [disk(0, 2)], {0: [rec(1, 3)]})
    assert contents_of(catalog, c.id, 0) == [rec(0, 1), rec(1, 3)]


def test_previous_map_is_packed(catalog: Catalog) -> None:
    n = 5000
    commit(catalog, 1, [disk(0, n, size=n * BS - 100)],
           {0: [rec(i, i % 7 or None) for i in range(n)]}, kind="full")
    prev = catalog.previous_map(1, 0)
    assert prev is not None
    assert (prev.size, prev.block_size, prev.count) == (n * BS - 100, BS, n)
    assert prev.block_length(n - 1) == BS - 100
    assert len(prev.checksums) == 16 * n and len(prev.chunks) == 32 * n
    assert prev.chunk(0) is None and prev.chunk(1) == rec(1, 1).chunk
    assert prev.checksum(n) is None and prev.chunk(-1) is None


def test_growing_disk_needs_its_new_blocks(catalog: Catalog) -> None:
    commit(catalog, 1, [disk(0, 2)], {0: [rec(0, 1), rec(1, 2)]}, kind="full")
    with pytest.raises(InternalError, match="block 2 is missing"):
        commit(catalog, 1, [disk(0, 4)], {0: [rec(3, 4)]})
    grown = commit(catalog, 1, [disk(0, 4)], {0: [rec(2, 3), rec(3, 4)]})
    assert contents_of(catalog, grown.id, 0) == [rec(0, 1), rec(1, 2), rec(2, 3), rec(3, 4)]
    shrunk = commit(catalog, 1, [disk(0, 1)], {})
    assert contents_of(catalog, shrunk.id, 0) == [rec(0, 1)]
    # a short last block that grows to full length has new content
    with pytest.raises(InternalError, match="block 0 is missing"):
        commit(catalog, 1, [disk(0, 1, size=BS // 2)], {})


def test_new_block_size_needs_every_block(catalog: Catalog) -> None:
    commit(catalog, 1, [disk(0, 4)], {0: [rec(i, i) for i in range(4)]}, kind="full")
    with pytest.raises(InternalError, match="missing"):
        commit(catalog, 1, [disk(0, 2, block_size=2 * BS)], {0: [rec(0, 9)]})
    again = commit(catalog, 1, [disk(0, 2, block_size=2 * BS)], {0: [rec(0, 9), rec(1, 8)]})
    assert contents_of(catalog, again.id, 0) == [rec(0, 9), rec(1, 8)]


@pytest.mark.parametrize("bad", [
    {0: [rec(0, 1), rec(0, 1)]},                        # repeated
    {0: [rec(5, 1)]},                                   # out of range
    {0: [BlockRecord(0, b"short", None)]},              # malformed checksum
    {1: [rec(0, 1)]},                                   # a disk that was not read
])
def test_bad_blocks_are_refused_and_nothing_is_written(catalog: Catalog,
                                                       bad: dict[int, list[BlockRecord]]) -> None:
    commit(catalog, 1, [disk(0, 2)], {0: [rec(0, 1), rec(1, 2)]}, kind="full")
    with pytest.raises(InternalError):
        commit(catalog, 1, [disk(0, 2), disk(1, 0, excluded=True)], bad)
    assert len(catalog.list_backups()) == 1
    prev = catalog.previous_map(1, 0)
    assert prev is not None and prev.backup_id == 1


def test_first_backup_of_a_disk_must_be_complete(catalog: Catalog) -> None:
    with pytest.raises(InternalError, match="block 1 is missing"):
        commit(catalog, 1, [disk(0, 2)], {0: [rec(0, 1)]})
    assert catalog.list_backups() == []


def test_chunks_lists_referenced_chunks(catalog: Catalog) -> None:
    commit(catalog, 1, [disk(0, 3)], {0: [rec(0, 1), rec(1, 1), rec(2, None)]}, kind="full")
    commit(catalog, 2, [disk(0, 1)], {0: [rec(0, 2)]}, kind="full")
    assert set(catalog.chunks()) == {rec(0, 1).chunk, rec(0, 2).chunk}


# -- growth ---------------------------------------------------------------------------


def settled_size(path: Path) -> int:
    """The catalog file's size once its WAL is checkpointed (on close)."""
    assert not os.path.exists(str(path) + "-wal")
    return path.stat().st_size


def growth_of_incrementals(tmp_path: Path, blocks: int, rounds: int,
                           changed: int) -> tuple[int, int]:
    path = tmp_path / f"growth-{blocks}.sqlite"
    rng = random.Random(blocks)
    with Catalog.open(path) as cat:
        commit(cat, 1, [disk(0, blocks)], {0: [rec(i, i) for i in range(blocks)]}, kind="full")
    after_full = settled_size(path)
    for r in range(rounds):
        with Catalog.open(path) as cat:
            picks = rng.sample(range(blocks), changed)
            commit(cat, 1, [disk(0, blocks)], {0: [rec(i, 10**6 * (r + 1) + i) for i in picks]})
    return after_full, settled_size(path) - after_full


def test_catalog_grows_with_changed_blocks_not_disk_size(tmp_path: Path) -> None:
    small_full, small_growth = growth_of_incrementals(tmp_path, 2_000, 20, 10)
    big_full, big_growth = growth_of_incrementals(tmp_path, 32_000, 20, 10)
    assert big_full > 10 * small_full / 2  # the full map does scale with the disk
    # 200 changed block rows cost about the same on a disk 16 times larger ...
    assert big_growth < small_growth * 1.5 + 16 * 4096
    # ... and about 100 bytes each (row, chunk, index pages), not a map per backup
    assert big_growth < 200 * 200 + 20 * 4096
    assert big_growth < big_full / 10


def test_last_backup_is_the_newest_of_that_vm(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "catalog.sqlite") as cat:
        assert cat.last_backup(1) is None
        commit(cat, 1, [disk(0, 2)], {0: [rec(0, 1), rec(1, 2)]}, kind="full")
        commit(cat, 2, [disk(0, 2)], {0: [rec(0, 3), rec(1, 4)]}, kind="full")
        commit(cat, 1, [disk(0, 2)], {0: [rec(0, 5)]}, kind="incremental")
        last = cat.last_backup(1)
        assert last is not None and (last.id, last.vm_id, last.kind) == (3, 1, "incremental")
        assert [d.disk_id for d in last.disks] == [0]
        assert cat.last_backup(2).id == 2  # type: ignore[union-attr]


# -- several processes at once --------------------------------------------------

_REPO = Path(__file__).resolve().parents[1]


def _processes(code: str, n: int) -> list[tuple[int, str]]:
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=_REPO, stderr=subprocess.PIPE,
                              text=True) for _ in range(n)]
    out = []
    for p in procs:
        _, err = p.communicate(timeout=120)
        out.append((p.returncode, err.strip().splitlines()[-1] if err.strip() else ""))
    return out


def test_processes_creating_one_new_catalog_at_once_all_succeed(tmp_path: Path) -> None:
    """Today's open ran the migrations unlocked: "table vms already exists",
    "database is locked"."""
    for trial in range(3):
        path = tmp_path / f"c{trial}.sqlite"
        code = f"from agent.catalog import Catalog; Catalog.open({str(path)!r}).close()"
        results = _processes(code, 6)
        assert [err for code_, err in results if code_ != 0] == []
        with Catalog.open(path) as cat:
            assert cat.jobs() == []


def test_processes_writing_one_catalog_at_once_never_see_a_locked_database(
        tmp_path: Path) -> None:
    """Read-then-write transactions of several processes (queueing, claiming,
    finishing jobs; journaling) race: a deferred transaction that read first
    cannot upgrade to a writer and fails at once with "database is locked"."""
    path = tmp_path / "catalog.sqlite"
    Catalog.open(path).close()
    code = f"""
import os
from agent.catalog import Catalog
from agent.model import JournalKind
cat = Catalog.open({str(path)!r})
me = os.getpid()
for i in range(60):
    cat.job_enqueue(me * 1000 + i % 7, "backup", "test")
    job = cat.job_claim(str(me), 1000)
    e = cat.journal_record(JournalKind.IMAGE, f"oneback-{{me}}-{{i}}", str(me))
    cat.journal_done(e.id)
    if job is not None:
        cat.job_finish(job.id, "ok")
"""
    results = _processes(code, 6)
    assert [err for code_, err in results if code_ != 0] == []
    with Catalog.open(path) as cat:
        assert cat.journal_pending() == []


# -- the agent's queue between owners, its backoffs and nonces -----------------------


def test_job_claim_takes_turns_between_owners(catalog: Catalog) -> None:
    for vm in range(100, 110):                 # owner 1: ten VMs, queued first
        catalog.job_enqueue(vm, "backup", "first backup", uid=1, now=1.0)
    catalog.job_enqueue(200, "backup", "first backup", uid=2, now=2.0)
    catalog.job_enqueue(300, "backup", "first backup", uid=3, now=3.0)
    order = []
    for t in range(12):
        job = catalog.job_claim("me", 1, now=10.0 + t)
        assert job is not None
        order.append(job.uid)
        catalog.job_finish(job.id, "ok", now=10.5 + t)
    assert order[:3] == [1, 2, 3]              # each owner once before anyone twice
    assert order[3:] == [1] * 9
    assert catalog.job_claim("me", 1, now=30.0) is None


def test_job_claim_prefers_the_owner_with_fewer_running_jobs(catalog: Catalog) -> None:
    for vm in range(100, 104):
        catalog.job_enqueue(vm, "backup", "b", uid=1, now=1.0)
    catalog.job_enqueue(200, "backup", "b", uid=2, now=5.0)
    first = catalog.job_claim("me", 10, now=10.0)
    second = catalog.job_claim("me", 10, now=10.0)
    assert first is not None and second is not None
    assert (first.uid, second.uid) == (1, 2)


def test_backoff_doubles_up_to_the_cap_and_clears(catalog: Catalog) -> None:
    delays = []
    for i in range(6):
        b = catalog.backoff_fail("expire:7:old", "expire snapshot set old", "refused",
                                 vm_id=7, base=10, cap=60, now=1000.0 + i)
        delays.append(b.next_try - b.last_failed)
    assert delays == [10, 20, 40, 60, 60, 60]
    assert [(b.key, b.failures, b.first_failed) for b in catalog.backoffs()] == [
        ("expire:7:old", 6, 1000.0)]
    assert catalog.backoff_clear("expire:7:old") is True
    assert catalog.backoffs() == []
    assert catalog.backoff_clear("expire:7:old") is False


def test_nonces_are_refused_twice_and_forgotten_after_their_window(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with Catalog.open(path) as cat:
        assert cat.nonce_use("a" * 32, 1000.0, 400.0) is True
        assert cat.nonce_use("a" * 32, 1001.0, 401.0) is False
    with Catalog.open(path) as cat:            # a restart remembers
        assert cat.nonce_use("a" * 32, 1002.0, 402.0) is False
        assert cat.nonce_use("b" * 32, 2000.0, 1500.0) is True   # "a" is forgotten now
        assert cat.nonce_use("a" * 32, 2001.0, 1501.0) is True


def test_last_backup_is_the_latest_started_even_when_imported_later(tmp_path: Path) -> None:
    """Another agent's older backup, imported (catalog sync) after this
    catalog's newer one, gets the higher id: the VM's last backup is still
    the one that started last (the schedule counts from it)."""
    with Catalog.open(tmp_path / "catalog.sqlite") as cat:
        newer = cat.commit_backup(
            vm_id=1, vm_name="vm-1", kind="full", started=2000.0, finished=2001.0,
            vm_document="<VM/>", image_documents={}, disks=[disk(0, 2)],
            blocks={0: [rec(0, 1), rec(1, 2)]}, warnings=[])
        cat.commit_backup(
            vm_id=1, vm_name="vm-1", kind="full", started=1000.0, finished=1001.0,
            vm_document="<VM/>", image_documents={}, disks=[disk(0, 2)],
            blocks={0: [rec(0, 3), rec(1, 4)]}, warnings=[])
        last = cat.last_backup(1)
        assert last is not None and last.id == newer.id
