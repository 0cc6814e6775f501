"""Retention and prune through the real CLI, onesim and a real repository:
`oneback forget` keeps every other backup byte for byte (also when a backup
in the middle of a chain goes), `oneback prune` frees exactly the chunks no
manifest references, never one a running backup (in another process, or of
another catalog sharing the repository) may still reference, and the agent
applies ONEBACK_KEEP after each backup."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import manifest as mf
from agent import prune as prune_mod
from tests.agentkit import (
    BLOCK,
    Cloud,
    cloud_per_backend,  # noqa: F401  (`cloud`: both backends)
    init_repository,
    pattern,
)
from tests.agentproc import AgentProcess, backups, user_template
from tests.onesim.testing import wait_until

# -- helpers ------------------------------------------------------------------------------


def _backup(c: Cloud, capsys: pytest.CaptureFixture[str], vm: int, *args: str) -> dict:
    r = c.run("backup", str(vm), "--json", *args, capsys=capsys)
    assert r.code == 0, r.err
    doc: dict = r.json()
    return doc


def _export(c: Cloud, capsys: pytest.CaptureFixture[str] | None, backup_id: int, disk: int,
            config: Path | None = None) -> str:
    path = c.tmp / f"export-{backup_id}-{disk}-{random.getrandbits(32)}.raw"
    if capsys is None:
        r = _call(c, config or c.config, "export", str(backup_id), str(disk), "-o", str(path))
    else:
        r = c.run("export", str(backup_id), str(disk), "-o", str(path), capsys=capsys)
    assert r.code == 0, (backup_id, disk, r.err)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    return digest


def _exports(c: Cloud, capsys: pytest.CaptureFixture[str], backups_: list[dict]) -> dict:
    return {(b["backup_id"], d["disk_id"]): _export(c, capsys, b["backup_id"], d["disk_id"])
            for b in backups_ for d in b["disks"] if not (d["volatile"] or d["excluded"])}


def _chunk_files(c: Cloud) -> dict[str, int]:
    """{chunk id hex: stored bytes} of every chunk in the repository."""
    return c.repo.chunks()


def _referenced(c: Cloud) -> set[str]:
    """Every chunk any manifest in the repository references."""
    out: set[str] = set()
    for name, data in c.repo.manifests().items():
        m = mf.decode(data, name)
        for disk_map in m.maps.values():
            for r in disk_map.records():
                if r.chunk is not None:
                    out.add(r.chunk.hex())
    return out


def _manifest_ids(c: Cloud) -> list[int]:
    return [mf.decode(data, name).backup_id for name, data in c.repo.manifests().items()]


def _age_chunks(c: Cloud, seconds: float) -> None:
    """Make every chunk look written `seconds` ago (as after a long wait; on
    S3, whose clock is the server's, wait until they are older than a
    prune's cut-off)."""
    c.repo.age_chunks(seconds)


def _change(c: Cloud, vm: int, disk: int, blocks: list[int], seed: int) -> None:
    with open(c.disk_path(vm, disk), "r+b") as f:
        for i in blocks:
            f.seek(i * BLOCK)
            f.write(pattern(BLOCK // 2, seed * 100 + i))


def _disk_sha(c: Cloud, vm: int, disk: int) -> str:
    return hashlib.sha256(c.disk_path(vm, disk).read_bytes()).hexdigest()


def _call(c: Cloud, config: Path, *args: str, timeout: float = 120) -> Any:
    import subprocess
    import sys

    from tests.agentkit import REPO
    p = subprocess.run([sys.executable, "-m", "agent", *args, "--config", str(config)],
                       capture_output=True, text=True, cwd=REPO, timeout=timeout)

    class R:
        code, out, err = p.returncode, p.stdout, p.stderr

        @staticmethod
        def json() -> Any:
            return json.loads(p.stdout)
    return R


# -- forget --------------------------------------------------------------------------------


def test_forget_in_the_middle_of_a_chain_keeps_every_other_backup_and_prune_frees_the_rest(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = cloud
    os_disk = bytearray(pattern(8 * BLOCK, 1))
    os_disk[6 * BLOCK:7 * BLOCK] = bytes(BLOCK)    # a hole
    vm = c.vm("web", [c.image("web-os", bytes(os_disk)), c.image("web-data",
                                                                 pattern(4 * BLOCK, 2))])
    chain = [_backup(c, capsys, vm)]
    _change(c, vm, 0, [1, 2], 3)
    chain.append(_backup(c, capsys, vm))
    _change(c, vm, 0, [2, 5, 6], 4)                # 6: into the hole
    _change(c, vm, 1, [0], 5)
    chain.append(_backup(c, capsys, vm))
    _change(c, vm, 0, [1], 6)
    chain.append(_backup(c, capsys, vm))
    assert [b["kind"] for b in chain] == ["full", "incremental", "incremental", "incremental"]
    ids = [b["backup_id"] for b in chain]
    before = _exports(c, capsys, chain)
    assert sorted(_manifest_ids(c)) == ids

    # Forget the second backup (its rows are the base of the third's map).
    r = c.run("forget", str(ids[1]), "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["forgotten"] == [ids[1]]
    assert [b["backup_id"] for b in c.run("list", "--json", capsys=capsys).json()] == [
        ids[0], ids[2], ids[3]]
    assert sorted(_manifest_ids(c)) == [ids[0], ids[2], ids[3]]
    assert _exports(c, capsys, [chain[0], chain[2], chain[3]]) == {
        k: v for k, v in before.items() if k[0] != ids[1]}

    # A dry run changes nothing; then the third goes too.
    r = c.run("forget", str(ids[2]), "--dry-run", "--json", capsys=capsys)
    assert r.code == 0 and r.json()["forgotten"] == [ids[2]] and r.json()["dry_run"]
    assert len(c.run("list", "--json", capsys=capsys).json()) == 3
    assert c.run("forget", str(ids[2]), capsys=capsys).code == 0
    assert _exports(c, capsys, [chain[0], chain[3]]) == {
        k: v for k, v in before.items() if k[0] in (ids[0], ids[3])}

    # The next backup is incremental against the latest and restores byte for byte.
    _change(c, vm, 0, [7], 7)
    nxt = _backup(c, capsys, vm)
    assert nxt["kind"] == "incremental"
    assert _export(c, capsys, nxt["backup_id"], 0) == _disk_sha(c, vm, 0)
    assert _export(c, capsys, nxt["backup_id"], 1) == _disk_sha(c, vm, 1)

    # Prune: exactly the chunks no manifest references, and only old enough ones.
    files = _chunk_files(c)
    unreferenced = set(files) - _referenced(c)
    assert unreferenced   # the forgotten backups' own changed blocks
    r = c.run("prune", "--dry-run", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["deleted"] + r.json()["kept_recent"] == len(unreferenced)
    assert _chunk_files(c) == files      # a dry run deletes nothing
    _age_chunks(c, 60)
    store = c.repo.open()
    fresh = os.urandom(1000)
    store.put(hashlib.sha256(fresh).digest(), fresh)   # e.g. a failed backup's, just now
    r = c.run("prune", "--json", capsys=capsys)
    assert r.code == 0, r.err
    report = r.json()
    assert report["deleted"] == len(unreferenced)
    assert report["freed"] == sum(files[x] for x in unreferenced)
    assert report["kept_recent"] == 1 and report["running"] == []
    assert set(_chunk_files(c)) == _referenced(c) | {hashlib.sha256(fresh).hexdigest()}
    assert _exports(c, capsys, [chain[0], chain[3], nxt]) == {
        **{k: v for k, v in before.items() if k[0] in (ids[0], ids[3])},
        (nxt["backup_id"], 0): _disk_sha(c, vm, 0), (nxt["backup_id"], 1): _disk_sha(c, vm, 1)}
    _age_chunks(c, 60)
    again = c.run("prune", "--json", capsys=capsys).json()
    assert again["deleted"] == 1 and set(_chunk_files(c)) == _referenced(c)
    out = c.run("prune", capsys=capsys)
    assert out.code == 0 and out.out.startswith("deleted 0 chunk(s)"), out.out


def test_forget_by_keep_rules_and_bad_arguments(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = cloud
    a = c.vm("a", [c.image("a0", pattern(2 * BLOCK, 11))])
    b = c.vm("b", [c.image("b0", pattern(2 * BLOCK, 12))])
    made = {a: [], b: []}
    for i in range(3):
        for vm in (a, b):
            _change(c, vm, 0, [i % 2], 20 + i)
            made[vm].append(_backup(c, capsys, vm)["backup_id"])
    r = c.run("forget", "--vm", str(a), "--keep-last", "1", "--json", capsys=capsys)
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["forgotten"] == made[a][:2]
    assert [(x["backup_id"], x["keep"]) for x in doc["backups"]] == [
        (made[a][2], True), (made[a][1], False), (made[a][0], False)]
    assert [x["backup_id"] for x in backups(c, b)] == made[b]   # the other VM untouched
    # every VM: the newest of each day (all were taken today: one each)
    r = c.run("forget", "--keep-daily", "1", capsys=capsys)
    assert r.code == 0 and "forgot 2 backup(s)" in r.out, r.out
    assert [x["backup_id"] for x in c.run("list", "--json", capsys=capsys).json()] == [
        made[a][2], made[b][2]]

    for args, says in [((), "nothing to forget"),
                       ((str(made[a][2]), "--keep-last", "2"), "not both"),
                       (("--keep-last", "-1"), "--keep-last")]:
        r = c.run("forget", *args, capsys=capsys)
        assert r.code == 2 and says in r.err, (args, r.err)
    r = c.run("forget", str(made[a][2]), "999", capsys=capsys)
    assert r.code != 0 and "backup 999 does not exist" in r.err, r.err
    assert len(c.run("list", "--json", capsys=capsys).json()) == 2   # nothing forgotten


# -- prune beside running backups ------------------------------------------------------------


@pytest.mark.parametrize("cloud", ["local"], indirect=True)
def test_prune_keeps_what_a_running_backup_may_reference(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """Deterministic: a backup elsewhere (its marker in running/) wrote a chunk
    that no manifest references yet; a prune keeps it while the marker is
    live, frees it once the marker is gone or stale. A dedup hit on an old
    unreferenced chunk (put of an existing file) refreshes it, so the prune
    running beside that backup keeps it too. A naive prune (every chunk no
    manifest references) deletes both: the first assertions fail on it.
    Local only: it sets file times by hand; its S3 form, with the server's
    clock, is tests/test_s3.py::test_s3_prune_keeps_what_a_running_backup_wrote_or_touched."""
    c = cloud
    store = c.repo.open()
    marker = store.running_start("backup-vm99")
    pending = os.urandom(5000)
    pending_id = hashlib.sha256(pending).digest()
    store.put(pending_id, pending)          # written after the backup started
    reused = os.urandom(5000)
    reused_id = hashlib.sha256(reused).digest()
    store.put(reused_id, reused)
    _age_chunks(c, 600)                     # long unreferenced (a forgotten backup's) ...
    marker.beat()
    then = time.time() - 1
    os.utime(store.path / "chunks" / pending_id.hex()[:2] / pending_id.hex(),
             (then, then))                  # ... this one written during the backup
    assert store.put(reused_id, reused) == 0   # ... and now a dedup hit of the backup
    time.sleep(prune_mod.MARGIN + 1.2)      # the prune starts well after both
    r = c.run("prune", "--json", capsys=capsys)
    assert r.code == 0, r.err
    report = r.json()
    assert report["running"] == [marker.path.name]
    assert report["deleted"] == 0 and report["kept_recent"] == 2
    assert {pending_id.hex(), reused_id.hex()} <= set(_chunk_files(c))

    # A marker whose heartbeat stopped long ago (a crashed backup) is ignored.
    old = time.time() - prune_mod.STALE - 60
    os.utime(marker.path, (old, old))
    _age_chunks(c, 600)
    report = c.run("prune", "--json", capsys=capsys).json()
    assert report["stale"] == [marker.path.name] and report["running"] == []
    assert report["deleted"] == 2 and not marker.path.exists()
    assert _chunk_files(c) == {}


def test_a_backup_whose_base_was_forgotten_and_pruned_meanwhile_is_never_committed(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """The backup diffed against backup 1; while it runs, backup 1 is forgotten
    and its chunks pruned: the commit finds a chunk it references gone and
    fails (exit 8) instead of committing a backup that cannot restore; the
    cloud is cleaned up and the next backup (full) succeeds."""
    c = cloud
    vm = c.vm("v", [c.image("v0", pattern(4 * BLOCK, 31))])
    first = _backup(c, capsys, vm)
    _age_chunks(c, 600)
    _change(c, vm, 0, [2], 32)
    c.sim.faults.slow_driver("unplug", 3.0, count=1)   # the detach after the scan
    proc = c.spawn("backup", str(vm), "--json")
    store = c.repo.open()
    wait_until(lambda: len(_chunk_files(c)) == 5, 30, 0.02)   # scanned against backup 1
    assert any(n.startswith("backup-") for n, _, _ in store.running())
    assert c.run("forget", str(first["backup_id"]), capsys=capsys).code == 0
    r = c.run("prune", "--json", capsys=capsys)
    assert r.code == 0 and r.json()["deleted"] == 4, r.out + r.err   # old: not protected
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 8, (out, err)
    assert "was removed while the backup ran" in err and f"back VM {vm} up again" in err
    assert backups(c, vm) == [] and _referenced(c) == set()
    assert c.leftovers() == []
    again = _backup(c, capsys, vm)
    assert again["kind"] == "full"
    assert _export(c, capsys, again["backup_id"], 0) == _disk_sha(c, vm, 0)


def test_a_backup_whose_base_was_forgotten_meanwhile_commits_whole_maps(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """The same race without a prune: the commit finds the backup it diffed
    against gone from the catalog and commits the whole maps; the backup
    succeeds and restores byte for byte, and the next one is incremental."""
    c = cloud
    vm = c.vm("w", [c.image("w0", pattern(4 * BLOCK, 35))])
    first = _backup(c, capsys, vm)
    _change(c, vm, 0, [1], 36)
    c.sim.faults.slow_driver("unplug", 2.0, count=1)
    proc = c.spawn("backup", str(vm), "--json")
    wait_until(lambda: len(_chunk_files(c)) == 5, 30, 0.02)   # scanned against backup 1
    assert c.run("forget", str(first["backup_id"]), capsys=capsys).code == 0
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["kind"] == "incremental"
    assert _export(c, capsys, doc["backup_id"], 0) == _disk_sha(c, vm, 0)
    _change(c, vm, 0, [3], 37)
    nxt = _backup(c, capsys, vm)
    assert nxt["kind"] == "incremental"
    assert _export(c, capsys, nxt["backup_id"], 0) == _disk_sha(c, vm, 0)
    assert _export(c, capsys, doc["backup_id"], 0) != _disk_sha(c, vm, 0)


def test_backups_of_two_vms_in_two_processes_beside_a_forget_and_prune_loop(
        cloud: Cloud) -> None:
    """Two backup loops (two processes at a time, two catalogs sharing the
    repository) while a third loop forgets all but the last 2 backups of each
    catalog and prunes. Contents recur, so backups dedup against chunks that a
    forget has just made unreferenced. Afterwards every kept backup exports
    byte for byte. On a naive prune (no cut-off, no touch) this fails: a
    prune between a backup's chunk writes and its manifest deletes them."""
    c = cloud
    other = c.tmp / "other.toml"      # a second agent: its own catalog, the same repository
    other.write_text(c.config.read_text().replace("catalog.sqlite", "catalog-2.sqlite"))
    init_repository(other)
    vms = {c.vm("a", [c.image("a0", pattern(6 * BLOCK, 41))]): c.config,
           c.vm("b", [c.image("b0", pattern(6 * BLOCK, 42))]): other}
    expected: dict[tuple[Path, int], str] = {}
    errors: list[str] = []
    stop = threading.Event()
    reports: list[dict] = []
    rounds = 6

    def backup_loop(vm: int, config: Path) -> None:
        rnd = random.Random(vm)
        try:
            for i in range(rounds):
                _change(c, vm, 0, rnd.sample(range(6), 2), rnd.randrange(3))   # recurring
                sha = _disk_sha(c, vm, 0)
                r = _call(c, config, "backup", str(vm), "--json")
                if r.code != 0:
                    errors.append(f"backup {vm} round {i}: {r.err}")
                    return
                expected[(config, r.json()["backup_id"])] = sha
        except Exception as e:   # pragma: no cover - reported below
            errors.append(repr(e))

    def prune_loop() -> None:
        last = False
        while not last:   # once more after the backups ended (a slow loop may lag them)
            last = stop.is_set()
            for config in (c.config, other):
                r = _call(c, config, "forget", "--keep-last", "2", "--json")
                if r.code != 0:
                    errors.append(f"forget: {r.err}")
            r = _call(c, c.config, "prune", "--json")
            if r.code != 0:
                errors.append(f"prune: {r.err}")
            else:
                reports.append(r.json())

    # every detach after a scan (the backup's marker is up, its manifest not
    # yet written) takes 0.5 s more: on a loaded machine the prune loop still
    # meets running backups, which is what this test is about
    c.sim.faults.slow_driver("unplug", 0.5, count=None)
    pruner = threading.Thread(target=prune_loop)
    workers = [threading.Thread(target=backup_loop, args=(vm, cfg)) for vm, cfg in vms.items()]
    t0 = time.monotonic()
    pruner.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    stop.set()
    pruner.join(60)
    assert not errors, errors
    assert len(expected) == 2 * rounds
    assert time.monotonic() - t0 < (90 if c.repo.kind == "local" else 150)   # S3: slower
    assert sum(r["deleted"] for r in reports) > 0      # prune did free forgotten chunks
    assert any(r["running"] for r in reports)          # ... while backups ran

    kept = 0
    for config in (c.config, other):
        listed = _call(c, config, "list", "--json").json()
        assert 1 <= len(listed) <= 2 + 1   # the last forget may precede the last backup
        for b in listed:
            assert _export(c, None, b["backup_id"], 0, config) == expected[
                (config, b["backup_id"])], (config, b["backup_id"])
            kept += 1
    assert kept >= 4
    assert _referenced(c) <= set(_chunk_files(c))
    for config in (c.config, other):   # and every chunk they reference reads back whole
        r = _call(c, config, "verify", "--read-data", "--json")
        assert r.code == 0 and r.json()["clean"], r.out + r.err


# -- the agent applies the VM's policy -----------------------------------------------------


def test_the_agent_applies_oneback_keep_after_each_backup(
        cloud: Cloud, agent: Callable[..., AgentProcess],
        capsys: pytest.CaptureFixture[str]) -> None:
    c = cloud
    tagged = c.vm("kept", [c.image("k0", pattern(2 * BLOCK, 51))])
    default = c.vm("default", [c.image("d0", pattern(2 * BLOCK, 52))])
    bad = c.vm("bad", [c.image("x0", pattern(2 * BLOCK, 53))])
    a = agent(reconcile=0.5, extra="min_interval = 1\n[retention]\nkeep_last = 1\n")
    c.one.vm.update(tagged, 'ONEBACK="yes"\nONEBACK_INTERVAL="1s"\nONEBACK_KEEP="2"', 1)
    c.one.vm.update(default, 'ONEBACK="yes"\nONEBACK_INTERVAL="1s"', 1)
    c.one.vm.update(bad, 'ONEBACK="yes"\nONEBACK_KEEP="weekly=two"', 1)
    for vm in (tagged, default):
        wait_until(lambda vm=vm: len([e for e in a.events("retention.forgot")
                                      if e["vm_id"] == vm]) >= 2, 60, 0.1)
    status = wait_until(lambda: user_template(c, bad).get("ONEBACK_STATUS", "")
                        .startswith("error") and user_template(c, bad)["ONEBACK_STATUS"],
                        10, 0.1)
    assert "ONEBACK_KEEP" in status and "daily=7,weekly=4,monthly=6" in status
    assert a.stop() == 0
    for vm, n in ((tagged, 2), (default, 1)):
        listed = backups(c, vm)
        assert len(listed) == n, listed
        forgot = [i for e in a.events("retention.forgot") if e["vm_id"] == vm
                  for i in e["backups"]]
        assert not set(forgot) & {b["backup_id"] for b in listed}
        assert max(forgot) < min(b["backup_id"] for b in listed)   # the oldest went
        for b in listed:
            assert _export(c, capsys, b["backup_id"], 0) == _disk_sha(c, vm, 0)
    assert backups(c, bad) == []
    names = {n.split("/")[0] for n in c.repo.manifests()}
    assert names == {str(tagged), str(default)}
    assert len(c.repo.manifests()) == 3


# -- disk full -------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """mount(dir, MiB): a tmpfs of that size over `dir` (its files kept), unmounted after."""
    import subprocess
    mounted: list[Path] = []

    def mount(where: Path, mib: int) -> Path:
        saved = tmp_path / f"saved-{len(mounted)}"
        shutil.copytree(where, saved)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
        mounted.append(where)
        shutil.copytree(saved, where, dirs_exist_ok=True)
        return where

    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("cloud", ["local"], indirect=True)
def test_a_full_repository_fails_the_backup_cleanly_and_prune_frees_its_chunks(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], small_fs: Any) -> None:
    """Local only: a full filesystem under the repository directory."""
    c = cloud
    repo = small_fs(c.tmp / "repo", 12)
    data = os.urandom(6 * BLOCK)             # incompressible: ~6 MiB of chunks
    vm = c.vm("full", [c.image("f0", data)])
    ballast = repo / "ballast"
    ballast.write_bytes(b"\xff" * (9 * BLOCK))   # leaves ~3 MiB
    r = c.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 8, (r.out, r.err)
    assert "free space" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert c.run("list", "--json", capsys=capsys).json() == []
    assert _manifest_ids(c) == [] and c.leftovers() == []
    assert not any(repo.joinpath("running").iterdir())
    written = _chunk_files(c)
    assert written   # the failed backup's chunks, referenced by nothing
    ballast.unlink()
    _age_chunks(c, 60)
    report = c.run("prune", "--json", capsys=capsys).json()
    assert report["deleted"] == len(written) and _chunk_files(c) == {}
    done = _backup(c, capsys, vm)
    assert done["kind"] == "full"
    assert _export(c, capsys, done["backup_id"], 0) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("cloud", ["local"], indirect=True)
def test_a_full_catalog_fails_the_backup_cleanly(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], small_fs: Any) -> None:
    """Local only: the catalog's filesystem fills up (the catalog is always local)."""
    c = cloud
    vm = c.vm("cat", [c.image("c0", pattern(2 * BLOCK, 61))])
    first = _backup(c, capsys, vm)
    home = c.tmp / "catalog-fs"
    home.mkdir()
    for suffix in ("", "-wal", "-shm", ".lock"):
        src = Path(f"{c.tmp / 'catalog.sqlite'}{suffix}")
        if src.exists():
            shutil.move(src, home / src.name)
    small_fs(home, 2)
    c.config.write_text(c.config.read_text().replace(
        str(c.tmp / "catalog.sqlite"), str(home / "catalog.sqlite")))
    _change(c, vm, 0, [0, 1], 62)
    fill = home / "ballast"
    with open(fill, "wb", buffering=0) as f:      # fill the filesystem to the last byte
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    r = c.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 8, (r.out, r.err)
    assert "catalog" in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert _manifest_ids(c) == [first["backup_id"]] and c.leftovers() == []
    fill.unlink()
    assert [b["backup_id"] for b in c.run("list", "--json", capsys=capsys).json()] == [
        first["backup_id"]]
    done = _backup(c, capsys, vm)
    assert done["kind"] == "incremental"
    assert _export(c, capsys, done["backup_id"], 0) == _disk_sha(c, vm, 0)
