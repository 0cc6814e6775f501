"""A hostile review of client-side encryption: what a careless environment or
a tampered repository must not be able to do to an encrypted repository,
driven through the real CLI (in this process) on a real repository
directory. Each test failed before the fix that came with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from agent.config import KDF_N
from tests.agentkit import Result, offline_config

PASSPHRASE = "tr0ub4dor & 3 hostile reviewers\n"


def run(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """`oneback ARGS --config CFG` in this process."""
    from agent.cli import main
    capsys.readouterr()
    try:
        main([*args, "--config", str(cfg)])
    except SystemExit as e:
        code = int(e.code or 0)
    else:  # pragma: no cover - main always exits
        code = 0
    out, err = capsys.readouterr()
    return Result(code, out, err)


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
