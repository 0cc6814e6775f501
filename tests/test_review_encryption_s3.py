"""The encryption review's store-level defences on the S3 backend: an
encrypted S3 repository not unlocked refuses to write plaintext, one whose
config object says plain is refused, a huge planted key object is skipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent import config as config_mod
from tests.agentkit import offline_config, repo_view
from tests.test_review_encryption import PASSPHRASE, run


@pytest.fixture
def s3_encrypted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> Path:
    monkeypatch.setattr(config_mod, "TEST_KDF_N", 1024)
    passphrase = tmp_path / "passphrase"
    passphrase.write_text(PASSPHRASE)
    passphrase.chmod(0o600)
    cfg = offline_config(tmp_path, f'passphrase_file = "{passphrase}"', backend="s3")
    r = run(cfg, capsys, "init", "--encryption", "--json")
    assert r.code == 0, r.err
    return cfg


def test_an_encrypted_s3_store_not_unlocked_refuses_to_write_plaintext(
        s3_encrypted: Path) -> None:
    from agent import repository
    from agent.errors import InternalError
    store = repository.open_store(config_mod.load(s3_encrypted).storage)
    block = b"ONEBACK-PLAINTEXT-MARKER " * 1000
    with pytest.raises(InternalError, match="not unlocked"):
        store.put(bytes(32), block)
    with pytest.raises(InternalError, match="not unlocked"):
        store.put_manifest("7/20261202T000000Z-0123456789abcdef", b"plain manifest")
    assert repo_view(s3_encrypted).chunks() == {}


@pytest.mark.parametrize("downgrade", [{"encryption": None},
                                       {"encryption": "none", "format": 1, "hash": "sha256"}])
def test_an_encrypted_s3_repository_whose_config_says_plain_is_refused(
        s3_encrypted: Path, capsys: pytest.CaptureFixture[str],
        downgrade: dict[str, Any]) -> None:
    view: Any = repo_view(s3_encrypted)
    doc = json.loads(view.config())
    for k, v in downgrade.items():
        if v is None:
            doc.pop(k)
        else:
            doc[k] = v
    view.s3.put_object(Bucket=view.bucket, Key=view._key("config"), Body=json.dumps(doc))
    r = run(s3_encrypted, capsys, "key", "export")
    assert r.code == 8 and "was changed" in r.err, (r.code, r.err)


def test_a_huge_key_object_is_skipped(s3_encrypted: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    view: Any = repo_view(s3_encrypted)
    view.s3.put_object(Bucket=view.bucket, Key=view._key("keys/0000planted"),
                       Body=b"{" * (1 << 20))
    r = run(s3_encrypted, capsys, "key", "export")
    assert r.code == 0, r.err
