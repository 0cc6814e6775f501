"""What OpenNebula copies for a backup and for a restore, measured with
onesim's transfer-driver byte counter (`Simulator.copied_bytes()`, per
operation, as each TM_MAD's scripts copy: `snapshot`, `cpds` for a save-as,
`clone`, `ln`, `mvds`), through the real `oneback` CLI.

Goal (issue 13): a backup copies each disk once (the save-as), a restore
writes each byte once (into the restored image itself)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agentkit import Cloud, MiB, make_cloud, pattern

SIZES = (2 * MiB, 3 * MiB)
OPS = ("snapshot", "cpds", "clone", "ln", "mvds")


@pytest.fixture(params=["shared-raw", "qcow2", "local"])
def cloud(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cloud]:
    with make_cloud(tmp_path, storage=request.param) as c:
        yield c


def storage(c: Cloud) -> str:
    return str(c.one.datastore.info(1).TM_MAD)


def copied_during(c: Cloud, *args: str, capsys: pytest.CaptureFixture[str],
                  ) -> tuple[dict[str, int], dict[str, object]]:
    """Run `oneback ARGS --json`; the bytes onesim's drivers copied meanwhile."""
    assert c.sim.wait_idle()
    before = c.sim.copied_bytes()
    r = c.run(*args, "--json", capsys=capsys)
    assert r.code == 0, r.err
    assert c.sim.wait_idle()
    after = c.sim.copied_bytes()
    return {op: after.get(op, 0) - before.get(op, 0) for op in OPS}, r.json()


class ProxyDisks:
    """Every oneback disk seen attached to the proxy VM, as oned shows it."""

    def __init__(self, c: Cloud) -> None:
        self.c, self.seen, self.stop = c, {}, threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        from tests.agentkit import client
        one = client(self.c.sim)
        while not self.stop.is_set():
            disks = one.vm.info(self.c.proxy_id).TEMPLATE.get("DISK", [])
            for d in disks if isinstance(disks, list) else [disks]:
                if str(d.get("IMAGE", "")).startswith("oneback-"):
                    self.seen[d["IMAGE"]] = dict(d)
            self.stop.wait(0.005)

    def __enter__(self) -> ProxyDisks:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_a_backup_copies_each_disk_once(cloud: Cloud,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    disks = [cloud.image(f"c{i}", pattern(size, i)) for i, size in enumerate(SIZES)]
    vm = cloud.vm("two", disks)
    tm = storage(cloud)
    cloud.sim.faults.slow_driver("detach", 0.3)   # the watcher sees every attachment
    with ProxyDisks(cloud) as proxy:
        copied, doc = copied_during(cloud, "backup", str(vm), capsys=capsys)
    total = sum(SIZES)
    assert copied["cpds"] == total                  # the save-as: the one copy of each disk
    assert len(proxy.seen) == len(SIZES)
    if tm == "local":
        # LN_TARGET SYSTEM: a link would copy in and (mvds) back out, so the
        # saved image stays non-persistent: one clone, the least there is
        assert copied["clone"] == total and copied["ln"] == copied["mvds"] == 0
        assert all(d["CLONE"] == "YES" for d in proxy.seen.values())
    else:
        # shared and qcow2 link persistent images in place: no clone, no copy back
        assert copied["clone"] == copied["ln"] == copied["mvds"] == 0
        assert all(d["PERSISTENT"] == "YES" and d["CLONE"] == "NO"
                   for d in proxy.seen.values())
    assert len(proxy.seen) == len(SIZES)
    assert all(d["READONLY"] == "YES" for d in proxy.seen.values())
    # raw disks are snapshotted with `cp`, qcow2 ones as overlays
    assert copied["snapshot"] == (0 if tm == "qcow2" else total)
    if tm == "qcow2":
        assert sum(copied.values()) == total        # one copy of each disk, nothing more
    assert doc["cloud_bytes_copied"] == sum(copied.values())
    assert cloud.leftovers() == []                   # the persistent images are gone too


def test_a_restore_writes_each_byte_once(cloud: Cloud,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = [pattern(size, 10 + i) for i, size in enumerate(SIZES)]
    d0 = cloud.image("r0", data[0])
    d1 = cloud.image("r1", data[1], persistent=True, image_type="OS")
    vm = cloud.vm("app", [d0, d1])
    r = cloud.run("backup", str(vm), "--json", capsys=capsys)
    assert r.code == 0, r.err
    tm = storage(cloud)

    copied, doc = copied_during(cloud, "restore", str(r.json()["backup_id"]),
                                capsys=capsys)
    restored = int(doc["vm_id"])   # type: ignore[call-overload]
    assert copied["cpds"] == 0     # no save-as of a written disk
    if tm == "local":
        # the restored images are persistent while written: local's ln copies
        # the empty image in and its mvds copies the written one back (as
        # today's clone and save-as did); the restored VM's deploy then links
        # its persistent disk 1 by a copy too, as it did the original's
        assert copied["mvds"] == sum(SIZES)
        assert copied["ln"] == sum(SIZES) + SIZES[1]
    else:
        assert copied["ln"] == copied["mvds"] == 0   # written in place, once
    # The only other copy is the restored VM's own deploy: its non-persistent
    # disk 0 is cloned like any VM's (a `cp` of raw, an overlay of qcow2),
    # exactly as the original VM's was; the persistent disk 1 is linked.
    assert copied["clone"] == (0 if tm == "qcow2" else SIZES[0])
    assert copied["snapshot"] == 0
    for i, want in enumerate(data):
        assert cloud.disk_path(restored, i).read_bytes() == want
    images = {int(i.ID): i for i in cloud.one.imagepool.info(-2, -1, -1).IMAGE}
    by_disk = {int(d.DISK_ID): int(d.IMAGE_ID) for d in doc_disks(cloud, restored)}
    assert images[by_disk[0]].PERSISTENT == 0 and images[by_disk[1]].PERSISTENT == 1
    assert images[by_disk[0]].TYPE == 2 and images[by_disk[1]].TYPE == 0   # DATABLOCK, OS
    assert cloud.leftovers() == []


def doc_disks(c: Cloud, vm_id: int) -> list[object]:
    disks = c.one.vm.info(vm_id).TEMPLATE.get("DISK", [])
    return [type("Disk", (), d) for d in (disks if isinstance(disks, list) else [disks])]
