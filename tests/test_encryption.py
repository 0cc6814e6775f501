"""Client-side encryption, through the real CLI against onesim and a real
repository directory: `oneback init --encryption`, backups whose chunks and
manifests reveal neither the disk's content nor a hash of it, keyed chunk
ids that still deduplicate, a wrong or missing passphrase refused in one
line, `key passwd`, `key export` / `storage.key_file` and `key import`, and
damage (a flipped bit, a swapped chunk or manifest) found by verify."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import zstandard

from agent import config as config_mod
from tests.agentkit import BLOCK, Cloud, make_cloud, pattern

PASSPHRASE = "correct horse battery staple\n"
MARKER = b"ONEBACK-PLAINTEXT-MARKER-7d1f0c9e|"   # searched for in every repository file
VM_NAME = "payroll-db-Zanzibar"
TEMPLATE_TEXT = "DESCRIPTION=\"quokka-ledger-template-text\""


def _secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _set_storage(cfg: Path, line: str | None) -> None:
    """Replace the [storage] secret lines of the configuration by `line`."""
    lines = [x for x in cfg.read_text().splitlines()
             if not x.startswith(("passphrase_file", "key_file"))]
    at = lines.index("[storage]") + 1
    if line is not None:
        lines.insert(at, line)
    cfg.write_text("\n".join(lines) + "\n")


@pytest.fixture
def crypt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str]) -> Iterator[Cloud]:
    """A simulated cloud whose oneback repository is encrypted (`oneback init
    --encryption`), with a cheap KDF (tests only)."""
    monkeypatch.setattr(config_mod, "TEST_KDF_N", 1024)
    with make_cloud(tmp_path) as c:
        shutil.rmtree(c.tmp / "repo")   # make_cloud made a plain one
        for suffix in ("", "-wal", "-shm"):
            Path(f"{c.tmp / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)
        passphrase = _secret(c.tmp / "passphrase", PASSPHRASE)
        _set_storage(c.config, f'passphrase_file = "{passphrase}"')
        r = c.run("init", "--encryption", "--json", capsys=capsys)
        assert r.code == 0, r.err
        assert r.json()["encryption"] == "aes-256-gcm"
        yield c


def _backup(c: Cloud, capsys: pytest.CaptureFixture[str], vm: int, *args: str) -> dict[str, Any]:
    r = c.run("backup", str(vm), "--json", *args, capsys=capsys)
    assert r.code == 0, r.err
    doc: dict[str, Any] = r.json()
    return doc


def _export(c: Cloud, capsys: pytest.CaptureFixture[str], backup_id: int) -> tuple[int, bytes]:
    out = c.tmp / f"export-{backup_id}.raw"
    out.unlink(missing_ok=True)
    r = c.run("export", str(backup_id), "0", "-o", str(out), capsys=capsys)
    assert "Traceback" not in r.err
    return r.code, out.read_bytes() if r.code == 0 else b""


def _repo_files(c: Cloud) -> dict[Path, bytes]:
    """Every file of the repository: its bytes, and what they decompress to
    when they are a zstd frame (as a plain repository's chunks and manifests)."""
    found = {}
    for p in sorted((c.tmp / "repo").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            try:
                data += zstandard.ZstdDecompressor().decompressobj().decompress(data)
            except zstandard.ZstdError:
                pass
            found[p] = data
    return found


def _chunk_files(c: Cloud) -> list[Path]:
    return sorted(p for p in (c.tmp / "repo" / "chunks").rglob("*") if p.is_file())


def _one_line(r: Any, code: int, *words: str) -> None:
    assert r.code == code, (r.code, r.out, r.err)
    assert r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    for w in words:
        assert w in r.err, (w, r.err)


def _disk(blocks: int) -> bytearray:
    """A disk with the marker spread over block 1, blocks 3 and 5 identical,
    and block 4 a hole."""
    disk = bytearray(pattern(blocks * BLOCK, 11))
    disk[BLOCK:2 * BLOCK] = (MARKER * (BLOCK // len(MARKER) + 1))[:BLOCK]
    disk[5 * BLOCK:6 * BLOCK] = disk[3 * BLOCK:4 * BLOCK]
    disk[4 * BLOCK:5 * BLOCK] = bytes(BLOCK)
    return disk


def test_an_encrypted_repository_shows_no_plaintext_nor_block_hash_and_restores_byte_for_byte(
        crypt: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = crypt
    disk = _disk(8)
    vm = c.vm(VM_NAME, [c.image("payroll-os", bytes(disk))], extra=TEMPLATE_TEXT)
    first = _backup(c, capsys, vm)
    assert first["kind"] == "full"

    # Dedup under keyed ids: 8 blocks, one hole, two identical: 6 chunks.
    chunks = _chunk_files(c)
    assert len(chunks) == 6, chunks

    # The chunk ids are the HMAC-SHA256 of the blocks under the exported MAC
    # key, never their SHA-256.
    key = c.tmp / "exported.key"
    r = c.run("key", "export", "--output", str(key), "--json", capsys=capsys)
    assert r.code == 0 and r.json()["output"] == str(key), r.err
    assert key.stat().st_mode & 0o777 == 0o600
    mac = base64.b64decode(json.loads(key.read_text())["mac"])
    blocks = [bytes(disk[i * BLOCK:(i + 1) * BLOCK]) for i in range(8)]
    keyed = {hmac.new(mac, b, hashlib.sha256).hexdigest() for i, b in enumerate(blocks) if i != 4}
    assert {p.name for p in chunks} == keyed

    # No file of the repository holds the marker, the VM's name or template
    # text (manifests are encrypted), or any block's SHA-256 (raw or hex).
    needles = [MARKER, MARKER[:16], VM_NAME.encode(), b"quokka-ledger", b"payroll-os"]
    for b in blocks:
        digest = hashlib.sha256(b).digest()
        needles += [digest, digest.hex().encode(), digest.hex().upper().encode()]
    files = _repo_files(c)
    manifests = [p for p in files if "manifests" in p.parts]
    assert len(manifests) == 1
    names = "\n".join(str(p.relative_to(c.tmp / "repo")) for p in files).encode()
    for blob in [*files.values(), names]:
        for needle in needles:
            assert needle not in blob
    assert not any(b"<VM>" in blob or b"<TEMPLATE>" in blob for blob in files.values())
    config = json.loads((c.tmp / "repo" / "config").read_text())
    assert config["encryption"] == "aes-256-gcm" and config["format"] == 2
    keyfiles = [p for p in files if "keys" in p.parts]
    assert len(keyfiles) == 1
    blob = json.loads(keyfiles[0].read_bytes())
    assert blob["kdf"] == "scrypt" and blob["n"] == 1024 and PASSPHRASE.strip() not in str(blob)

    # Export is byte for byte; so is an incremental that stores only the changed block.
    assert _export(c, capsys, first["backup_id"]) == (0, bytes(disk))
    with open(c.disk_path(vm, 0), "r+b") as f:
        f.seek(6 * BLOCK)
        f.write(MARKER * 100)
    disk[6 * BLOCK:6 * BLOCK + 100 * len(MARKER)] = MARKER * 100
    second = _backup(c, capsys, vm)
    assert second["kind"] == "incremental"
    assert second["disks"][0]["bytes_changed"] == BLOCK
    assert len(_chunk_files(c)) == 7
    assert _export(c, capsys, second["backup_id"]) == (0, bytes(disk))
    assert _export(c, capsys, first["backup_id"])[1] != bytes(disk)
    for blob in _repo_files(c).values():
        assert MARKER not in blob

    # And the VM restores from it (a new VM, its disk byte for byte).
    r = c.run("restore", str(second["backup_id"]), "--json", capsys=capsys)
    assert r.code == 0, r.err
    restored = r.json()["vm_id"]
    assert c.disk_path(restored, 0).read_bytes() == bytes(disk)

    # forget and prune read the encrypted manifests: the first backup's own
    # chunk (block 6 before the change) goes, the second still exports.
    assert c.run("forget", str(first["backup_id"]), capsys=capsys).code == 0
    r = c.run("prune", "--json", "--dry-run", capsys=capsys)
    assert r.code == 0 and (r.json()["manifests"], r.json()["referenced"]) == (1, 6), r.out
    assert _export(c, capsys, second["backup_id"]) == (0, bytes(disk))


def test_a_wrong_or_missing_passphrase_is_one_line_exit_3(
        crypt: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = crypt
    vm = c.vm("v", [c.image("v-os", pattern(2 * BLOCK, 3))])
    backup_id = str(_backup(c, capsys, vm)["backup_id"])
    commands = [["list"], ["backup", str(vm)], ["export", backup_id, "0", "-o", "x.raw"],
                ["verify", "--read-data"], ["forget", backup_id], ["prune"], ["agent"],
                ["catalog", "rebuild", "--force"], ["key", "export"]]

    _secret(c.tmp / "passphrase", "not the passphrase\n")
    for command in commands:
        _one_line(c.run(*command, capsys=capsys), 3, "passphrase", "does not open",
                  str(c.tmp / "passphrase"))
    # a trailing newline is not part of the passphrase, but a space is
    _secret(c.tmp / "passphrase", PASSPHRASE.strip() + " \n")
    _one_line(c.run("list", capsys=capsys), 3, "does not open")

    _secret(c.tmp / "passphrase", PASSPHRASE, 0o644)
    _one_line(c.run("list", capsys=capsys), 3, "chmod 600", str(c.tmp / "passphrase"))
    (c.tmp / "passphrase").unlink()
    _one_line(c.run("list", capsys=capsys), 3, "does not exist", str(c.tmp / "passphrase"))
    _set_storage(c.config, None)
    for command in commands:
        _one_line(c.run(*command, capsys=capsys), 3, "is encrypted",
                  "storage.passphrase_file")

    # The right passphrase (without its newline, or with) opens it; nothing was changed.
    _secret(c.tmp / "passphrase", PASSPHRASE.strip())
    _set_storage(c.config, f'passphrase_file = "{c.tmp / "passphrase"}"')
    r = c.run("list", "--json", capsys=capsys)
    assert r.code == 0 and [b["backup_id"] for b in r.json()] == [int(backup_id)], r.err


def test_a_plain_repository_refuses_a_passphrase_and_init_needs_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with make_cloud(tmp_path) as c:   # a plain repository
        passphrase = _secret(c.tmp / "passphrase", PASSPHRASE)
        _set_storage(c.config, f'passphrase_file = "{passphrase}"')
        _one_line(c.run("list", capsys=capsys), 3, "not encrypted", "passphrase_file")
        _one_line(c.run("key", "export", capsys=capsys), 3, "not encrypted")
        # --encryption never turns an existing plain repository into an encrypted one
        second = c.tmp / "second.toml"
        second.write_text(c.config.read_text().replace("catalog.sqlite", "second.sqlite"))
        _one_line(replace(c, config=second).run("init", "--encryption", capsys=capsys), 3,
                  "not encrypted")
        # a new repository: --encryption needs the passphrase, a passphrase needs --encryption
        new = c.tmp / "new.toml"
        new.write_text(second.read_text().replace(f"{c.tmp / 'repo'}", f"{c.tmp / 'new'}"))
        _one_line(replace(c, config=new).run("init", capsys=capsys), 3, "--encryption")
        _set_storage(new, None)
        _one_line(replace(c, config=new).run("init", "--encryption", capsys=capsys), 3,
                  "storage.passphrase_file")
        assert not (c.tmp / "new").exists()


def test_key_passwd_export_and_import(crypt: Cloud, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    c = crypt
    vm = c.vm("v", [c.image("v-os", pattern(3 * BLOCK, 4))])
    backup = _backup(c, capsys, vm)
    want = c.disk_path(vm, 0).read_bytes()
    old = c.tmp / "passphrase"
    old_copy = _secret(c.tmp / "old-passphrase", old.read_text())

    # passwd: the new passphrase opens it, the old one no longer does.
    new = _secret(c.tmp / "new-passphrase", "an entirely new passphrase\n", 0o644)
    _one_line(c.run("key", "passwd", "--new-passphrase-file", str(new), capsys=capsys), 3,
              "chmod 600", str(new))
    new.chmod(0o600)
    keys_before = sorted(os.listdir(c.tmp / "repo" / "keys"))
    r = c.run("key", "passwd", "--new-passphrase-file", str(new), "--json", capsys=capsys)
    assert r.code == 0, r.err
    done = r.json()
    assert sorted(os.listdir(c.tmp / "repo" / "keys")) == [done["key"]]
    assert keys_before == [done["removed"]]
    _one_line(c.run("list", capsys=capsys), 3, "does not open")   # the old passphrase
    shutil.copy(new, old)
    assert _export(c, capsys, backup["backup_id"]) == (0, want)

    # export: the key opens the repository without any passphrase.
    r = c.run("key", "export", capsys=capsys)
    assert r.code == 0, r.err
    exported = _secret(c.tmp / "repo.key", r.out)
    assert json.loads(r.out)["repository"] == json.loads(
        (c.tmp / "repo" / "config").read_text())["id"]
    r = c.run("key", "export", "--output", str(exported), capsys=capsys)
    _one_line(r, 2, "exists")   # never over a file
    _set_storage(c.config, f'key_file = "{exported}"')
    assert _export(c, capsys, backup["backup_id"]) == (0, want)
    second = _backup(c, capsys, vm)
    assert second["kind"] == "incremental"
    exported.chmod(0o640)
    _one_line(c.run("list", capsys=capsys), 3, "chmod 600", str(exported))
    exported.chmod(0o600)

    # A damaged copy of the key is refused (a wrong key would make every chunk
    # look damaged), and so is another repository's key.
    doc = json.loads(exported.read_text())
    mac = bytearray(base64.b64decode(doc["mac"]))
    mac[0] ^= 1
    damaged = _secret(c.tmp / "damaged.key", json.dumps({**doc, "mac": base64.b64encode(
        bytes(mac)).decode()}))
    _set_storage(c.config, f'key_file = "{damaged}"')
    _one_line(c.run("verify", "--read-data", capsys=capsys), 3, "check does not match",
              str(damaged))
    other = _secret(c.tmp / "other.key", "")
    wrong = replace(c, config=c.tmp / "other.toml")
    wrong.config.write_text(c.config.read_text().replace(str(c.tmp / "repo"),
                                                         str(c.tmp / "other-repo")).replace(
        "catalog.sqlite", "other.sqlite"))
    _set_storage(wrong.config, f'passphrase_file = "{old}"')
    assert wrong.run("init", "--encryption", capsys=capsys).code == 0
    r = wrong.run("key", "export", capsys=capsys)
    assert r.code == 0, r.err
    other.write_text(r.out)
    _set_storage(c.config, f'key_file = "{other}"')
    _one_line(c.run("list", capsys=capsys), 3, "not of", str(other))

    # import: with every key blob lost (or the passphrase forgotten), the exported
    # key makes a passphrase open the repository again.
    for name in os.listdir(c.tmp / "repo" / "keys"):
        (c.tmp / "repo" / "keys" / name).unlink()
    _set_storage(c.config, f'passphrase_file = "{old}"')
    _one_line(c.run("list", capsys=capsys), 3, "holds no key", "key import")
    shutil.copy(old_copy, old)   # the first passphrase, forgotten by the repository
    r = c.run("key", "import", str(exported), "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert os.listdir(c.tmp / "repo" / "keys") == [r.json()["key"]]
    assert _export(c, capsys, second["backup_id"]) == (0, c.disk_path(vm, 0).read_bytes())
    _one_line(c.run("key", "import", str(other), capsys=capsys), 3, "not of")


def test_damage_in_an_encrypted_repository_is_found_quarantined_and_healed(
        crypt: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = crypt
    vm = c.vm("v", [c.image("v-os", pattern(4 * BLOCK, 5))])
    first = _backup(c, capsys, vm)
    want = c.disk_path(vm, 0).read_bytes()
    r = c.run("verify", "--read-data", "--json", capsys=capsys)
    assert r.code == 0 and r.json()["clean"], r.out

    # A flipped bit in a chunk: named, quarantined, stored again by the next backup.
    victim, other = _chunk_files(c)[:2]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.chmod(0o644)
    victim.write_bytes(bytes(data))
    r = c.run("verify", "--read-data", "--json", capsys=capsys)
    assert r.code == 9 and "Traceback" not in r.err, r.err
    doc = r.json()
    assert doc["quarantined"] == [victim.name]
    assert {d["problem"] for d in doc["damage"]} == {"corrupt"}
    assert not victim.exists()
    assert [p.name.split(".")[0] for p in (c.tmp / "repo" / "quarantine").iterdir()] == [
        victim.name]
    assert _export(c, capsys, first["backup_id"])[0] == 9
    third = _backup(c, capsys, vm)
    assert any("stored again" in w for w in third["warnings"]), third
    assert _export(c, capsys, first["backup_id"]) == (0, want)

    # A chunk swapped for another (both whole, both ours) is damage too: each is
    # bound to its id.
    other.chmod(0o644)
    other.write_bytes(victim.read_bytes())
    r = c.run("verify", "--read-data", "--json", capsys=capsys)
    assert r.code == 9 and r.json()["quarantined"] == [other.name], r.out

    # A manifest moved under another name does not decrypt (bound to its name):
    # a rebuild reports it damaged.
    [manifest] = [p for p in (c.tmp / "repo" / "manifests").rglob("*") if p.is_file()][:1]
    manifest.rename(manifest.with_name(manifest.name[:-1] + ("0" if manifest.name[-1] != "0"
                                                             else "1")))
    r = c.run("catalog", "rebuild", "--force", "--json", capsys=capsys)
    assert r.code == 9 and "Traceback" not in r.err, r.err
    assert len(r.json()["damaged"]) == 1 and "does not decrypt" in r.json()["damaged"][0]["error"]


# -- the store's side: key blobs and the encrypting codec, on every backend -------------


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    from agent.store.encryption import ALGORITHM
    from agent.store.local import LocalStore
    from agent.store.memory import MemoryStore
    if request.param == "local":
        return LocalStore.init(tmp_path / "repo", encryption=ALGORITHM)
    return MemoryStore(encryption=ALGORITHM)


def test_key_blobs_are_immutable_named_blobs(store: Any) -> None:
    from agent.errors import InternalError, NotFound, RepositoryError
    assert store.encryption == "aes-256-gcm" and store.key_names() == []
    store.put_key("b-2", b"two")
    store.put_key("a_1", b"one")
    assert store.key_names() == ["a_1", "b-2"] and store.get_key("a_1") == b"one"
    with pytest.raises(RepositoryError, match="already exists"):
        store.put_key("a_1", b"other")
    assert store.get_key("a_1") == b"one"
    store.delete_key("a_1")
    store.delete_key("a_1")   # idempotent
    assert store.key_names() == ["b-2"]
    with pytest.raises(NotFound, match="key a_1"):
        store.get_key("a_1")
    for bad in ("", "../config", "a/b", "x" * 65, ".hidden"):
        with pytest.raises(InternalError):
            store.put_key(bad, b"x")


def test_the_encrypting_codec_binds_chunks_to_their_ids_and_manifests_to_their_names(
        store: Any) -> None:
    from agent.errors import IntegrityError
    from agent.store.encryption import EncryptingCodec, random_key
    key, mac = random_key(), random_key()
    store.use_codec(EncryptingCodec(key, mac))
    a, b = pattern(100_000, 1), pattern(100_000, 2)
    ia, ib = store.chunk_id(a), store.chunk_id(b)
    assert ia == hmac.new(mac, a, hashlib.sha256).digest() != hashlib.sha256(a).digest()
    store.put(ia, a)
    store.put(ib, b)
    assert store.get(ia) == a and store.get(ib) == b
    store.put_manifest("3/m1", b"manifest one")
    assert store.get_manifest("3/m1") == b"manifest one"
    # Another key does not read them (named, as damage).
    store.use_codec(EncryptingCodec(random_key(), mac))
    with pytest.raises(IntegrityError, match=f"chunk {ia.hex()} .*does not decrypt"):
        store.get(ia)
    with pytest.raises(IntegrityError, match="manifest 3/m1 is damaged"):
        store.get_manifest("3/m1")
    store.use_codec(EncryptingCodec(key, mac))
    # Chunk b's stored bytes under a's id, manifest 3/m1's under 3/m2: refused.
    if hasattr(store, "blobs"):
        store.blobs[ia] = store.blobs[ib]
        store.manifest_blobs["3/m2"] = store.manifest_blobs["3/m1"]
    else:
        path = store.path / "chunks" / ia.hex()[:2] / ia.hex()
        path.chmod(0o644)
        path.write_bytes((store.path / "chunks" / ib.hex()[:2] / ib.hex()).read_bytes())
        (store.path / "manifests" / "3" / "m2").write_bytes(
            (store.path / "manifests" / "3" / "m1").read_bytes())
    with pytest.raises(IntegrityError, match=ia.hex()):
        store.get(ia)
    with pytest.raises(IntegrityError, match="manifest 3/m2 is damaged"):
        store.get_manifest("3/m2")
    assert store.quarantine(ia) is True and store.quarantine(ib) is False


def test_the_agent_backs_up_into_an_encrypted_repository(
        crypt: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.agentproc import AgentProcess, agent_config, wait_backups
    c = crypt
    vm = c.vm("tagged", [c.image("t0", bytes(_disk(6)))])
    agent_config(c, reconcile=60)
    _secret(c.tmp / "passphrase", "wrong\n")
    wrong = c.spawn("agent")
    _, err = wrong.communicate(timeout=60)
    assert wrong.returncode == 3, err
    assert err.count("\n") == 1 and "does not open" in err and "Traceback" not in err

    _secret(c.tmp / "passphrase", PASSPHRASE)
    a = AgentProcess(c)
    try:
        a.wait_event("agent.started")
        c.one.vm.update(vm, 'ONEBACK="yes"', 1)
        [backup] = wait_backups(c, vm, 1)
    finally:
        assert a.stop() == 0
    assert _export(c, capsys, backup["backup_id"]) == (0, bytes(_disk(6)))
    for blob in _repo_files(c).values():
        assert MARKER not in blob and b"tagged" not in blob
