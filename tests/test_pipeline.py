"""Disks pipelined (issue 13, item 3): while the proxy reads disk N, disk
N+1 is already being saved as an image. Observed from outside, in onesim's
state over pyone, never by wall time: a temporary image still being saved
(LOCKED) while another is attached to the proxy VM. Every backup exports
byte for byte, nothing is left in the cloud, and `agent.max_attached = 1`
holds: never two oneback attachments on the proxy at once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from tests.agentkit import Cloud, MiB, pattern
from tests.agentproc import AgentProcess, wait_backups

DISK = 2 * MiB
SAVEAS = 0.4   # seconds each save-as's driver takes: the window the sampler sees
LOCKED = {4, 9, 10}   # ImageState LOCKED, LOCKED_USED, LOCKED_USED_PERS


@dataclass
class Seen:
    overlaps: int = 0          # samples: one image saving while another is attached
    most_attached: int = 0     # oneback disks on the proxy at once
    samples: int = 0
    errors: list[str] = field(default_factory=list)


def _sample(c: Cloud, seen: Seen) -> None:
    saving = [i for i in c.one.imagepool.info(-2, -1, -1).IMAGE
              if i.NAME.startswith("oneback-tmp") and int(i.STATE) in LOCKED]
    proxy = c.one.vm.info(c.proxy_id)
    disks = proxy.TEMPLATE.get("DISK", [])
    disks = disks if isinstance(disks, list) else [disks]
    attached = [d for d in disks if d.get("DISK_ID") != "0"]
    seen.samples += 1
    seen.most_attached = max(seen.most_attached, len(attached))
    if saving and attached:
        seen.overlaps += 1


@contextmanager
def watching(c: Cloud) -> Iterator[Seen]:
    """Sample the cloud, as often as it answers, until the block ends."""
    seen = Seen()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                _sample(c, seen)
            except Exception as e:   # an object gone between two calls: sample again
                seen.errors.append(str(e))
            stop.wait(0.01)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield seen
    finally:
        stop.set()
        t.join(10)


def three_disk_vm(c: Cloud, name: str) -> tuple[int, list[bytes]]:
    data = [pattern(DISK, 40 + i) for i in range(3)]
    return c.vm(name, [c.image(f"{name}{i}", d) for i, d in enumerate(data)]), data


def exports(c: Cloud, capsys: pytest.CaptureFixture[str], backup_id: int) -> list[bytes]:
    out = []
    for disk_id in range(3):
        path = c.tmp / f"export-{backup_id}-{disk_id}.raw"
        r = c.run("export", str(backup_id), str(disk_id), "-o", str(path), capsys=capsys)
        assert r.code == 0, r.err
        out.append(path.read_bytes())
    return out


def test_next_disk_is_saved_while_one_is_read(
        cloud: Cloud, capsys: pytest.CaptureFixture[str]) -> None:
    vm, data = three_disk_vm(cloud, "p")
    cloud.sim.faults.slow_driver("saveas", SAVEAS, count=None)
    with watching(cloud) as seen:
        r = cloud.call("backup", str(vm), "--json")
    assert r.code == 0, r.err
    assert seen.samples > 0
    # disk N+1's save-as ran while disk N was attached (today's strict order never does)
    assert seen.overlaps > 0, seen
    assert exports(cloud, capsys, r.json()["backup_id"]) == data
    assert cloud.leftovers() == []


def test_max_attached_one_never_attaches_two_disks(
        cloud: Cloud, capsys: pytest.CaptureFixture[str],
        agent: Callable[..., AgentProcess]) -> None:
    vm, data = three_disk_vm(cloud, "q")
    cloud.sim.faults.slow_driver("saveas", SAVEAS, count=None)
    a = agent(reconcile=60, extra="max_attached = 1")
    with watching(cloud) as seen:
        cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
        found = wait_backups(cloud, vm, 1, timeout=60)
    assert seen.samples > 0
    assert seen.most_attached == 1, seen
    assert seen.overlaps > 0, seen   # still pipelined: the save-as needs no slot
    assert exports(cloud, capsys, found[0]["backup_id"]) == data
    assert cloud.leftovers() == []
    assert a.stop() == 0
