"""Copies between repositories (`oneback copy --to CONFIG`, `[copy] to`):
through the real CLI (in-process and as killed processes), onesim, real
repository directories and SQLite catalogs."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent import copy
from agent.export import export_disk
from agent.prune import prune
from agent.store import Codec, Data
from agent.store.local import LocalStore
from tests.agentkit import BLOCK, REPO, Cloud, init_repository, pattern
from tests.agentkit import run_with as run
from tests.agentproc import AgentProcess, wait_backups
from tests.onesim.testing import wait_until

DISK = 12 * BLOCK


# -- helpers ------------------------------------------------------------------------


def target_config(c: Cloud, name: str = "target") -> Path:
    """A second configuration, for the same cloud, whose [storage] is another
    repository and catalog (made by `oneback init`)."""
    where = c.tmp / name
    where.mkdir()
    text = c.config.read_text()
    text = text.replace(str(c.tmp / "repo"), str(where / "repo"))
    text = text.replace(str(c.tmp / "catalog.sqlite"), str(where / "catalog.sqlite"))
    cfg = where / "oneback.toml"
    cfg.write_text(text)
    init_repository(cfg)
    return cfg




def backup(c: Cloud, capsys: pytest.CaptureFixture[str], vm: int) -> dict[str, Any]:
    r = c.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc: dict[str, Any] = r.json()
    return doc


def listed(cfg: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    r = run(cfg, capsys, "list", "--json")
    assert r.code == 0, r.err
    return list(r.json())


def exports(cfg: Path, capsys: pytest.CaptureFixture[str], out: Path
            ) -> dict[tuple[int, float, int], str]:
    """{(VM, started, disk): SHA-256 of the exported disk} of every backup
    the configuration's catalog lists: the same key in source and target."""
    found = {}
    for b in listed(cfg, capsys):
        for d in b["disks"]:
            if d["volatile"] or d["excluded"]:
                continue
            path = out / f"x-{b['backup_id']}-{d['disk_id']}.raw"
            r = run(cfg, capsys, "export", str(b["backup_id"]), str(d["disk_id"]), "-o",
                    str(path))
            assert r.code == 0, r.err
            found[(b["vm_id"], b["started"], d["disk_id"])] = hashlib.sha256(
                path.read_bytes()).hexdigest()
            path.unlink()
    return found


def copy_json(cfg: Path, capsys: pytest.CaptureFixture[str], to: Path, *args: str
              ) -> dict[str, Any]:
    r = run(cfg, capsys, "copy", "--to", str(to), "--json", *args)
    assert r.code == 0, r.err
    doc: dict[str, Any] = r.json()
    return doc


def chunk_files(repo: Path) -> set[str]:
    return {f.name for f in (repo / "chunks").glob("*/*") if len(f.name) == 64}


def write_blocks(path: Path, blocks: list[int], seed: int) -> None:
    with open(path, "r+b") as f:
        for b in blocks:
            f.seek(b * BLOCK)
            f.write(pattern(BLOCK, seed * 1000 + b))


