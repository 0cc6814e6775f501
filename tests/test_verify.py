"""`oneback verify` and self-healing, through the real CLI against onesim, a
real SQLite catalog and a real repository (a directory, and an S3 bucket): damage found and named
(backup, disk, block), damaged chunks quarantined, the next backup stores
them anew, and every older backup that shared them restores again; the
agent's continuous verify finds damage on its own and `oneback status` says so."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import manifest as mf
from tests.agentkit import (
    BLOCK,
    Cloud,
    cloud_per_backend,  # noqa: F401  (`cloud`: both backends)
    offline_config,
    pattern,
)
from tests.agentproc import AgentProcess
from tests.s3server import BACKENDS, S3RepoView

DISK = 4 * BLOCK


def _backup(c: Cloud, capsys: pytest.CaptureFixture[str], vm: int, *args: str) -> dict[str, Any]:
    r = c.run("backup", str(vm), "--json", *args, capsys=capsys)
    assert r.code == 0, r.err
    doc: dict[str, Any] = r.json()
    return doc


def _export(c: Cloud, capsys: pytest.CaptureFixture[str], backup_id: int) -> tuple[int, bytes]:
    out = c.tmp / f"export-{backup_id}.raw"
    out.unlink(missing_ok=True)
    r = c.run("export", str(backup_id), "0", "-o", str(out), capsys=capsys)
    return r.code, out.read_bytes() if r.code == 0 else b""


def _latest_manifest(c: Cloud, vm: int) -> mf.Manifest:
    found = [mf.decode(data, name) for name, data in c.repo.manifests().items()
             if name.startswith(f"{vm}/")]
    return max(found, key=lambda m: m.backup_id)   # names sort by the second only


def _chunk_of(c: Cloud, vm: int, block: int) -> bytes:
    chunk = _latest_manifest(c, vm).maps[0].record(block).chunk
    assert chunk is not None
    return chunk


def _rewrite(c: Cloud, chunk: bytes, data: bytes) -> None:
    c.repo.write_chunk(chunk.hex(), data)


def _flip(c: Cloud, chunk: bytes) -> None:
    data = bytearray(c.repo.read_chunk(chunk.hex()))
    data[len(data) // 2] ^= 0x01
    _rewrite(c, chunk, bytes(data))


def _verify(c: Cloud, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    r = c.run("verify", "--json", *args, capsys=capsys)
    assert "Traceback" not in r.err
    return r.code, r.json(), r.err


@pytest.fixture
def two_backups(cloud: Cloud, capsys: pytest.CaptureFixture[str]
                ) -> tuple[int, list[dict[str, Any]], dict[int, bytes]]:
    """A VM with a 4-block disk, backed up twice (block 2 changed between):
    the backups, and what each must export."""
    vm = cloud.vm("web", [cloud.image("web-os", pattern(DISK, 1))])
    first = _backup(cloud, capsys, vm)
    at = {first["backup_id"]: cloud.disk_path(vm, 0).read_bytes()}
    with open(cloud.disk_path(vm, 0), "r+b") as f:
        f.seek(2 * BLOCK)
        f.write(pattern(BLOCK, 2))
    second = _backup(cloud, capsys, vm)
    assert second["kind"] == "incremental"
    at[second["backup_id"]] = cloud.disk_path(vm, 0).read_bytes()
    return vm, [first, second], at


def test_a_flipped_byte_is_named_quarantined_and_healed_by_the_next_backup(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        two_backups: tuple[int, list[dict[str, Any]], dict[int, bytes]]) -> None:
    vm, backups, at = two_backups
    ids = [b["backup_id"] for b in backups]
    code, doc, _ = _verify(cloud, capsys, "--read-data")
    assert code == 0 and doc["clean"] and doc["checked"] == doc["chunks"] == 5, doc

    chunk = _chunk_of(cloud, vm, 0)          # block 0: in both backups
    _flip(cloud, chunk)
    code, doc, err = _verify(cloud, capsys, "--read-data")
    assert code == 9, doc
    assert "damaged" in err and err.count("\n") == 1
    assert not doc["clean"] and doc["quarantined"] == [chunk.hex()]
    named = {(d["backup_id"], d["disk_id"], d["block"], d["problem"]) for d in doc["damage"]}
    assert named == {(ids[0], 0, 0, "corrupt"), (ids[1], 0, 0, "corrupt")}
    assert sorted(doc["damaged_backups"]) == sorted(str(i) for i in ids)
    assert all(d["quarantined"] and d["vm_id"] == vm for d in doc["damage"])
    # Kept aside, not deleted; no longer in the chunk store.
    assert not cloud.repo.has_chunk(chunk.hex())
    assert cloud.repo.quarantined() == [chunk.hex()]
    # People get the same, one line per damaged block.
    r = cloud.run("verify", capsys=capsys)
    assert r.code == 9
    assert f"backup {ids[0]} (VM {vm}) disk 0 block 0: chunk {chunk.hex()} missing" in r.out
    assert _export(cloud, capsys, ids[0])[0] == 9   # the chunk is gone until healed

    # The next backup (incremental: block 0 did not change) stores it anew.
    third = _backup(cloud, capsys, vm)
    assert third["kind"] == "incremental"
    assert any("stored again" in w for w in third["warnings"]), third
    assert third["disks"][0]["bytes_changed"] == BLOCK
    assert cloud.repo.read_chunk(chunk.hex())
    code, doc, _ = _verify(cloud, capsys, "--read-data")
    assert code == 0 and doc["clean"], doc
    for b in ids:     # the older backups that shared the chunk restore again
        assert _export(cloud, capsys, b) == (0, at[b])
    assert _export(cloud, capsys, third["backup_id"]) == (0, at[ids[1]])


def test_a_deleted_chunk_is_missing_without_reading_data_and_healed(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        two_backups: tuple[int, list[dict[str, Any]], dict[int, bytes]]) -> None:
    vm, backups, at = two_backups
    ids = [b["backup_id"] for b in backups]
    flipped, deleted = _chunk_of(cloud, vm, 1), _chunk_of(cloud, vm, 2)   # 2: only the 2nd's
    _flip(cloud, flipped)
    code, doc, _ = _verify(cloud, capsys)   # existence only: a flipped byte is not seen
    assert code == 0 and doc["clean"] and not doc["read_data"] and doc["bytes_read"] == 0
    cloud.repo.delete_chunk(deleted.hex())
    code, doc, _ = _verify(cloud, capsys)
    assert code == 9
    assert [(d["backup_id"], d["disk_id"], d["block"], d["problem"], d["chunk"])
            for d in doc["damage"]] == [(ids[1], 0, 2, "missing", deleted.hex())]
    # Naming backups checks only theirs: the first never used that chunk.
    code, doc, _ = _verify(cloud, capsys, str(ids[0]))
    assert code == 0 and doc["manifests"] == 1, doc
    r = cloud.run("verify", "999", capsys=capsys)
    assert r.code == 6 and "backup 999 does not exist" in r.err

    healed = _backup(cloud, capsys, vm)
    assert healed["disks"][0]["bytes_changed"] == BLOCK, healed   # block 2 only
    code, doc, _ = _verify(cloud, capsys)
    assert code == 0 and doc["clean"], doc
    # The flipped chunk is still there (an incremental reuses what exists);
    # reading the data finds it, and the backup after that heals it too.
    code, doc, _ = _verify(cloud, capsys, "--read-data")
    assert code == 9 and {d["block"] for d in doc["damage"]} == {1}
    _backup(cloud, capsys, vm)
    assert _verify(cloud, capsys, "--read-data")[0] == 0
    for b in ids:
        assert _export(cloud, capsys, b) == (0, at[b])


def test_full_backup_replaces_a_damaged_chunk_no_verify_has_seen(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        two_backups: tuple[int, list[dict[str, Any]], dict[int, bytes]]) -> None:
    vm, backups, at = two_backups
    ids = [b["backup_id"] for b in backups]
    chunk = _chunk_of(cloud, vm, 3)
    _flip(cloud, chunk)
    assert _export(cloud, capsys, ids[0])[0] == 9
    full = _backup(cloud, capsys, vm, "--full")
    assert full["kind"] == "full"
    assert len(cloud.repo.quarantined()) == 1   # kept aside
    code, doc, _ = _verify(cloud, capsys, "--read-data")
    assert code == 0 and doc["clean"], doc
    for b in ids:
        assert _export(cloud, capsys, b) == (0, at[b])


@pytest.mark.parametrize("how", ["truncated", "another chunk's bytes"])
def test_hostile_chunks_are_caught_by_read_data(
        cloud: Cloud, capsys: pytest.CaptureFixture[str], how: str,
        two_backups: tuple[int, list[dict[str, Any]], dict[int, bytes]]) -> None:
    vm, backups, at = two_backups
    victim, other = _chunk_of(cloud, vm, 1), _chunk_of(cloud, vm, 3)
    stored = cloud.repo.read_chunk(victim.hex())
    if how == "truncated":
        _rewrite(cloud, victim, stored[:len(stored) // 3])
    else:   # a valid zstd frame of a valid chunk, under the wrong name
        _rewrite(cloud, victim, cloud.repo.read_chunk(other.hex()))
    code, doc, _ = _verify(cloud, capsys, "--read-data")
    assert code == 9
    assert {(d["disk_id"], d["block"], d["problem"], d["chunk"]) for d in doc["damage"]} == {
        (0, 1, "corrupt", victim.hex())}
    assert doc["quarantined"] == [victim.hex()]
    assert cloud.repo.has_chunk(other.hex())   # the innocent chunk stays
    _backup(cloud, capsys, vm)
    assert _verify(cloud, capsys, "--read-data")[0] == 0
    for b in backups:
        assert _export(cloud, capsys, b["backup_id"]) == (0, at[b["backup_id"]])


def test_a_manifest_naming_a_chunk_that_never_existed(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        two_backups: tuple[int, list[dict[str, Any]], dict[int, bytes]]) -> None:
    """A manifest written by a buggy or hostile writer: block 1 names a chunk
    nobody ever stored. Both kinds of verify name it; a damaged manifest too."""
    vm, backups, _ = two_backups
    m = _latest_manifest(cloud, vm)
    ghost = hashlib.sha256(b"never stored").digest()
    chunks = bytearray(m.maps[0].chunks)
    chunks[32:64] = ghost
    forged = mf.Manifest(**{**m.__dict__, "backup_id": 77, "catalog": "ff" * 16,
                            "maps": {0: mf.DiskMap(m.maps[0].checksums, chunks)}})
    name = f"{vm}/29991231T000000Z-0123456789abcdef"
    cloud.repo.write_manifest(name, mf.encode(forged))
    for args in ((), ("--read-data",)):
        code, doc, _ = _verify(cloud, capsys, *args)
        assert code == 9, doc
        assert [(d["manifest"], d["backup_id"], d["block"], d["problem"])
                for d in doc["damage"]] == [(name, None, 1, "missing")]
    cloud.repo.write_manifest(name, b"not a manifest")
    code, doc, _ = _verify(cloud, capsys)
    assert code == 9 and [(d["manifest"], d["problem"]) for d in doc["damage"]] == [
        (name, "manifest")]


def test_sample_checks_a_share_and_bad_percentages_are_refused(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        two_backups: tuple[int, list[dict[str, Any]], dict[int, bytes]]) -> None:
    code, doc, _ = _verify(cloud, capsys, "--read-data", "--sample", "40")
    assert code == 0 and doc["chunks"] == 5 and doc["checked"] == 2, doc
    assert doc["bytes_read"] == 2 * BLOCK
    for bad in ("0", "101", "ten"):
        r = cloud.run("verify", "--sample", bad, capsys=capsys)
        assert r.code == 2 and r.err.count("\n") == 1 and "percentage" in r.err, r.err


def test_the_agent_verifies_in_the_background_and_status_shows_damage(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("db", [cloud.image("db-os", pattern(DISK, 5))])
    first = _backup(cloud, capsys, vm)
    chunk = _chunk_of(cloud, vm, 2)
    _flip(cloud, chunk)
    # The whole repository twice a second (in quarter steps): a test's pace.
    a = agent(extra='[verify]\nrate = "172800/1"\ninterval = 0.1\n')
    found = a.wait_event("verify.damaged", timeout=30)
    assert found["chunks"] == [chunk.hex()]
    assert not cloud.repo.has_chunk(chunk.hex())   # quarantined
    r = cloud.call("status", "--json")
    assert r.code == 0, r.err
    bg = r.json()["verify"]["background"]
    assert [(d["backup_id"], d["disk_id"], d["block"], d["problem"]) for d in bg["damage"]] == [
        (first["backup_id"], 0, 2, "corrupt")]
    r = cloud.call("status")
    assert "verify (background)" in r.out and f"disk 0 block 2: chunk {chunk.hex()}" in r.out
    a.wait_event("verify.pass", timeout=30)


def test_a_manifest_recording_a_wrong_xxh3_is_named_alone(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        two_backups: tuple[int, list[dict[str, Any]], dict[int, bytes]]) -> None:
    """The chunk is whole, but a manifest records another xxh3-128 for it (an
    incremental would then skip a block that changed): only reading the
    data finds it, and only that manifest's block is named."""
    vm, backups, _ = two_backups
    m = _latest_manifest(cloud, vm)
    sums = bytearray(m.maps[0].checksums)
    sums[16:32] = bytes(16)   # block 1
    forged = mf.Manifest(**{**m.__dict__, "backup_id": 78, "catalog": "ee" * 16,
                            "maps": {0: mf.DiskMap(sums, m.maps[0].chunks)}})
    name = f"{vm}/29991231T000000Z-fedcba9876543210"
    cloud.repo.write_manifest(name, mf.encode(forged))
    assert _verify(cloud, capsys)[0] == 0
    code, doc, _ = _verify(cloud, capsys, "--read-data")
    assert code == 9 and doc["quarantined"] == []
    assert [(d["manifest"], d["block"], d["problem"]) for d in doc["damage"]] == [
        (name, 1, "checksum")]


