"""An encrypted repository in an S3 bucket: `oneback init --encryption` on
`s3://`, a backup through onesim, export byte for byte, and no plaintext (nor
a plain SHA-256 of a block) in any object of the bucket. The encryption and
S3 suites each cover their own side in depth (test_encryption.py,
test_s3.py); this is where the two meet: the S3 store keeps the encrypted
config, the key blobs and the codec as a local one does."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import config
from tests.agentkit import BLOCK, Cloud, make_cloud, pattern
from tests.agentkit import run_with as _run
from tests.s3server import S3RepoView

MARK = b"wombat-ledger-plaintext-"


@pytest.fixture
def s3_cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    monkeypatch.setattr(config, "TEST_KDF_N", 1024)
    with make_cloud(tmp_path, backend="s3") as c:
        yield c




def _sealed_config(c: Cloud, passphrase: str) -> tuple[Path, S3RepoView]:
    """A second configuration of the same cloud: a new prefix of the same
    bucket, a new catalog, a passphrase file."""
    assert isinstance(c.repo, S3RepoView)
    secret = c.tmp / "passphrase"
    secret.write_text(passphrase + "\n")
    secret.chmod(0o600)
    text = c.config.read_text()
    text = re.sub(r'repository = "s3://([^/"]+)/[^"]*"', r'repository = "s3://\1/sealed"', text)
    text = text.replace(str(c.tmp / "catalog.sqlite"), str(c.tmp / "sealed.sqlite"))
    text = text.replace("[storage]\n", f'[storage]\npassphrase_file = "{secret}"\n', 1)
    cfg = c.tmp / "sealed.toml"
    cfg.write_text(text)
    return cfg, S3RepoView(c.repo.bucket, "sealed", cfg)


def test_an_encrypted_s3_repository_holds_no_plaintext_and_restores(
        s3_cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    c = s3_cloud
    cfg, view = _sealed_config(c, "a long and secret passphrase")
    r = _run(cfg, capsys, "init", "--encryption", "--json")
    assert r.code == 0, r.err
    assert r.json()["encryption"] == "aes-256-gcm"

    blocks = [MARK * (BLOCK // len(MARK)) + bytes(BLOCK % len(MARK)), pattern(BLOCK, 7),
              pattern(BLOCK, 8), bytes(BLOCK)]
    disk = b"".join(blocks)
    vm = c.vm("sealed-vm", [c.image("sealed0", disk)])
    r = _run(cfg, capsys, "backup", str(vm), "--json")
    assert r.code == 0, r.err
    backup_id = r.json()["backup_id"]

    out = c.tmp / "out.raw"
    r = _run(cfg, capsys, "export", str(backup_id), "0", "-o", str(out))
    assert r.code == 0, r.err
    assert out.read_bytes() == disk

    stored = b"".join(view.s3.get_object(Bucket=view.bucket, Key=o["Key"])["Body"].read()
                      for o in view._objects(""))
    assert stored and MARK not in stored and b"sealed-vm" not in stored
    for block in blocks[:3]:
        digest = hashlib.sha256(block).digest()
        assert digest not in stored and digest.hex().encode() not in stored
    names = set(view.chunks())
    assert names and not {hashlib.sha256(b).hexdigest() for b in blocks} & names

    r = _run(cfg, capsys, "verify", "--read-data", "--json")
    assert r.code == 0, r.err

    wrong = c.tmp / "passphrase"
    wrong.write_text("not the passphrase\n")
    r = _run(cfg, capsys, "list")
    assert r.code == 3 and len(r.err.strip().splitlines()) == 1, r.err
    assert "Traceback" not in r.err