@pytest.fixture
def two_vms(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """Two VMs, each backed up twice (the second time incrementally, a few
    blocks changed); VM b's disk has a hole (all-zero blocks)."""
    a = cloud.vm("a", [cloud.image("a0", pattern(DISK, 1))])
    data = bytearray(pattern(DISK, 2))
    data[3 * BLOCK:5 * BLOCK] = bytes(2 * BLOCK)
    b = cloud.vm("b", [cloud.image("b0", bytes(data))])
    ids = {}
    for vm, name in ((a, "a"), (b, "b")):
        ids[f"{name}1"] = backup(cloud, capsys, vm)["backup_id"]
        write_blocks(cloud.disk_path(vm, 0), [1, 8], seed=vm + 10)
        ids[f"{name}2"] = backup(cloud, capsys, vm)["backup_id"]
    return {"a": a, "b": b, **ids}


# -- copying ------------------------------------------------------------------------


def test_copy_by_ids_by_vm_and_all_then_the_target_exports_byte_for_byte(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], two_vms: dict[str, Any]) -> None:
    """Copies by id, by VM and of all; the target lists, exports and verifies
    them; a second run sends nothing; an incremental backup copies only
    its new chunks."""
    c, src = cloud, cloud.config
    tgt = target_config(c)
    trepo = c.tmp / "target" / "repo"

    doc = copy_json(src, capsys, tgt, str(two_vms["a1"]))
    assert [b["outcome"] for b in doc["backups"]] == ["copied"]
    assert doc["chunks_sent"] == 12 and doc["translated"] is False
    assert [b["vm_id"] for b in listed(tgt, capsys)] == [two_vms["a"]]

    doc = copy_json(src, capsys, tgt, "--vm", str(two_vms["b"]))
    assert [b["outcome"] for b in doc["backups"]] == ["copied", "copied"]
    # b1: 10 data blocks (2 all-zero: holes, no chunk); b2: 2 changed blocks
    assert [b["sent"] for b in doc["backups"]] == [10, 2]

    doc = copy_json(src, capsys, tgt, "--all")
    assert [b["outcome"] for b in doc["backups"]] == ["present", "copied", "present",
                                                      "present"]
    assert doc["chunks_sent"] == 2   # a2 reuses the 10 unchanged chunks of a1

    again = copy_json(src, capsys, tgt, "--all")
    assert again["chunks_sent"] == 0 and again["bytes_sent"] == 0
    assert {b["outcome"] for b in again["backups"]} == {"present"}

    # The target is a repository of its own: list, verify, export.
    source_list = listed(src, capsys)
    target_list = listed(tgt, capsys)
    assert sorted((b["vm_id"], b["started"], b["kind"], b["vm_name"]) for b in source_list) \
        == sorted((b["vm_id"], b["started"], b["kind"], b["vm_name"]) for b in target_list)
    r = run(tgt, capsys, "verify", "--read-data")
    assert r.code == 0, r.out + r.err
    assert exports(tgt, capsys, c.tmp) == exports(src, capsys, c.tmp)
    assert chunk_files(trepo) == chunk_files(c.tmp / "repo")

    # Incremental: a third backup of VM a copies only the block it changed.
    write_blocks(c.disk_path(two_vms["a"], 0), [11], seed=99)
    third = backup(c, capsys, two_vms["a"])
    doc = copy_json(src, capsys, tgt, "--all")
    assert doc["chunks_sent"] == 1
    assert [b["outcome"] for b in doc["backups"] if b["backup_id"] == third["backup_id"]] \
        == ["copied"]
    assert exports(tgt, capsys, c.tmp) == exports(src, capsys, c.tmp)
    # ... and the target's own catalog can be rebuilt from its manifests.
    (c.tmp / "target" / "catalog.sqlite").unlink()
    r = run(tgt, capsys, "catalog", "rebuild", "--json")
    assert r.code == 0, r.err
    assert len(r.json()["imported"]) == 5 and r.json()["foreign"] == 0


def test_restore_from_the_target(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm = cloud.vm("r", [cloud.image("r0", pattern(DISK, 7))])
    at_backup = cloud.disk_path(vm, 0).read_bytes()
    backup(cloud, capsys, vm)
    tgt = target_config(cloud)
    copy_json(cloud.config, capsys, tgt, "--all")
    (target_backup,) = listed(tgt, capsys)
    r = run(tgt, capsys, "restore", str(target_backup["backup_id"]), "--name", "from-copy",
            "--json")
    assert r.code == 0, r.err
    assert cloud.disk_path(r.json()["vm_id"], 0).read_bytes() == at_backup
    assert cloud.leftovers() == []


def test_a_damaged_source_chunk_fails_that_backup_only(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], two_vms: dict[str, Any]) -> None:
    """One line naming the backup and the chunk, exit 9; VM b's backups are
    copied; nothing of VM a's second backup is visible in the target."""
    c = cloud
    tgt = target_config(c)
    # a chunk a2 wrote (block 8 changed), which a1 does not reference
    source_chunks = chunk_files(c.tmp / "repo")
    copy_json(c.config, capsys, tgt, str(two_vms["a1"]))
    new_in_a2 = _chunks_of(c, capsys, c.config, two_vms["a2"]) - _chunks_of(
        c, capsys, c.config, two_vms["a1"])
    assert len(new_in_a2) == 2 and new_in_a2 <= source_chunks
    bad = sorted(new_in_a2)[0]
    path = c.tmp / "repo" / "chunks" / bad[:2] / bad
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))

    r = run(c.config, capsys, "copy", "--to", str(tgt), "--all")
    assert r.code == 9, r
    assert r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert f"backup {two_vms['a2']}" in r.err and bad in r.err
    in_target = listed(tgt, capsys)
    assert sorted(b["vm_id"] for b in in_target) == [two_vms["a"], two_vms["b"], two_vms["b"]]
    assert run(tgt, capsys, "verify", "--read-data").code == 0
    assert len(list((c.tmp / "target" / "repo" / "manifests").rglob("*T*Z-*"))) == 3


