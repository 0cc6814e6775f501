"""Findings of the hostile review of issue 11 (the repository: init,
manifests, rebuild, verify, forget, prune), each driven through the real CLI,
onesim, real SQLite files and a real repository directory."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import prune
from agent.store import chunk_id_of
from agent.store.local import LocalStore
from tests.agentkit import (
    BLOCK,
    Cloud,
    cloud_per_backend,  # noqa: F401  (`cloud`: both backends)
    init_repository,
    offline_config,
    pattern,
    repo_view,
)


def _backup(c: Cloud, capsys: pytest.CaptureFixture[str], vm: int) -> dict:
    r = c.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc: dict = r.json()
    return doc


def _age_chunks(c: Cloud, seconds: float) -> None:
    c.repo.age_chunks(seconds)


def test_a_prune_beside_the_backfill_of_init_never_takes_the_chunks_it_describes(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """`oneback init` on a catalog from before manifests (an upgrade, the
    repository maybe shared with another agent that already prunes) writes a
    manifest for each old backup. A prune that listed the manifests just
    before must not delete the chunks those manifests reference: the
    backfill, like a backup, holds a running marker and touches every chunk
    before its manifest. Before the fix the backfill did neither, and the
    prune deleted every chunk of the committed old backups."""
    c = cloud
    vm = c.vm("old", [c.image("old-os", pattern(3 * BLOCK, 1))])
    first = _backup(c, capsys, vm)
    with open(c.disk_path(vm, 0), "r+b") as f:
        f.write(pattern(100, 77))
    _backup(c, capsys, vm)
    # What the m004 migration leaves of an older catalog and repository:
    with sqlite3.connect(c.tmp / "catalog.sqlite") as db:
        db.execute("DELETE FROM meta WHERE key = 'repository_id'")
        db.execute("UPDATE backups SET manifest = NULL")
    for name in c.repo.manifest_names():
        c.repo.delete_manifest(name)
    _age_chunks(c, 3600)   # written long ago, by the older oneback

    store = c.repo.open()
    listed = store.manifests

    def list_then_init() -> Iterator[str]:
        names = list(listed())            # the prune's mark phase lists: none yet
        r = c.run("init", "--json", capsys=capsys)   # the other proxy upgrades now
        assert r.code == 0 and r.json()["backfilled"] == 2, r.err
        return iter(names)

    store.manifests = list_then_init  # type: ignore[method-assign]
    prune.prune(store)

    out = c.tmp / "first.raw"
    r = c.run("export", str(first["backup_id"]), "0", "-o", str(out), capsys=capsys)
    assert r.code == 0, r.err
    assert out.read_bytes() == pattern(3 * BLOCK, 1)
    r = c.run("verify", capsys=capsys)
    assert r.code == 0, r.out + r.err


def test_a_stalled_backup_whose_marker_a_prune_removed_is_protected_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup whose process stalled for longer than `prune.STALE` (the
    proxy VM suspended, swapped out, SIGSTOPped) looks crashed: a prune
    removes its running marker. When the process resumes, its heartbeat must
    put the marker back (with its start), or every later prune ignores the
    backup and deletes the chunks it wrote and has not yet committed. Before
    the fix the heartbeat failed silently and the second prune deleted them.
    Local only: it sets the marker's mtime by hand (an S3 marker's beat
    writes it again whole, whether a prune took it or not)."""
    from agent import backup

    monkeypatch.setattr(backup, "HEARTBEAT", 0.05)
    store = LocalStore.init(tmp_path / "repo")
    data = pattern(BLOCK, 3)
    chunk = chunk_id_of(data)
    with backup.running(store, "backup-vm9"):
        (name, started, _), = store.running()
        assert store.put(chunk, data) > 0          # written by the running backup
        marker = tmp_path / "repo" / "running" / name
        os.utime(marker, (started - 700, started - 700))   # no heartbeat for 700 s
        first = prune.prune(store)
        assert first.stale == [name] and not marker.exists()
        assert store.has(chunk)                    # newer than that prune's cut-off
        time.sleep(2.5)                            # resumed; the chunk ages past MARGIN
        assert [(n, s) for n, s, _ in store.running()] == [(name, started)]
        second = prune.prune(store)
        assert second.running == [name], second
        assert store.has(chunk), "a prune deleted a chunk of a running backup"
    assert store.running() == []


