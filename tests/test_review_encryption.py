"""A hostile review of client-side encryption: what a careless environment or
a tampered repository must not be able to do to an encrypted repository,
driven through the real CLI (in this process) on a real repository
directory. Each test failed before the fix that came with it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent import keys
from agent.config import KDF_N
from tests.agentkit import offline_config
from tests.agentkit import run_with as run

PASSPHRASE = "tr0ub4dor & 3 hostile reviewers\n"




def _repo(tmp: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """An encrypted repository made by `oneback init --encryption`; its config."""
    passphrase = tmp / "passphrase"
    passphrase.write_text(PASSPHRASE)
    passphrase.chmod(0o600)
    cfg = offline_config(tmp, f'passphrase_file = "{passphrase}"')
    r = run(cfg, capsys, "init", "--encryption", "--json")
    assert r.code == 0, r.err
    return cfg


@pytest.fixture
def cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """New key blobs with a cheap scrypt, through the in-process test hook."""
    monkeypatch.setattr(config_mod, "TEST_KDF_N", 1024, raising=False)
    yield


def _blobs(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_bytes()) for p in sorted((tmp / "repo" / "keys").iterdir())]


# -- the test-only KDF cost --------------------------------------------------------


def test_an_environment_variable_cannot_weaken_a_new_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """$ONEBACK_TEST_KDF_N left in a shell or a unit file (copied from a test
    run) made `init --encryption` (and `key passwd`, `key import`) write key
    blobs with scrypt N=1024: 64x cheaper to guess the passphrase from a
    stolen repository, silently. No environment may weaken a new key."""
    monkeypatch.setenv("ONEBACK_TEST_KDF_N", "1024")
    cfg = _repo(tmp_path, capsys)
    [blob] = _blobs(tmp_path)
    assert blob["n"] == KDF_N == 2**16 and blob["r"] == 8 and blob["p"] == 1, blob

    new = tmp_path / "new-passphrase"
    new.write_text("another long passphrase\n")
    new.chmod(0o600)
    r = run(cfg, capsys, "key", "passwd", "--new-passphrase-file", str(new), "--json")
    assert r.code == 0, r.err
    [blob] = _blobs(tmp_path)
    assert blob["n"] == KDF_N, blob


# -- a tampered repository's key blobs ---------------------------------------------


def _forge(tmp: Path, name: str, **fields: Any) -> None:
    """A key blob named `name` (sorted before the real one): a copy of the real
    blob with `fields` replaced (json text, so that Infinity can be written)."""
    real = _blobs(tmp)[0]
    real.update(fields)
    text = json.dumps(real)
    (tmp / "repo" / "keys" / name).write_text(text)


@pytest.mark.parametrize("fields", [
    {"n": float("inf")},            # json.loads reads Infinity: int() raised OverflowError
    {"r": float("inf")},
    {"p": float("-inf")},
    {"n": 2**40},
    {"r": 2**30},
    {"n": 2**20, "r": 8, "p": 1},   # 1 GiB of memory for one blob
    {"n": 2**17, "r": 32, "p": 16},   # 512 MiB, 128x the work of a real key
    {"n": 2**16, "r": 8, "p": 2**20},
])
def test_a_forged_key_blob_neither_crashes_nor_exhausts_the_agent(
        tmp_path: Path, cheap_kdf: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], fields: dict[str, Any]) -> None:
    """Whoever can write to the repository (its NFS export, its bucket) adds a
    key blob with absurd scrypt parameters. Opening the repository must skip
    it after a bounded effort (memory at most 256 MiB, at most 16x the work
    of a real key) and open with the real key; never a traceback."""
    cfg = _repo(tmp_path, capsys)
    _forge(tmp_path, "0000forged", **fields)
    from agent.store import encryption
    real_scrypt = encryption.scrypt
    asked: list[tuple[int, int, int]] = []

    def bounded(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
        asked.append((n, r, p))
        assert 128 * n * r <= 2**28 and 128 * n * r * p <= 2**30, (n, r, p)
        return real_scrypt(passphrase, salt, n, r, p)

    monkeypatch.setattr(encryption, "scrypt", bounded)
    r = run(cfg, capsys, "key", "export", "--json")
    assert r.code == 0, (r.code, r.err)
    assert "Traceback" not in r.err
    assert json.loads(r.out)["format"] == "oneback-key"
    assert all(128 * n * r_ <= 2**28 for n, r_, _ in asked), asked


def test_only_forged_key_blobs_is_one_line(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """With the real key gone and only a forged one left, the error is one line."""
    cfg = _repo(tmp_path, capsys)
    _forge(tmp_path, "0000forged", n=float("inf"))
    for p in (tmp_path / "repo" / "keys").iterdir():
        if p.name != "0000forged":
            p.chmod(0o600)
            p.unlink()
    r = run(cfg, capsys, "key", "export")
    assert r.code == 8, (r.code, r.err)
    assert r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert "0000forged" in r.err


# -- secrets in reprs ----------------------------------------------------------------


def test_the_master_key_never_shows_in_a_repr(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """A MasterKey (or the Unlocked holding it) in a log line, an event, an
    assertion message or a traceback's locals must not print the keys."""
    cfg = _repo(tmp_path, capsys)
    r = run(cfg, capsys, "key", "export")
    assert r.code == 0, r.err
    doc = json.loads(r.out)
    master = keys.MasterKey.from_json(doc)
    for shown in (repr(master), str(master), repr(keys.Unlocked(master, "k")),
                  f"{master!r}"):
        for secret in (master.encrypt, master.mac):
            assert repr(secret) not in shown and doc["encrypt"] not in shown, shown
            assert secret.hex() not in shown and doc["mac"] not in shown, shown
        assert master.repository in shown or "MasterKey" in shown