def _chunks_of(c: Cloud, capsys: pytest.CaptureFixture[str], cfg: Path,
               backup_id: int) -> set[str]:
    """The chunk ids a backup references (from its manifest, through the store)."""
    from agent import manifest as mf
    from agent.catalog import Catalog
    with Catalog.open(c.tmp / "catalog.sqlite", create=False) as catalog:
        name = catalog.manifest_of(backup_id)
    assert name is not None
    m = mf.decode(LocalStore.open(c.tmp / "repo").get_manifest(name), name)
    return {r.chunk.hex() for dm in m.maps.values() for r in dm.records() if r.chunk}


def test_usage_errors_are_one_line(cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    tgt = target_config(cloud)
    for args, code, words in (
            ((), 2, "BACKUP_IDs, --vm VM_ID or --all"),
            (("--all", "--vm", "3"), 2, "one of them"),
            (("--all", "--lock-days", "30"), 2, "S3 target with Object Lock"),
            (("99",), 6, "backup 99")):
        r = run(cloud.config, capsys, "copy", "--to", str(tgt), *args)
        assert r.code == code and r.err.count("\n") == 1, (args, r)
        assert words in r.err, (args, r.err)
    r = run(cloud.config, capsys, "copy", "--to", str(cloud.config), "--all")
    assert r.code == 2 and "source repository itself" in r.err, r
    missing = cloud.tmp / "nowhere.toml"
    r = run(cloud.config, capsys, "copy", "--to", str(missing), "--all")
    assert r.code == 3 and str(missing) in r.err, r


# -- kill -9 at many points, and resume ---------------------------------------------------


def _stop_when(proc: subprocess.Popen[str], ready: Callable[[], bool],
               stopped: threading.Event) -> None:
    while proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGSTOP)
            stopped.set()
            return
        time.sleep(0.0005)


def _every_manifest_whole(repo: Path) -> None:
    from agent import manifest as mf
    store = LocalStore(repo, "-", 3)   # reads only: no open-time tidying
    present = chunk_files(repo)
    for name in store.manifests():
        m = mf.decode(store.get_manifest(name), name)
        for dm in m.maps.values():
            for r in dm.records():
                assert r.chunk is None or r.chunk.hex() in present, (name, r)


def _kill_repeatedly(c: Cloud, capsys: pytest.CaptureFixture[str], tgt: Path, trepo: Path,
                     kills: dict[str, int]) -> bool:
    """Run `copy --all` into `tgt` again and again, each run stopped
    (SIGSTOP) the moment it has written 1, 2 or 3 more chunk files, or one
    more manifest, than the target held when it began; checked while
    stopped, then killed (-9). Up to nine runs; True if all were killed
    (False: one finished by itself)."""
    manifests = trepo / "manifests"
    command = c.command("copy", "--to", str(tgt), "--all", "--workers", "1", "--json")

    def manifest_count() -> int:
        return sum(1 for _ in manifests.rglob("*Z-*"))

    plan = [("chunks", 1), ("manifest", 1), ("chunks", 2), ("chunks", 3), ("manifest", 1)]
    for attempt in range(9):
        kind, step = plan[attempt % len(plan)]
        there = len(chunk_files(trepo))
        base = there if kind == "chunks" else manifest_count()
        count = (lambda: len(chunk_files(trepo))) if kind == "chunks" else manifest_count
        ready = functools.partial(lambda f, n: f() >= n, count, base + step)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
        stopped = threading.Event()
        watcher = threading.Thread(target=_stop_when, args=(proc, ready, stopped))
        watcher.start()
        watcher.join(60)
        if stopped.is_set():
            # stopped mid-copy (perhaps inside a catalog transaction): every
            # manifest the target holds has all its chunks (the catalog lists
            # only backups whose manifest is there: `verify` below)
            _every_manifest_whole(trepo)
            os.kill(proc.pid, signal.SIGKILL)
            kills[kind] += 1
        out, err = proc.communicate()
        r = run(tgt, capsys, "verify")
        assert r.code == 0, r.out + r.err
        if not stopped.is_set():
            assert proc.returncode == 0, err
            doc = json.loads(out)
            assert {b["outcome"] for b in doc["backups"]} <= {"copied", "present", "registered"}
            assert doc["chunks_sent"] == 26 - there   # nothing that was there is re-sent
            return False
    return True


