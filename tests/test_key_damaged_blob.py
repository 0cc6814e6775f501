"""A wrong passphrase beside a damaged key blob is still said to be a wrong
passphrase (exit 3, naming the damage too), not only the damage (exit 8);
the right passphrase still opens the repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config as config_mod
from tests.agentkit import offline_config
from tests.agentkit import run_with as run
from tests.test_review_encryption import PASSPHRASE


@pytest.fixture(autouse=True)
def cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(config_mod, "TEST_KDF_N", 1024, raising=False)
    yield


def test_a_wrong_passphrase_beside_a_damaged_key_blob_is_exit_3(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE)
    passphrase.chmod(0o600)
    cfg = offline_config(tmp_path, f'passphrase_file = "{passphrase}"')
    assert run(cfg, capsys, "init", "--encryption", "--json").code == 0
    damaged = tmp_path / "repo" / "keys" / "0000damaged"
    damaged.write_bytes(b"{not json")
    damaged.chmod(0o400)

    passphrase.write_text("not the passphrase\n")
    r = run(cfg, capsys, "list")
    assert r.code == 3, r
    assert r.err.count("\n") == 1 and "opens none of the 1 whole key file" in r.err, r.err
    assert "0000damaged" in r.err and "Traceback" not in r.err

    passphrase.write_text(PASSPHRASE)
    assert run(cfg, capsys, "list").code == 0
