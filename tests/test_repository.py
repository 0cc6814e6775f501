"""A repository you can trust: `oneback init`, the self-describing repository
(one manifest per backup) and `oneback catalog rebuild`, through the real CLI,
onesim, real SQLite files and a real repository directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from agent import manifest as mf
from agent.errors import IntegrityError, RepositoryError
from agent.model import DiskBackup
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

# -- the manifest encoding ---------------------------------------------------------------


def _manifest(blocks: int, document: str = "<VM><ID>3</ID></VM>") -> mf.Manifest:
    size = blocks * 4 * 1024 * 1024 - 512   # a short last block
    disks = (DiskBackup(0, size, 4 * 1024 * 1024, 5, False, False, size, size, 1234,
                        {"TARGET": "vda", "IMAGE_ID": "5"}),
             DiskBackup(1, 2 * 1024 * 1024, 4 * 1024 * 1024, None, True, False))
    checksums = b"".join(hashlib.sha256(b"x%d" % i).digest()[:16] for i in range(blocks))
    chunks = bytearray(b"".join(hashlib.sha256(b"c%d" % i).digest() for i in range(blocks)))
    chunks[32:64] = bytes(32)   # block 1 is a hole
    return mf.Manifest(
        backup_id=42, catalog="ab" * 16, vm_id=3, vm_name="web", kind="incremental",
        started=1.5, finished=2.5, vm_document=document, image_documents={5: "<IMAGE/>"},
        disks=disks, warnings=("disk 1 is volatile",), maps={0: mf.DiskMap(checksums, chunks)},
        previous={0: 41})


def test_manifest_round_trips_every_field() -> None:
    m = _manifest(20)
    back = mf.decode(mf.encode(m), "3/x")
    assert back == mf.Manifest(**{**m.__dict__, "maps": back.maps,
                                  "previous": {0: 41, 1: None}})
    assert back.maps[0].checksums == m.maps[0].checksums
    assert back.maps[0].chunks == m.maps[0].chunks
    assert back.maps[0].record(1).chunk is None and back.maps[0].record(2).chunk is not None


def test_manifest_costs_at_most_50_bytes_per_block() -> None:
    """Measured on random ids (incompressible) with a 6 KiB VM document: 4096
    blocks (a 16 GiB disk at 4 MiB) cost 48 bytes each plus the header."""
    document = "<VM>" + "".join(f"<ATTR{i}>value {i}</ATTR{i}>" for i in range(300)) + "</VM>"
    blocks = 4096
    m = _manifest(blocks, document)
    m = mf.Manifest(**{**m.__dict__, "maps": {0: mf.DiskMap(
        os.urandom(16 * blocks), os.urandom(32 * blocks))}})
    size = len(mf.encode(m))
    per_block = size / blocks
    print(f"manifest: {size} bytes for {blocks} blocks = {per_block:.1f} bytes per block")
    assert per_block <= 50


@pytest.mark.parametrize("how", ["truncate", "flip", "empty", "garbage"])
def test_a_damaged_manifest_is_an_integrity_error_naming_it(how: str) -> None:
    data = bytearray(mf.encode(_manifest(8)))
    if how == "truncate":
        data = data[:len(data) // 2]
    elif how == "flip":
        data[len(data) // 2] ^= 0x01
    elif how == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not a manifest at all")
    with pytest.raises(IntegrityError, match=r"manifest 3/bad is damaged"):
        mf.decode(bytes(data), "3/bad")


def test_a_newer_manifest_format_asks_for_an_upgrade() -> None:
    import zstandard

    body = bytearray(zstandard.ZstdDecompressor().decompress(mf.encode(_manifest(2))))
    body[8:10] = (mf.VERSION + 1).to_bytes(2, "little")
    body[-32:] = hashlib.sha256(body[:-32]).digest()
    with pytest.raises(RepositoryError, match="upgrade oneback") as e:
        mf.decode(zstandard.ZstdCompressor().compress(bytes(body)), "3/new")
    assert not isinstance(e.value, IntegrityError)


# -- oneback init, and the check every other command makes --------------------------------


def _config(tmp: Path, backend: str = "local") -> Path:
    return offline_config(tmp, backend=backend)


def _run(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from agent.cli import main
    capsys.readouterr()
    try:
        main([*args, "--config", str(cfg)])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _refused(r: tuple[int, str, str], *words: str) -> None:
    code, _, err = r
    assert code == 8 and err.count("\n") == 1 and "Traceback" not in err, r
    for w in words:
        assert w in err, (w, err)


def test_commands_refuse_a_repository_that_was_never_initialised(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], repo_backend: str) -> None:
    cfg = _config(tmp_path, repo_backend)
    view = repo_view(cfg)
    for command in (["list"], ["show", "1"], ["status"], ["export", "1", "0", "-o", "x"]):
        _refused(_run(cfg, capsys, *command), str(tmp_path / "catalog.sqlite"),
                 "oneback init")
    assert not view.exists() and not (tmp_path / "catalog.sqlite").exists()

    code, out, _ = _run(cfg, capsys, "init", "--json")
    made = json.loads(out)
    assert code == 0 and made["created_repository"] is True
    assert made["repository"] == view.location
    config = json.loads(view.config())
    assert config["id"] == made["repository_id"]
    assert (config["format"], config["compression"], config["hash"]) == (1, "zstd", "sha256")
    assert _run(cfg, capsys, "list", "--json")[:2] == (0, "[]\n")
    _refused(_run(cfg, capsys, "init"), "already initialised")


def test_an_unmounted_or_foreign_repository_is_refused_never_replaced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Local only: about a directory whose filesystem is not mounted (S3's
    missing bucket and empty prefix: tests/test_s3.py)."""
    cfg = _config(tmp_path)
    assert _run(cfg, capsys, "init")[0] == 0
    repo = tmp_path / "repo"

    # The filesystem is not mounted: the mount point is an empty directory.
    repo.rename(tmp_path / "mounted-elsewhere")
    repo.mkdir()
    for command in (["list"], ["agent"], ["backup", "1"]):
        _refused(_run(cfg, capsys, *command), str(repo), "empty", "mounted",
                 "belongs to repository", "oneback init")
    assert os.listdir(repo) == []
    repo.rmdir()
    _refused(_run(cfg, capsys, "list"), str(repo), "does not exist", "oneback init")
    assert not repo.exists()

    # Another repository is mounted there.
    LocalStore.init(repo)
    _refused(_run(cfg, capsys, "list"), str(repo), "not the one catalog", "mounted")
    shutil.rmtree(repo)
    repo.mkdir()
    (repo / "data.img").write_text("something else")
    _refused(_run(cfg, capsys, "list"), str(repo), "not a oneback repository")
    assert os.listdir(repo) == ["data.img"]

    # Ours again: everything works.
    shutil.rmtree(repo)
    (tmp_path / "mounted-elsewhere").rename(repo)
    assert _run(cfg, capsys, "list")[0] == 0