def test_killed_at_many_points_then_resumed_the_target_is_always_whole(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], two_vms: dict[str, Any]) -> None:
    """kill -9 after N chunk files, and just after a manifest appears: while
    stopped, every backup the target lists has all its chunks (verify);
    a rerun finishes, re-sending nothing that is there; the target verifies
    clean (--read-data) and exports byte for byte."""
    c = cloud
    total = len(chunk_files(c.tmp / "repo"))
    assert total == 26
    kills = {"chunks": 0, "manifest": 0}
    # A run may finish before it is caught (a loaded machine): then again,
    # into a fresh target, until enough kills of each kind landed.
    for round_ in range(4):
        tgt = target_config(c, f"target{round_}")
        trepo = tgt.parent / "repo"
        if _kill_repeatedly(c, capsys, tgt, trepo, kills) and (
                kills["chunks"] >= 3 and kills["manifest"] >= 1):
            break
    assert kills["chunks"] >= 3 and kills["manifest"] >= 1, kills
    before = chunk_files(trepo)
    # the last run, in this process, counting what it reads from the source
    CountingStore.reads = 0
    with copy.open_target(tgt) as target, _source_catalog(c) as source_catalog:
        report = copy.copy_backups(CountingStore.open(c.tmp / "repo"),
                                   copy.select(source_catalog), target, workers=2)
    assert report.sent == total - len(before)   # nothing that was there is re-sent...
    assert CountingStore.reads == report.sent   # ... or even read
    assert {b.outcome for b in report.backups} <= {"copied", "present", "registered"}
    assert len(listed(tgt, capsys)) == 4
    r = run(tgt, capsys, "verify", "--read-data")
    assert r.code == 0, r.out + r.err
    assert exports(tgt, capsys, c.tmp) == exports(c.config, capsys, c.tmp)


def test_a_manifest_without_its_catalog_entry_is_registered_on_the_rerun(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], two_vms: dict[str, Any]) -> None:
    """Killed between the manifest and the catalog entry (simulated: the
    entry forgotten by hand, the manifest put back), the rerun enters the
    copy in the catalog without sending a chunk."""
    from agent.catalog import Catalog
    c = cloud
    tgt = target_config(c)
    copy_json(c.config, capsys, tgt, str(two_vms["a1"]))
    (entry,) = listed(tgt, capsys)
    tcat = c.tmp / "target" / "catalog.sqlite"
    with Catalog.open(tcat, create=False) as catalog:
        name = catalog.manifest_of(entry["backup_id"])
        catalog.forget_backup(entry["backup_id"])
    assert name is not None and listed(tgt, capsys) == []
    doc = copy_json(c.config, capsys, tgt, str(two_vms["a1"]))
    assert [b["outcome"] for b in doc["backups"]] == ["registered"]
    assert doc["chunks_sent"] == 0
    (again,) = listed(tgt, capsys)
    # under the id reserved for it (recorded in its manifest)
    assert (again["started"], again["backup_id"]) == (entry["started"], entry["backup_id"])
    assert run(tgt, capsys, "verify", "--read-data").code == 0


# -- beside a prune on the target -------------------------------------------------------


class PruningStore(LocalStore):
    """The target store, with a prune of the same repository run (as another
    process would) just after the copy's first flush: after it checked which
    chunks the target has, before it writes the manifest."""

    pruned: list[int] = []

    def flush(self) -> None:
        super().flush()
        if not self.pruned:
            self.pruned.append(prune(LocalStore.open(self.path)).deleted)


def test_a_copy_beside_a_prune_on_the_target_never_references_a_deleted_chunk(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], two_vms: dict[str, Any]) -> None:
    """The target holds a backup's chunks, unreferenced (its copy was
    forgotten there) and old: a prune takes them. A copy of the same backup
    finds them present, then the prune runs; the copy's touch before the
    manifest finds them gone and writes them again."""
    c = cloud
    tgt = target_config(c)
    trepo = c.tmp / "target" / "repo"
    copy_json(c.config, capsys, tgt, str(two_vms["b1"]))
    (entry,) = listed(tgt, capsys)
    assert run(tgt, capsys, "forget", str(entry["backup_id"])).code == 0
    old = time.time() - 3600
    for f in (trepo / "chunks").glob("*/*"):
        os.utime(f, (old, old))
    with copy.open_target(tgt) as target:
        store = PruningStore.open(trepo)
        wanted = [w for w in copy.select(_source_catalog(c)) if w.backup_id == two_vms["b1"]]
        report = copy.copy_backups(LocalStore.open(c.tmp / "repo"), wanted,
                                   replace(target, store=store), workers=2)
    assert PruningStore.pruned == [10]       # the prune took all 10 chunks...
    assert [b.outcome for b in report.backups] == ["copied"]
    assert report.sent == 10                 # ... and the copy wrote them again
    r = run(tgt, capsys, "verify", "--read-data")
    assert r.code == 0, r.out + r.err
    assert exports(tgt, capsys, c.tmp) == {
        k: v for k, v in exports(c.config, capsys, c.tmp).items() if k[0] == two_vms["b"]
        and k[1] == entry["started"]}