# -- the secret files ----------------------------------------------------------------


def test_a_passphrase_file_that_is_not_a_regular_file_is_refused_at_once(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """storage.passphrase_file naming a FIFO (mode 0600) hung every command
    (and the agent) forever on the read: it is refused in one line."""
    import subprocess
    import sys

    from tests.agentkit import REPO, env_without_oneback
    cfg = _repo(tmp_path, capsys)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "passphrase"), str(fifo)))
    try:
        proc = subprocess.run([sys.executable, "-m", "agent", "key", "export", "--config",
                               str(cfg)], capture_output=True, text=True, timeout=30,
                              cwd=REPO, env=env_without_oneback())
    except subprocess.TimeoutExpired:
        pytest.fail("oneback hung reading a FIFO as its passphrase file")
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(fifo) in proc.stderr and "regular file" in proc.stderr, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
def test_a_passphrase_file_owned_by_another_user_is_refused(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """A 0600 passphrase file owned by another (unprivileged) user: that user
    knows (or chose) the passphrase. Refused as ssh refuses such a key file."""
    cfg = _repo(tmp_path, capsys)
    passphrase = tmp_path / "passphrase"
    os.chown(passphrase, 4242, 4242)
    r = run(cfg, capsys, "key", "export")
    assert r.code == 3, (r.code, r.err)
    assert r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert str(passphrase) in r.err and "4242" in r.err and "chown" in r.err, r.err
    os.chown(passphrase, 0, 0)
    assert run(cfg, capsys, "key", "export").code == 0


# -- a tampered repository's keys/ directory -----------------------------------------


def _export_in_a_process(cfg: Path) -> Any:
    import subprocess
    import sys

    from tests.agentkit import REPO, env_without_oneback
    try:
        return subprocess.run([sys.executable, "-m", "agent", "key", "export", "--config",
                               str(cfg)], capture_output=True, text=True, timeout=30,
                              cwd=REPO, env=env_without_oneback())
    except subprocess.TimeoutExpired:
        pytest.fail("oneback hung opening the repository")


@pytest.mark.parametrize("kind", ["fifo", "huge"])
def test_a_key_blob_that_is_a_fifo_or_huge_is_skipped(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str],
        kind: str) -> None:
    """keys/NAME planted as a FIFO (or a symlink to /dev/zero: on NFS it
    resolves on the proxy VM) hung (or exhausted the memory of) every command
    opening the repository. A key blob is small: anything but a regular file
    of at most 64 KiB is skipped like a damaged blob."""
    cfg = _repo(tmp_path, capsys)
    planted = tmp_path / "repo" / "keys" / "0000planted"
    if kind == "fifo":
        os.mkfifo(planted, 0o644)
    else:
        with planted.open("wb") as f:
            f.truncate(200 << 20)   # sparse: 200 MiB read as one key blob
    proc = _export_in_a_process(cfg)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert json.loads(proc.stdout)["format"] == "oneback-key"