def test_a_verify_never_quarantines_a_chunk_another_process_just_healed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The verify (the CLI, or the agent's background slice) and a healing
    backup (another process, or another store object: the per-chunk locks
    are per object) race on one damaged chunk: the verify reads it damaged,
    the backup moves the damaged file aside and writes the chunk whole, then
    the verify moves aside whatever has the name now. Before the fix that was
    the healed, whole chunk: the backup just committed referenced a chunk
    missing from chunks/. Local only: it swaps the local store's read-back;
    on S3 the quarantine copies only the object it read (If-Match its ETag)."""
    LocalStore.init(tmp_path / "repo")
    verifier = LocalStore.open(tmp_path / "repo")
    backup = LocalStore.open(tmp_path / "repo")
    data = pattern(BLOCK, 4)
    chunk = chunk_id_of(data)
    backup.put(chunk, data)
    path = tmp_path / "repo" / "chunks" / chunk.hex()[:2] / chunk.hex()
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))

    real = verifier._whole

    raced: list[bool] = []

    def whole_then_healed(chunk_id: bytes, p: Path) -> bool:
        found = real(chunk_id, p)            # damaged, as the verify read it
        if not raced:
            raced.append(True)
            assert backup.heal(chunk_id, data) > 0   # the other process heals it now
        return found

    monkeypatch.setattr(verifier, "_whole", whole_then_healed)
    verifier.quarantine(chunk)
    assert verifier.get(chunk) == data, "the healed chunk was quarantined"


def test_a_rebuilt_catalog_never_forgets_the_backups_another_catalog_holds(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """Two agents share a repository; the first loses its catalog and
    rebuilds it. The rebuild imports the second agent's backups too (they
    are manifests in the repository), so the first agent's `oneback forget
    --keep-last 1` (no --vm: every VM its catalog lists) forgets the second
    agent's older backup and deletes its manifest; a prune then frees its
    chunks, while the second catalog still lists the backup: its export
    fails. A backup one catalog holds must stay restorable whatever another
    catalog forgets."""
    c = cloud
    a = c.vm("a", [c.image("a-os", pattern(2 * BLOCK, 1))])
    b = c.vm("b", [c.image("b-os", pattern(2 * BLOCK, 2))])
    _backup(c, capsys, a)
    second_cfg = c.tmp / "second.toml"
    second_cfg.write_text(c.config.read_text().replace("catalog.sqlite", "second.sqlite"))
    init_repository(second_cfg)
    second = Cloud(c.sim, c.one, c.proxy_id, second_cfg, c.tmp, c.repo)
    old = _backup(second, capsys, b)
    with open(c.disk_path(b, 0), "r+b") as f:
        f.write(pattern(BLOCK, 9))           # block 0 changes: the old chunk is old's alone
    _backup(second, capsys, b)

    for suffix in ("", "-wal", "-shm"):
        Path(f"{c.tmp / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)
    assert c.run("catalog", "rebuild", capsys=capsys).code == 0
    r = c.run("forget", "--keep-last", "1", capsys=capsys)
    assert r.code == 0, r.err
    _age_chunks(c, 3600)
    assert c.run("prune", capsys=capsys).code == 0

    out = c.tmp / "old.raw"
    r = second.run("export", str(old["backup_id"]), "0", "-o", str(out), capsys=capsys)
    assert r.code == 0, r.err
    assert out.read_bytes() == pattern(2 * BLOCK, 2)


def test_a_full_backup_keeps_the_old_chunks_it_checked_from_a_prune(
        tmp_path: Path, repo_backend: str) -> None:
    """`backup --full` stores every block through `Healing`: a chunk that is
    already there and whole is kept, not written. Like `put`'s dedup hit it
    must be touched then, so a prune beside the backup keeps it (the block
    is in the backup being written). Before the fix the chunk kept its old
    mtime: a prune deleted it, and the backup failed at its commit."""
    from agent import backup, config, repository
    from agent.store import Healing
    cfg = offline_config(tmp_path, backend=repo_backend)
    store = repository.init_store(config.load(cfg).storage)
    data = pattern(BLOCK, 6)
    chunk = chunk_id_of(data)
    store.put(chunk, data)
    repo_view(cfg).age_chunks(3600)   # stored long ago; its backup was just forgotten
    with backup.running(store, "backup-vm7"):
        assert Healing(store).put(chunk, data) == 0   # whole: kept as it is
        report = prune.prune(store)
        assert report.deleted == 0, report
        assert store.touch(chunk)


def test_a_rebuilt_catalog_takes_over_its_own_backups_and_forgets_them_for_good(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """The other side of the rule above: a proxy that lost its catalog and
    rebuilds it from manifests only it wrote takes over that catalog's
    identity, so retention deletes its forgotten backups' manifests and a
    prune frees their chunks (else a rebuilt catalog could never free any)."""
    c = cloud
    a = c.vm("a", [c.image("a-os", pattern(2 * BLOCK, 1))])
    _backup(c, capsys, a)
    with open(c.disk_path(a, 0), "r+b") as f:
        f.write(pattern(BLOCK, 7))
    _backup(c, capsys, a)
    before = c.repo.manifest_names()
    assert len(before) == 2
    for suffix in ("", "-wal", "-shm"):
        Path(f"{c.tmp / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)
    r = c.run("catalog", "rebuild", "--json", capsys=capsys)
    assert r.code == 0 and r.json()["foreign"] == 0, r.out + r.err
    assert c.run("forget", "--keep-last", "1", capsys=capsys).code == 0
    after = c.repo.manifest_names()
    assert len(after) == 1 and after < before   # one manifest is gone for good