def _source_catalog(c: Cloud) -> Any:
    from agent.catalog import Catalog
    return Catalog.open(c.tmp / "catalog.sqlite", create=False)


# -- a target whose chunk ids differ ---------------------------------------------------


class KeyedCodec(Codec):
    """Chunk ids keyed as an encrypted repository keys them: HMAC-SHA256."""

    KEY = b"test key of the target repository"

    def chunk_id(self, data: Data) -> bytes:
        return hmac.new(self.KEY, data, hashlib.sha256).digest()


class CountingStore(LocalStore):
    reads = 0

    def get(self, chunk_id: bytes) -> bytes:
        CountingStore.reads += 1
        return super().get(chunk_id)


def test_a_target_with_keyed_chunk_ids_gets_translated_manifests(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], two_vms: dict[str, Any]) -> None:
    c = cloud
    tgt = target_config(c)
    trepo = c.tmp / "target" / "repo"
    source_catalog = _source_catalog(c)
    source = CountingStore.open(c.tmp / "repo")
    plain = LocalStore.open(trepo)
    keyed = LocalStore(trepo, plain.id, 3, codec=KeyedCodec())
    with copy.open_target(tgt) as t:
        target = replace(t, store=keyed)
        report = copy.copy_backups(source, copy.select(source_catalog, vm_ids=[two_vms["a"]]),
                                   target, workers=2)
        assert report.translated and [b.outcome for b in report.backups] == ["copied"] * 2
        assert report.sent == 14
        # ids are the target's: every chunk file is named by its keyed id
        source_ids = chunk_files(c.tmp / "repo")
        target_ids = chunk_files(trepo)
        assert len(target_ids) == 14 and not target_ids & source_ids
        for name in target_ids:
            keyed.get(bytes.fromhex(name))     # decodes and matches its keyed id
        # the copies export byte for byte from the keyed store
        for b in target.catalog.list_backups():
            out = c.tmp / f"k-{b.id}.raw"
            export_disk(b.id, 0, out, catalog=target.catalog, store=keyed, workers=2)
            digest = hashlib.sha256(out.read_bytes()).hexdigest()
            ((_, want),) = [(k, v) for k, v in exports(c.config, capsys, c.tmp).items()
                            if k[0] == two_vms["a"] and k[1] == b.started]
            assert digest == want

        # The next backup of VM a: the ids of its unchanged blocks are read
        # off the previous copy, so only the changed chunk is read and sent.
        write_blocks(c.disk_path(two_vms["a"], 0), [5], seed=77)
        third = backup(c, capsys, two_vms["a"])
        CountingStore.reads = 0
        report = copy.copy_backups(source, copy.select(source_catalog, [third["backup_id"]]),
                                   target, workers=2)
        assert [b.outcome for b in report.backups] == ["copied"]
        assert report.sent == 1 and CountingStore.reads == 1
    source_catalog.close()


# -- the agent -----------------------------------------------------------------------