@pytest.mark.parametrize("rate", ['"0/7"', '"1/0"', '"-5%"', '"weekly"', "true", "-1"])
def test_a_wrong_verify_rate_is_one_line_naming_the_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], rate: str) -> None:
    from agent.cli import main
    cfg = tmp_path / "oneback.toml"
    cfg.write_text(f"""
[opennebula]
endpoint = "http://127.0.0.1:9/RPC2"
[proxy]
vm_id = 0
[storage]
repository = "{tmp_path / 'repo'}"
[verify]
rate = {rate}
""")
    with pytest.raises(SystemExit) as e:
        main(["verify", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert e.value.code == 3 and err.count("\n") == 1, err
    assert "verify.rate must be the share of the repository" in err and '"1/7"' in err


def _background(c: Cloud) -> dict[str, Any]:
    r = c.call("status", "--json")
    assert r.code == 0, r.err
    return dict(r.json()["verify"].get("background") or {})


def test_a_restarted_agent_goes_on_with_its_verify_pass(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("app", [cloud.image("app-os", pattern(16 * BLOCK, 9))])
    _backup(cloud, capsys, vm)
    # A twentieth of the repository per step: a pass takes 20 steps.
    a = agent(extra='[verify]\nrate = "8640/1"\ninterval = 0.5\n')
    deadline = time.monotonic() + 30
    while not (bg := _background(cloud)) or not 0 < bg["pass_share"] < 0.5:
        assert time.monotonic() < deadline, bg
        time.sleep(0.2)
    a.stop()
    stopped = _background(cloud)
    assert stopped["pass_started"] == bg["pass_started"] and stopped["last_pass_finished"] is None
    b = agent()
    done = b.wait_event("verify.pass", timeout=30)
    # The same pass went on (not started over) and covered every chunk once.
    assert done["started"] == bg["pass_started"]
    assert done["checked"] == 16 and done["damage"] == 0


# -- the store's side: quarantine and heal, on every backend -----------------------------


@pytest.fixture(params=[*BACKENDS, "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from agent import config, repository
    from agent.store.memory import MemoryStore
    if request.param == "memory":
        return MemoryStore()
    cfg = offline_config(tmp_path, backend=request.param)
    return repository.init_store(config.load(cfg).storage)


def _damage(store: Any, chunk: bytes) -> None:
    from agent.store.local import LocalStore
    from agent.store.memory import MemoryStore
    if isinstance(store, MemoryStore):
        store.blobs[chunk] = store.blobs[chunk][:-3] + b"xyz"
        return
    if isinstance(store, LocalStore):
        path = store.path / "chunks" / chunk.hex()[:2] / chunk.hex()
        path.chmod(0o644)
        stored = path.read_bytes()
        path.write_bytes(stored[:-3] + b"xyz")
        return
    view = S3RepoView(store.location.bucket, store.location.prefix)
    view.write_chunk(chunk.hex(), view.read_chunk(chunk.hex())[:-3] + b"xyz")


def test_store_quarantines_only_damaged_chunks_and_heal_replaces_them(store: Any) -> None:
    from agent.errors import IntegrityError, NotFound
    from agent.store import Healing
    data = pattern(100_000, 3)
    chunk = hashlib.sha256(data).digest()
    assert store.put(chunk, data) > 0
    assert store.quarantine(chunk) is False          # whole: stays
    assert store.heal(chunk, data) == 0              # whole: nothing written
    _damage(store, chunk)
    assert store.put(chunk, data) == 0               # put trusts a present chunk ...
    with pytest.raises(IntegrityError):
        store.get(chunk)
    assert Healing(store).put(chunk, data) > 0       # ... heal reads it back and replaces it
    assert store.get(chunk) == data
    _damage(store, chunk)
    assert store.quarantine(chunk) is True
    assert not store.has(chunk) and store.quarantine(chunk) is False
    with pytest.raises(NotFound):
        store.get(chunk)
    assert store.put(chunk, data) > 0 and store.get(chunk) == data   # stored anew