def test_a_second_catalog_joins_an_existing_repository(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], repo_backend: str) -> None:
    cfg = _config(tmp_path, repo_backend)
    assert _run(cfg, capsys, "init")[0] == 0
    second = tmp_path / "second.toml"
    second.write_text(cfg.read_text().replace("catalog.sqlite", "second.sqlite"))
    code, out, _ = _run(second, capsys, "init", "--json")
    assert code == 0 and json.loads(out)["created_repository"] is False
    assert _run(second, capsys, "list")[0] == 0


# -- the self-describing repository, and rebuilding the catalog from it ------------------


def _backup(c: Cloud, capsys: pytest.CaptureFixture[str], vm: int, *args: str) -> dict:
    r = c.run("backup", str(vm), "--json", *args, capsys=capsys)
    assert r.code == 0, r.err
    doc: dict = r.json()
    return doc


def _exports(c: Cloud, capsys: pytest.CaptureFixture[str], backups: list[dict]) -> dict:
    """{(backup id, disk id): SHA-256 of the exported disk} of every read disk."""
    out = {}
    for b in backups:
        for d in b["disks"]:
            if d["volatile"] or d["excluded"]:
                continue
            path = c.tmp / f"export-{b['backup_id']}-{d['disk_id']}.raw"
            r = c.run("export", str(b["backup_id"]), str(d["disk_id"]), "-o", str(path),
                      capsys=capsys)
            assert r.code == 0, r.err
            out[(b["backup_id"], d["disk_id"])] = hashlib.sha256(path.read_bytes()).hexdigest()
            path.unlink()
    return out


