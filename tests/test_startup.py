"""Fast start without loss: a command on an up-to-date catalog does not import
sqlite-utils (40 ms of `oneback list`'s start-up), and a catalog an older
oneback wrote is still migrated to the current schema when it is opened."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from sqlite_utils import Database, Migrations

from agent.catalog import Catalog
from agent.catalog.schema import _KNOWN, m001_initial, m002_jobs
from tests.agentkit import REPO

PROBE = """
import json, sys
out, args = sys.argv[1], sys.argv[2:]
from agent.cli import main
try:
    main(args)
except SystemExit as e:
    code = e.code
json.dump({"code": code, "sqlite_utils": "sqlite_utils" in sys.modules}, open(out, "w"))
"""


def oneback(tmp: Path, *args: str) -> dict[str, object]:
    """`oneback ARGS` in a fresh interpreter: its exit code, and whether it
    imported sqlite-utils."""
    out = tmp / "probe.json"
    p = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert out.exists(), p.stderr
    doc: dict[str, object] = json.loads(out.read_text())
    doc["stderr"] = p.stderr
    return doc


def config(tmp: Path) -> Path:
    cred = tmp / "one_auth"
    cred.write_text("oneadmin:secret\n")
    cred.chmod(0o600)
    cfg = tmp / "oneback.toml"
    cfg.write_text('[opennebula]\nendpoint = "http://127.0.0.1:9/RPC2"\n'
                   f'credentials_file = "{cred}"\n[proxy]\nvm_id = 1\n[storage]\n'
                   f'repository = "{tmp / "repo"}"\ncatalog = "{tmp / "catalog.sqlite"}"\n')
    return cfg


def test_list_on_an_up_to_date_catalog_does_not_import_sqlite_utils(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    made = oneback(tmp_path, "init", "--config", str(cfg))
    assert made["code"] in (0, None), made["stderr"]
    assert made["sqlite_utils"], "creating the catalog migrates it with sqlite-utils"
    for args in (("list", "--config", str(cfg)), ("list", "--json", "--config", str(cfg))):
        doc = oneback(tmp_path, *args)
        assert doc["code"] in (0, None), (args, doc["stderr"])
        assert doc["sqlite_utils"] is False, f"oneback {' '.join(args)} imported sqlite_utils"


def test_a_catalog_of_an_older_oneback_is_migrated_on_open(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    past = Migrations("oneback")  # what an earlier oneback shipped
    past(name="m001_initial")(m001_initial)
    past(name="m002_jobs")(m002_jobs)
    db = Database(path)
    past.apply(db)
    db.close()
    with Catalog.open(path) as cat:
        assert cat.list_backups() == []
    conn = sqlite3.connect(path)
    applied = [r[0] for r in conn.execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = 'oneback' ORDER BY rowid")]
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert applied == _KNOWN and mode == "wal"
    with Catalog.open(path) as cat:  # and opens again without migrating twice
        assert cat.list_backups() == []
