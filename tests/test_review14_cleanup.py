"""Hostile review of issue 14: `oneback cleanup` on one proxy must not tear
down what another proxy's restore (which holds no VM lease) is creating.
Two proxies in two onesim clusters, one oned user, one repository."""

from __future__ import annotations

import json

from tests.onesim.testing import wait_until
from tests.test_multi_agent import World, world  # noqa: F401  (the fixture)


def test_cleanup_on_one_proxy_spares_another_proxys_running_restore(
        world: World) -> None:  # noqa: F811
    w = world
    r = w.b.call("backup", str(w.shared[0]), "--json")
    assert r.code == 0, r.err
    backup_id = r.json()["backup_id"]
    # B's restore of the disk: its new image's driver phase drags out
    w.sim.faults.slow_driver("image", 3.0, count=1)
    proc = w.b.spawn("restore-disk", str(backup_id), "0", "--name", "restored-d0", "--json")
    try:
        wait_until(lambda: any(i.NAME.startswith("oneback-tmp")
                               for i in w.one.imagepool.info(-2, -1, -1).IMAGE), 20, 0.05)
        r = w.a.call("cleanup", "--json")
        assert r.code == 0, r.err
        assert r.json()["removed"] == [], "A's cleanup removed B's restore in progress"
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert json.loads(out)["name"] == "restored-d0"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert w.a.leftovers() == [] and w.b.leftovers() == []
