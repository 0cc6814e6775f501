"""Hostile review of issue 14's catalog sync: an import is one transaction.

`repository.sync` committed the imported backup, then recorded in a second
transaction that it was imported (and from which catalog). A failure (a full
disk, a kill -9) between the two left a backup this catalog took for its
own: when its writer forgot it, sync never dropped it, so `list` kept
offering a backup whose chunks a prune then deleted (and retention counted
it as kept). The failure is injected with an SQLite trigger on the
`imported` table of B's catalog."""

from __future__ import annotations

import sqlite3

from tests.test_multi_agent import World, _listed, world  # noqa: F401  (the fixture)


def test_an_import_that_fails_halfway_is_not_kept_as_this_catalogs_own(
        world: World) -> None:  # noqa: F811
    w = world
    r = w.a.call("backup", str(w.shared[0]), "--json")
    assert r.code == 0, r.err
    made_by_a = r.json()["backup_id"]
    catalog = w.b.tmp / "catalog.sqlite"
    with sqlite3.connect(catalog) as conn:
        conn.execute("CREATE TRIGGER fail_import BEFORE INSERT ON imported "
                     "BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    r = w.b.call("catalog", "sync", "--json")
    assert r.code != 0, r.out
    with sqlite3.connect(catalog) as conn:
        conn.execute("DROP TRIGGER fail_import")
    r = w.b.call("catalog", "sync", "--json")
    assert r.code == 0, r.err
    assert w.shared[0] in _listed(w.b)
    # A forgets its backup (and deletes its manifest): B's next sync drops it
    assert w.a.call("forget", str(made_by_a)).code == 0
    r = w.b.call("catalog", "sync", "--json")
    assert r.code == 0, r.err
    assert w.shared[0] not in _listed(w.b), "B still lists a backup its writer forgot"
