"""`oneback copy` from a local repository to an S3 bucket (the 3-2-1
off-site copy), and with `--lock-days` into a bucket with Object Lock:
through the CLI, onesim and the tests' moto server."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.agentkit import BLOCK, Cloud, pattern
from tests.agentkit import run_with as _run
from tests.s3server import S3RepoView, server, storage_lines


def _s3_target(c: Cloud, kind: str, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Any]:
    """A configuration whose [storage] is a new S3 repository (`kind`: s3,
    or s3-lock for a bucket with Object Lock) and its own catalog; init'ed."""
    where = c.tmp / kind
    where.mkdir()
    repository, table, view = storage_lines(kind, where)
    text = c.config.read_text()
    text = text.replace(f'repository = "{c.tmp / "repo"}"', f'repository = "{repository}"')
    text = text.replace(str(c.tmp / "catalog.sqlite"), str(where / "catalog.sqlite"))
    cfg = where / "oneback.toml"
    cfg.write_text(text.rstrip() + "\n" + table)
    r = _run(cfg, capsys, "init", "--json")
    assert r.code == 0, r.err
    return cfg, view


def _backups(c: Cloud, capsys: pytest.CaptureFixture[str]) -> tuple[int, bytes]:
    first, second = pattern(6 * BLOCK, 1), bytearray(pattern(6 * BLOCK, 1))
    second[2 * BLOCK:3 * BLOCK] = pattern(BLOCK, 9)
    vm = c.vm("offsite", [c.image("offsite0", first)])
    for _ in range(2):
        r = c.run("backup", str(vm), "--json", capsys=capsys)
        assert r.code == 0, r.err
        c.disk_path(vm, 0).write_bytes(bytes(second))
    return vm, bytes(second)


def test_copy_from_local_to_s3_sends_only_what_is_missing_and_restores(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    server()
    c = cloud
    _backups(c, capsys)
    target, view = _s3_target(c, "s3", capsys)
    assert isinstance(view, S3RepoView)
    r = _run(c.config, capsys, "copy", "--to", str(target), "--all", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert [b["outcome"] for b in doc["backups"]] == ["copied", "copied"]
    assert doc["chunks_sent"] == 7 and doc["translated"] is False   # 6 + the changed one
    again = _run(c.config, capsys, "copy", "--to", str(target), "--all", "--json").json()
    assert again["chunks_sent"] == 0
    assert len(view.chunks()) == 7 and len(view.manifest_names()) == 2
    listed = _run(target, capsys, "list", "--json").json()
    r = _run(target, capsys, "verify", "--read-data", "--json")
    assert r.code == 0, r.err
    for b in listed:
        out = c.tmp / f"x{b['backup_id']}.raw"
        r = _run(target, capsys, "export", str(b["backup_id"]), "0", "-o", str(out))
        assert r.code == 0, r.err
        src = c.tmp / f"s{b['backup_id']}.raw"
        source_id = [x for x in _run(c.config, capsys, "list", "--json").json()
                     if x["started"] == b["started"]][0]["backup_id"]
        r = _run(c.config, capsys, "export", str(source_id), "0", "-o", str(src))
        assert r.code == 0, r.err
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(
            src.read_bytes()).digest()


def test_copy_lock_days_into_an_object_lock_bucket_keeps_the_copies(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    """`--lock-days 1`: every object the copy writes carries a retention date;
    a forget in the target keeps the backups and says until when."""
    server()
    c = cloud
    _backups(c, capsys)
    target, view = _s3_target(c, "s3-lock", capsys)
    r = _run(c.config, capsys, "copy", "--to", str(target), "--all", "--lock-days", "1",
             "--json")
    assert r.code == 0, r.err
    key = next(o["Key"] for o in view._objects("manifests/"))
    head = view.s3.head_object(Bucket=view.bucket, Key=key)
    until = head["ObjectLockRetainUntilDate"].timestamp()
    assert time.time() + 0.9 * 86400 < until < time.time() + 2.1 * 86400
    ids = [b["backup_id"] for b in _run(target, capsys, "list", "--json").json()]
    r = _run(target, capsys, "forget", *map(str, ids), "--json")
    assert r.code == 0, r.err
    assert sorted(x["backup_id"] for x in json.loads(r.out)["locked"]) == sorted(ids)
    assert len(_run(target, capsys, "list", "--json").json()) == 2   # kept