def test_a_repository_with_too_many_key_blobs_is_refused_before_any_kdf(
        tmp_path: Path, cheap_kdf: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each key blob costs a scrypt (up to 16x a real key's work): hundreds
    planted in keys/ kept every command and the agent busy for an hour
    before the real key was tried. As restic, oneback tries at most 20
    key blobs; more is one line, before any scrypt."""
    cfg = _repo(tmp_path, capsys)
    for i in range(20):
        _forge(tmp_path, f"0000forged{i:02d}", salt="AAAA" * 8)
    from agent.store import encryption
    calls: list[int] = []
    real_scrypt = encryption.scrypt

    def counted(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
        calls.append(n)
        return real_scrypt(passphrase, salt, n, r, p)

    monkeypatch.setattr(encryption, "scrypt", counted)
    r = run(cfg, capsys, "key", "export")
    assert r.code == 8, (r.code, r.err)
    assert r.err.count("\n") == 1 and "Traceback" not in r.err, r.err
    assert "21 key" in r.err and "storage.key_file" in r.err, r.err
    assert calls == []
    for p in (tmp_path / "repo" / "keys").glob("0000forged1*"):
        p.unlink()
    r = run(cfg, capsys, "key", "export")
    assert r.code == 0, r.err


@pytest.mark.parametrize("fields", [{"version": 2}, {"cipher": "chacha20-poly1305"},
                                    {"version": "1"}])
def test_a_key_blob_of_another_version_or_cipher_is_refused_not_misread(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str],
        fields: dict[str, Any]) -> None:
    """unwrap ignored the blob's "version" and "cipher": a newer oneback's
    key blob (another layout of "data") would be misread (at best as a wrong
    passphrase). It is refused, "upgrade oneback"."""
    cfg = _repo(tmp_path, capsys)
    [path] = (tmp_path / "repo" / "keys").iterdir()
    blob = json.loads(path.read_bytes())
    blob.update(fields)
    path.chmod(0o600)
    path.write_text(json.dumps(blob))
    r = run(cfg, capsys, "key", "export")
    assert r.code == 8, (r.code, r.err)
    assert r.err.count("\n") == 1 and "upgrade oneback" in r.err, r.err


@pytest.mark.parametrize("fields", [{"version": 2}, {"encryption": "chacha20-poly1305"}])
def test_an_exported_key_of_another_version_or_cipher_is_refused(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str],
        fields: dict[str, Any]) -> None:
    """parse_export ignored the document's "version" and "encryption"."""
    cfg = _repo(tmp_path, capsys)
    r = run(cfg, capsys, "key", "export")
    doc = json.loads(r.out)
    doc.update(fields)
    exported = tmp_path / "exported.key"
    exported.write_text(json.dumps(doc))
    exported.chmod(0o600)
    cfg.write_text(cfg.read_text().replace(
        f'passphrase_file = "{tmp_path / "passphrase"}"', f'key_file = "{exported}"'))
    r = run(cfg, capsys, "key", "export")
    assert r.code == 3, (r.code, r.err)
    assert r.err.count("\n") == 1 and str(exported) in r.err, r.err


# -- key passwd ----------------------------------------------------------------------


def test_key_passwd_revokes_the_old_passphrase_in_every_key_blob(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """`key import` with the current passphrase leaves two key blobs it
    opens; `key passwd` deleted only the first, so the old (perhaps leaked)
    passphrase still opened the repository after the operator was told it
    no longer does. Every blob the old passphrase opens is removed."""
    cfg = _repo(tmp_path, capsys)
    exported = tmp_path / "exported.key"
    r = run(cfg, capsys, "key", "export", "--output", str(exported))
    assert r.code == 0, r.err
    r = run(cfg, capsys, "key", "import", str(exported), "--json")
    assert r.code == 0, r.err
    assert len(_blobs(tmp_path)) == 2

    new = tmp_path / "new-passphrase"
    new.write_text("the new passphrase, not leaked\n")
    new.chmod(0o600)
    r = run(cfg, capsys, "key", "passwd", "--new-passphrase-file", str(new), "--json")
    assert r.code == 0, r.err
    done = r.json()
    assert [p.name for p in (tmp_path / "repo" / "keys").iterdir()] == [done["key"]]
    assert len(done["removed_keys"]) == 2 and done["removed"] in done["removed_keys"], done

    r = run(cfg, capsys, "key", "export")   # the old passphrase, still in the config
    assert r.code == 3 and "does not open" in r.err, (r.code, r.err)
    (tmp_path / "passphrase").write_text(new.read_text())
    assert run(cfg, capsys, "key", "export").code == 0


def test_key_passwd_interrupted_between_the_new_key_and_the_deletion_opens_with_both(
        tmp_path: Path, cheap_kdf: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A crash after the new key blob is durable and before the old one is
    deleted: both passphrases open the repository; never zero keys. (A guard:
    this held before the review.)"""
    from agent.store.local import LocalStore
    cfg = _repo(tmp_path, capsys)
    new = tmp_path / "new-passphrase"
    new.write_text("the new passphrase\n")
    new.chmod(0o600)

    def crash(self: LocalStore, name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalStore, "delete_key", crash)
    r = run(cfg, capsys, "key", "passwd", "--new-passphrase-file", str(new))
    assert r.code == 130, (r.code, r.err)
    monkeypatch.undo()
    assert len(_blobs(tmp_path)) == 2
    assert run(cfg, capsys, "key", "export").code == 0
    (tmp_path / "passphrase").write_text(new.read_text())
    assert run(cfg, capsys, "key", "export").code == 0


# -- key export ----------------------------------------------------------------------


def test_key_export_that_cannot_write_the_whole_key_fails_and_leaves_no_file(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """`key export --output` ignored os.write's count: on a full filesystem
    (here a file size limit) it wrote a truncated key, exit 0, and the
    operator filed away a key that opens nothing. It must fail in one line
    and leave no file (a retry is then not refused as "exists")."""
    import resource
    import subprocess
    import sys

    from tests.agentkit import REPO, env_without_oneback
    cfg = _repo(tmp_path, capsys)
    out = tmp_path / "exported.key"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    proc = subprocess.run([sys.executable, "-m", "agent", "key", "export", "--output",
                           str(out), "--config", str(cfg)], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env_without_oneback(), preexec_fn=limit)
    assert proc.returncode != 0, (proc.returncode, proc.stdout, out.read_bytes())
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(out) in proc.stderr, proc.stderr
    assert not out.exists()
    r = run(cfg, capsys, "key", "export", "--output", str(out))
    assert r.code == 0, r.err
    assert json.loads(out.read_bytes())["format"] == "oneback-key"


# -- a store opened but not unlocked ------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_an_encrypted_store_not_unlocked_refuses_to_write_plaintext(
        tmp_path: Path, backend: str) -> None:
    """A store opened on an encrypted repository took the plain codec until
    `keys.unlock` replaced it: any path that forgot to unlock (a new command,
    a copy into an encrypted target) wrote plaintext chunks named by their
    SHA-256 and plain manifests into the encrypted repository, silently.
    Until unlocked it now refuses every chunk and manifest operation."""
    from agent.errors import InternalError
    from agent.store.encryption import ALGORITHM
    from agent.store.local import LocalStore
    from agent.store.memory import MemoryStore
    store: Any
    if backend == "local":
        LocalStore.init(tmp_path / "repo", encryption=ALGORITHM)
        store = LocalStore.open(tmp_path / "repo")
    else:
        store = MemoryStore(encryption=ALGORITHM)
    block = b"ONEBACK-PLAINTEXT-MARKER " * 1000
    with pytest.raises(InternalError, match="not unlocked"):
        store.put(store.chunk_id(block), block)
    with pytest.raises(InternalError, match="not unlocked"):
        store.put(bytes(32), block)
    with pytest.raises(InternalError, match="not unlocked"):
        store.put_manifest("7/20261202T000000Z-0123456789abcdef", b"plain manifest")
    if backend == "local":
        written = [p for p in (tmp_path / "repo").rglob("*")
                   if p.is_file() and p.parent.name not in ("repo", "keys")]
        assert written == [], written
    else:
        assert store.blobs == {} and store.manifest_blobs == {}


# -- init ---------------------------------------------------------------------------


def test_init_interrupted_before_the_first_key_is_finished_by_running_it_again(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """`init --encryption` writes the repository's config, then its first key
    blob: killed between the two, it left an encrypted repository with zero
    keys that no passphrase or key could ever open, and running init again
    said "open it with its exported key" (there is none). An empty
    repository without a key is finished by init (a repository holding any
    chunk or manifest is not: its key is elsewhere)."""
    cfg = _repo(tmp_path, capsys)
    for p in (tmp_path / "repo" / "keys").iterdir():
        p.unlink()                                 # the state the crash left
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)
    r = run(cfg, capsys, "init", "--encryption", "--json")
    assert r.code == 0, (r.code, r.err)
    assert len(_blobs(tmp_path)) == 1
    assert run(cfg, capsys, "key", "export").code == 0

    # A repository holding data whose keys are gone is never given a new key.
    chunk = tmp_path / "repo" / "chunks" / "ab" / ("ab" * 32)
    chunk.write_bytes(b"\x01" + bytes(40))
    for p in (tmp_path / "repo" / "keys").iterdir():
        p.unlink()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'catalog.sqlite'}{suffix}").unlink(missing_ok=True)
    r = run(cfg, capsys, "init", "--encryption")
    assert r.code == 3 and "holds no key" in r.err, (r.code, r.err)
    assert list((tmp_path / "repo" / "keys").iterdir()) == []


def test_key_import_never_makes_more_key_blobs_than_a_passphrase_is_tried_on(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str]) -> None:
    """With MAX_KEYS key blobs already there, `key import` would write one
    more and lock every passphrase out: it is refused, nothing written."""
    cfg = _repo(tmp_path, capsys)
    exported = tmp_path / "exported.key"
    assert run(cfg, capsys, "key", "export", "--output", str(exported)).code == 0
    for i in range(keys.MAX_KEYS - 1):
        _forge(tmp_path, f"0000forged{i:02d}", salt="AAAA" * 8)
    r = run(cfg, capsys, "key", "import", str(exported))
    assert r.code == 8, (r.code, r.err)
    assert r.err.count("\n") == 1 and str(keys.MAX_KEYS) in r.err, r.err
    assert len(list((tmp_path / "repo" / "keys").iterdir())) == keys.MAX_KEYS
    assert run(cfg, capsys, "key", "export").code == 0


# -- a downgraded repository config ----------------------------------------------------


@pytest.mark.parametrize("downgrade", [
    {"encryption": None},                                         # the key removed
    {"encryption": "", "format": 1, "hash": "sha256"},            # made to look plain
    {"encryption": "none", "format": 1, "hash": "sha256"},
])
def test_an_encrypted_repository_whose_config_says_plain_is_refused(
        tmp_path: Path, cheap_kdf: None, capsys: pytest.CaptureFixture[str],
        downgrade: dict[str, Any]) -> None:
    """REPO/config is not authenticated: whoever can write to the repository
    could drop its "encryption". oneback then said "not encrypted, but
    storage.passphrase_file is set: remove it", and once the operator did,
    every new backup went into the attacker's storage in plaintext. A config
    saying plain beside a keys/ directory is refused as changed, whatever
    the configuration says."""
    cfg = _repo(tmp_path, capsys)
    conf = tmp_path / "repo" / "config"
    doc = json.loads(conf.read_bytes())
    for k, v in downgrade.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    conf.chmod(0o644)
    conf.write_text(json.dumps(doc))
    r = run(cfg, capsys, "key", "export")
    assert r.code == 8, (r.code, r.err)
    assert r.err.count("\n") == 1 and "was changed" in r.err, r.err
    assert "remove it from the configuration" not in r.err
    cfg.write_text("\n".join(x for x in cfg.read_text().splitlines()
                             if not x.startswith("passphrase_file")) + "\n")
    r = run(cfg, capsys, "key", "export")
    assert r.code == 8 and "was changed" in r.err, (r.code, r.err)