def test_the_agent_copies_every_new_backup_and_status_shows_the_lag(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        agent: Callable[..., AgentProcess]) -> None:
    c = cloud
    tgt = target_config(c)
    trepo = c.tmp / "target" / "repo"
    vm = c.vm("ag", [c.image("ag0", pattern(4 * BLOCK, 31))])
    a = agent(reconcile=60, extra=f'[copy]\nto = "{tgt}"\n')
    c.one.vm.update(vm, 'ONEBACK="yes"', 1)
    wait_backups(c, vm, 1)
    a.wait_event("copy.done", timeout=30)
    status = wait_until(lambda: (d := c.call("status", "--json").json())["copy"]["pending"]
                        == 0 and d, 15, 0.2)
    assert status["copy"]["target"] == str(tgt) and status["copy"]["last_error"] is None
    assert [b["vm_id"] for b in listed(tgt, capsys)] == [vm]

    # The target is unreachable (its filesystem unmounted): the copy of the
    # next backup (made by hand: level-triggered, no event needed) fails,
    # and status shows the lag and why.
    trepo.rename(c.tmp / "target" / "repo.away")
    trepo.mkdir()
    write_blocks(c.disk_path(vm, 0), [2], seed=5)
    r = c.call("backup", str(vm), "--json")
    assert r.code == 0, r.err
    a.wait_event("copy.failed", timeout=30)
    status = wait_until(lambda: (d := c.call("status", "--json").json())["copy"]["last_error"]
                        and d, 15, 0.2)
    assert status["copy"]["pending"] == 1 and status["copy"]["oldest_age"] >= 0
    assert "no oneback repository" in status["copy"]["last_error"]
    text = c.call("status")
    assert "lag 1 backup(s)" in text.out and "last copy failed" in text.out, text.out

    # Mounted again: the next pass catches up.
    trepo.rmdir()
    (c.tmp / "target" / "repo.away").rename(trepo)
    wait_until(lambda: c.call("status", "--json").json()["copy"]["pending"] == 0, 30, 0.3)
    assert c.call("status", "--json").json()["copy"]["last_error"] is None
    assert len(listed(tgt, capsys)) == 2
    assert run(tgt, capsys, "verify", "--read-data").code == 0


def test_copy_section_errors_are_one_line_naming_the_key(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    base = cloud.config.read_text()
    for extra, words in (('[copy]\nto = "x.toml"\nspeed = 3\n', "unknown key copy.speed"),
                         ("[copy]\ninterval = 60\n", "missing key copy.to"),
                         ('[copy]\nto = "x.toml"\ninterval = 0\n', "copy.interval"),
                         ('[copy]\nto = "x.toml"\nlock_days = 0\n', "copy.lock_days"),
                         (f'[copy]\nto = "{cloud.config}"\n', "this configuration file")):
        cloud.config.write_text(base + extra)
        r = cloud.run("status", capsys=capsys)
        assert r.code == 3 and r.err.count("\n") == 1, (extra, r)
        assert words in r.err and str(cloud.config) in r.err, (extra, r.err)
    # a relative `to` is the configuration's directory's; status shows the lag
    tgt = target_config(cloud)
    cloud.config.write_text(base + '[copy]\nto = "target/oneback.toml"\n')
    backup(cloud, capsys, cloud.vm("l", [cloud.image("l0", pattern(2 * BLOCK, 3))]))
    doc = cloud.run("status", "--json", capsys=capsys).json()["copy"]
    assert (doc["target"], doc["pending"], doc["last_error"]) == (str(tgt), 1, None)
    assert doc["oldest_age"] >= 0
    copy_json(cloud.config, capsys, tgt, "--all")
    assert cloud.run("status", "--json", capsys=capsys).json()["copy"]["pending"] == 0


def test_a_copy_into_an_encrypted_target_translates_ids_and_restores(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], two_vms: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Local plain source, encrypted target (`init --encryption`), through the
    CLI: the manifests are rewritten with the target's keyed ids, no source id
    (a plain SHA-256) names a target chunk, the target verifies and exports
    byte for byte, and a second copy sends nothing."""
    from agent import config
    monkeypatch.setattr(config, "TEST_KDF_N", 1024)
    c, src = cloud, cloud.config
    where = c.tmp / "sealed"
    where.mkdir()
    passphrase = where / "passphrase"
    passphrase.write_text("correct horse battery staple\n")
    passphrase.chmod(0o600)
    text = c.config.read_text()
    text = text.replace(str(c.tmp / "repo"), str(where / "repo"))
    text = text.replace(str(c.tmp / "catalog.sqlite"), str(where / "catalog.sqlite"))
    text = text.replace("[storage]\n", f'[storage]\npassphrase_file = "{passphrase}"\n', 1)
    tgt = where / "oneback.toml"
    tgt.write_text(text)
    r = run(tgt, capsys, "init", "--encryption", "--json")
    assert r.code == 0, r.err

    doc = copy_json(src, capsys, tgt, "--all")
    assert doc["translated"] is True
    assert {b["outcome"] for b in doc["backups"]} == {"copied"}
    assert not chunk_files(c.tmp / "repo") & chunk_files(where / "repo")
    assert exports(tgt, capsys, c.tmp) == exports(src, capsys, c.tmp)
    r = run(tgt, capsys, "verify", "--read-data", "--json")
    assert r.code == 0, r.err
    again = copy_json(src, capsys, tgt, "--all")
    assert again["chunks_sent"] == 0