def _catalog_view(c: Cloud) -> dict:
    """What a catalog holds per backup besides the block maps (read-only SQL)."""
    with sqlite3.connect(c.tmp / "catalog.sqlite") as db:
        rows = db.execute(
            "SELECT b.id, b.vm_id, b.vm_name, b.kind, b.started, b.finished, b.warnings, "
            "d.body FROM backups b JOIN documents d ON d.id = b.vm_document ORDER BY b.id"
        ).fetchall()
        images = db.execute(
            "SELECT i.backup_id, i.image_id, d.body FROM backup_images i "
            "JOIN documents d ON d.id = i.document ORDER BY 1, 2").fetchall()
        disks = db.execute(
            "SELECT backup_id, disk_id, size, block_size, image_id, volatile, excluded, "
            "bytes_read, bytes_changed, bytes_stored, attributes FROM disks ORDER BY 1, 2"
        ).fetchall()
    return {"backups": rows, "images": images, "disks": disks}


def _manifest_files(c: Cloud) -> dict[str, bytes]:
    """{name: stored bytes} of every manifest in the repository."""
    return c.repo.manifests()


def _delete_catalog(c: Cloud) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{c.tmp / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)


def test_rebuild_after_losing_the_catalog_restores_every_backup_byte_for_byte(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = cloud
    os_disk = bytearray(pattern(12 * BLOCK, 1))
    os_disk[4 * BLOCK:6 * BLOCK] = bytes(2 * BLOCK)   # a hole
    web = c.vm("web", [c.image("web-os", bytes(os_disk)), c.image("web-data", pattern(
        5 * BLOCK, 2)), {"TYPE": "fs", "SIZE": 2}])
    db = c.vm("db", [c.image("db-os", pattern(6 * BLOCK, 3))])

    def change(vm: int, disk: int, blocks: list[int], seed: int) -> None:
        with open(c.disk_path(vm, disk), "r+b") as f:
            for i in blocks:
                f.seek(i * BLOCK)
                f.write(pattern(BLOCK // 2, seed * 100 + i))

    backups = [_backup(c, capsys, web), _backup(c, capsys, db)]
    change(web, 0, [1, 4, 11], 5)    # 4: into the hole
    change(web, 1, [0], 6)
    backups.append(_backup(c, capsys, web))
    change(db, 0, [2, 3], 7)
    backups.append(_backup(c, capsys, db))
    change(web, 0, [1, 7], 8)
    backups.append(_backup(c, capsys, web, "--exclude-disk", "1"))
    backups.append(_backup(c, capsys, web, "--full"))
    change(web, 0, [9], 9)
    backups.append(_backup(c, capsys, web))
    assert [b["kind"] for b in backups] == ["full", "full", "incremental", "incremental",
                                            "incremental", "full", "incremental"]

    # One immutable manifest per backup, in the repository, small.
    files = _manifest_files(c)
    assert len(files) == len(backups)
    assert {f.split("/")[0] for f in files} == {str(web), str(db)}
    for f, data in files.items():
        if c.repo.kind == "local":   # read-only, private (umask 077)
            assert (c.tmp / "repo" / "manifests" / f).stat().st_mode & 0o777 == 0o400
        m = mf.decode(data, f)
        blocks = sum(x.count for x in m.maps.values())
        assert len(data) <= 4096 + 50 * blocks, (f, len(data), blocks)

    before = _exports(c, capsys, backups)
    view = _catalog_view(c)
    listed = c.run("list", "--json", capsys=capsys).json()

    _delete_catalog(c)
    r = c.run("list", capsys=capsys)
    assert r.code == 8 and "catalog rebuild" in r.err, r.err
    rebuilt = c.run("catalog", "rebuild", "--json", capsys=capsys)
    assert rebuilt.code == 0, rebuilt.err
    report = rebuilt.json()
    assert [i["backup_id"] for i in report["imported"]] == [b["backup_id"] for b in backups]
    assert report["damaged"] == [] and report["replaced"] is None

    # The same backups, ids, VMs, disks, documents; every export byte for byte.
    assert c.run("list", "--json", capsys=capsys).json() == listed
    assert _catalog_view(c) == view
    assert _exports(c, capsys, backups) == before

    # The next backup is incremental against the latest: only the changed block.
    change(web, 0, [3], 10)
    nxt = _backup(c, capsys, web)
    assert nxt["kind"] == "incremental"
    assert nxt["backup_id"] > max(b["backup_id"] for b in backups)
    d0 = next(d for d in nxt["disks"] if d["disk_id"] == 0)
    assert d0["bytes_changed"] == BLOCK and 0 < d0["bytes_stored"] <= BLOCK
    d1 = next(d for d in nxt["disks"] if d["disk_id"] == 1)
    assert d1["bytes_changed"] == 0
    with open(c.disk_path(web, 0), "rb") as f:
        now = hashlib.sha256(f.read()).hexdigest()
    assert _exports(c, capsys, [nxt])[(nxt["backup_id"], 0)] == now


def test_rebuild_refuses_an_existing_catalog_and_reports_damaged_manifests(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = cloud
    vm = c.vm("v", [c.image("v-os", pattern(4 * BLOCK, 1))])
    backups = []
    for seed in range(4):
        with open(c.disk_path(vm, 0), "r+b") as f:
            f.seek(seed * BLOCK)
            f.write(pattern(1000, 50 + seed))
        backups.append(_backup(c, capsys, vm))
    before = _exports(c, capsys, backups)
    catalog = c.tmp / "catalog.sqlite"
    catalog_bytes = catalog.read_bytes()

    r = c.run("catalog", "rebuild", capsys=capsys)
    assert r.code == 8 and "--force" in r.err and str(catalog) in r.err, r.err
    assert catalog.read_bytes() == catalog_bytes

    stored = _manifest_files(c)
    files = sorted(stored, key=lambda f: mf.decode(stored[f], f).backup_id)   # backup order
    for f, how in ((files[1], "truncate"), (files[2], "flip")):
        data = bytearray(stored[f])
        if how == "truncate":
            data = data[:len(data) // 3]
        else:
            data[len(data) // 2] ^= 0x40
        c.repo.write_manifest(f, bytes(data))
    bad = sorted(files[1:3])

    r = c.run("catalog", "rebuild", "--force", "--json", capsys=capsys)
    assert r.code == 9, r
    assert r.err.count("\n") == 1 and "Traceback" not in r.err
    assert all(name in r.err for name in bad), r.err
    report = r.json()
    assert sorted(d["manifest"] for d in report["damaged"]) == bad
    kept = [backups[0]["backup_id"], backups[3]["backup_id"]]
    assert [i["backup_id"] for i in report["imported"]] == kept
    assert report["replaced"] and Path(report["replaced"]).exists()
    listed = c.run("list", "--json", capsys=capsys).json()
    assert [b["backup_id"] for b in listed] == kept
    assert _exports(c, capsys, [b for b in backups if b["backup_id"] in kept]) == {
        k: v for k, v in before.items() if k[0] in kept}
    # The next backup continues from the latest readable one.
    assert _backup(c, capsys, vm)["kind"] == "incremental"


def _stop_at_new_manifest(proc: subprocess.Popen[str], c: Cloud, known: set[str],
                          stopped: threading.Event) -> None:
    """SIGSTOP `proc` the moment a manifest not in `known` appears."""
    while proc.poll() is None:
        if c.repo.manifest_names() - known:
            os.kill(proc.pid, signal.SIGSTOP)
            stopped.set()
            return


def test_killed_between_manifest_and_commit_rebuild_picks_the_backup_up(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 after the manifest is durable but before the catalog commit:
    the catalog does not show the backup (it is visible only once committed),
    its id is never given to another backup, and `catalog rebuild` imports
    it, complete, because its chunks were durable before its manifest."""
    c = cloud
    vm = c.vm("k", [c.image("k-os", pattern(8 * BLOCK, 1))])
    first = _backup(c, capsys, vm)
    caught: dict | None = None
    for attempt in range(12):
        with open(c.disk_path(vm, 0), "r+b") as f:
            f.seek(attempt % 8 * BLOCK)
            f.write(pattern(4096, 900 + attempt))
        with open(c.disk_path(vm, 0), "rb") as f:
            disk_now = hashlib.sha256(f.read()).hexdigest()
        known = c.repo.manifest_names()
        proc = c.spawn("backup", str(vm))
        stopped = threading.Event()
        watcher = threading.Thread(target=_stop_at_new_manifest,
                                   args=(proc, c, known, stopped))
        watcher.start()
        watcher.join(60)
        if stopped.is_set():
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        new = sorted(c.repo.manifest_names() - known)
        assert len(new) == 1
        listed = c.run("list", "--json", capsys=capsys).json()
        m = mf.decode(c.repo.manifests()[new[0]], new[0])
        if m.backup_id not in [b["backup_id"] for b in listed]:
            caught = {"backup_id": m.backup_id, "digest": disk_now, "name": new[0]}
            break
    if caught is None:
        pytest.skip("never stopped a backup between its manifest and its commit")

    # Not visible, and its id is never reused.
    after = _backup(c, capsys, vm)
    assert after["backup_id"] > caught["backup_id"]
    # Rebuild imports it under its id, complete.
    _delete_catalog(c)
    r = c.run("catalog", "rebuild", "--json", capsys=capsys)
    assert r.code == 0, r.err
    ids = [i["backup_id"] for i in r.json()["imported"]]
    assert caught["backup_id"] in ids and after["backup_id"] in ids
    assert first["backup_id"] in ids
    got = _exports(c, capsys, [{"backup_id": caught["backup_id"], "disks": [
        {"disk_id": 0, "volatile": False, "excluded": False}]}])
    assert got[(caught["backup_id"], 0)] == caught["digest"]


def test_two_catalogs_sharing_a_repository_never_collide(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """Two agents (two catalogs) back up into one repository: their manifest
    names never collide; a rebuild keeps the first holder of an id and
    renumbers the other catalog's backups past the largest."""
    c = cloud
    a = c.vm("a", [c.image("a-os", pattern(2 * BLOCK, 1))])
    b = c.vm("b", [c.image("b-os", pattern(2 * BLOCK, 2))])
    first = _backup(c, capsys, a)
    second_cfg = c.tmp / "second.toml"
    second_cfg.write_text(c.config.read_text().replace("catalog.sqlite", "second.sqlite"))
    init_repository(second_cfg)
    second = Cloud(c.sim, c.one, c.proxy_id, second_cfg, c.tmp, c.repo)
    other = _backup(second, capsys, b)
    assert other["backup_id"] == first["backup_id"]   # each catalog numbers its own
    before = _exports(c, capsys, [first]) | {
        ("b", k[1]): v for k, v in _exports(second, capsys, [other]).items()}

    _delete_catalog(c)
    r = c.run("catalog", "rebuild", "--json", capsys=capsys)
    assert r.code == 0, r.err
    imported = r.json()["imported"]
    assert len(imported) == 2
    renumbered = [i for i in imported if i["renumbered_from"] is not None]
    assert len(renumbered) == 1 and renumbered[0]["renumbered_from"] == other["backup_id"]
    new_b = renumbered[0]["backup_id"]
    assert new_b > first["backup_id"]
    assert _exports(c, capsys, [first])[(first["backup_id"], 0)] == before[(first["backup_id"], 0)]
    got = _exports(c, capsys, [{"backup_id": new_b, "disks": other["disks"]}])
    assert got[(new_b, 0)] == before[("b", 0)]


def test_init_on_a_catalog_from_before_manifests_writes_them(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """A catalog an older oneback made (no repository id, no manifests) is
    refused until `oneback init`, which binds it and writes a manifest for
    each of its backups: a rebuild then recovers all of them."""
    c = cloud
    vm = c.vm("old", [c.image("old-os", pattern(3 * BLOCK, 1)), {"TYPE": "fs", "SIZE": 1}])
    backups = [_backup(c, capsys, vm)]
    with open(c.disk_path(vm, 0), "r+b") as f:
        f.write(pattern(100, 77))
    backups.append(_backup(c, capsys, vm))
    before = _exports(c, capsys, backups)
    # What the m004 migration leaves of an older catalog and repository:
    with sqlite3.connect(c.tmp / "catalog.sqlite") as db:
        db.execute("DELETE FROM meta WHERE key = 'repository_id'")
        db.execute("UPDATE backups SET manifest = NULL")
    for name in c.repo.manifest_names():
        c.repo.delete_manifest(name)

    r = c.run("list", capsys=capsys)
    assert r.code == 8 and "records no repository" in r.err and "oneback init" in r.err, r.err
    r = c.run("init", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert r.json()["backfilled"] == 2 and r.json()["created_repository"] is False
    assert len(_manifest_files(c)) == 2
    assert c.run("init", capsys=capsys).code == 8   # bound now: nothing more to do

    _delete_catalog(c)
    r = c.run("catalog", "rebuild", "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert [i["backup_id"] for i in r.json()["imported"]] == [b["backup_id"] for b in backups]
    assert _exports(c, capsys, backups) == before
    assert _backup(c, capsys, vm)["kind"] == "incremental"


def test_rebuild_refuses_a_catalog_a_running_process_holds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], repo_backend: str) -> None:
    from agent.lease import Lease

    cfg = _config(tmp_path, repo_backend)
    assert _run(cfg, capsys, "init")[0] == 0
    held = Lease.acquire(tmp_path / "catalog.sqlite")   # what every running oneback holds
    try:
        _refused(_run(cfg, capsys, "catalog", "rebuild", "--force"), "in use", "stop it")
    finally:
        held.release()
    code, out, err = _run(cfg, capsys, "catalog", "rebuild", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["imported"] == [] and Path(json.loads(out)["replaced"]).exists()
    assert _run(cfg, capsys, "list", "--json")[:2] == (0, "[]\n")
