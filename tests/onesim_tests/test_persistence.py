"""State survives a restart on the same ROOT; the command line server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyone

from tests.onesim import Simulator
from tests.onesim.testing import (
    Subscription,
    client,
    create_datablock,
    create_image,
    create_vm,
    guest_disk_path,
    wait_image,
    wait_vm,
)

REPO = Path(__file__).resolve().parents[2]


def test_restart_keeps_everything(tmp_path: Path) -> None:
    sim = Simulator.start(tmp_path / "root", delay=0.01)
    try:
        one = client(sim)
        iid = create_image(one, sim, "img", b"keep me" * 100)
        vid = create_vm(one, sim, "vm", [iid])
        sid = one.vm.disksnapshotcreate(vid, 0, "s")
        wait_vm(one, vid, "ACTIVE", "RUNNING")
        one.user.allocate("dave", "pw", "core", [])
        endpoint, events, credentials = sim.endpoint, sim.events, sim.credentials
        before = one.vm.info(vid)
        sim.restart()
        assert (sim.endpoint, sim.events, sim.credentials) == (endpoint, events, credentials)
        one = client(sim)
        after = one.vm.info(vid)
        assert (after.STATE, after.LCM_STATE, after.NAME) == (3, 3, "vm")
        assert after.SNAPSHOTS[0].SNAPSHOT[0].ID == sid
        assert len(after.HISTORY_RECORDS.HISTORY) == len(before.HISTORY_RECORDS.HISTORY)
        assert one.image.info(iid).RUNNING_VMS == 1
        assert client(sim, "dave", "pw").user.info(-1).NAME == "dave"
        assert create_datablock(one, "next", 1) == iid + 1  # ids continue
        assert guest_disk_path(sim, vid, 0).read_bytes() == b"keep me" * 100
    finally:
        sim.stop()


def test_a_driver_operation_in_flight_completes_after_restart(tmp_path: Path) -> None:
    sim = Simulator.start(tmp_path / "root", delay=0.01)
    try:
        one = client(sim)
        vid = create_vm(one, sim, "vm", [create_datablock(one, "d", 1)])
        sim.faults.slow_driver("snapshot_create", 1.5)
        one.vm.disksnapshotcreate(vid, 0, "in-flight")
        assert one.vm.info(vid).LCM_STATE == 57
        sim.stop()
        sim = Simulator.start(tmp_path / "root", delay=0.01)
        one = client(sim)
        assert one.vm.info(vid).LCM_STATE == 57
        vm = wait_vm(one, vid, "ACTIVE", "RUNNING")
        assert vm.SNAPSHOTS[0].SNAPSHOT[0].ACTIVE == "YES"
    finally:
        sim.stop()


def test_a_pending_vm_is_deployed_after_restart(tmp_path: Path) -> None:
    sim = Simulator.start(tmp_path / "root", delay=0.01, sched_delay=60)
    one = client(sim)
    vid = create_vm(one, sim, "vm", [{"TYPE": "fs", "SIZE": 1}], wait_running=False)
    assert one.vm.info(vid).STATE == 1
    sim.stop()
    sim = Simulator.start(tmp_path / "root", delay=0.01)
    try:
        wait_vm(client(sim), vid, "ACTIVE", "RUNNING")
    finally:
        sim.stop()


def test_image_registration_in_flight_survives(tmp_path: Path) -> None:
    sim = Simulator.start(tmp_path / "root", delay=0.01)
    one = client(sim)
    sim.faults.slow_driver("image", 0.5)
    iid = create_datablock(one, "d", 2, wait=False)
    sim.stop()
    sim = Simulator.start(tmp_path / "root", delay=0.01)
    try:
        img = wait_image(client(sim), iid, "READY")
        assert Path(img.SOURCE).stat().st_size == 2 * 1024 * 1024
    finally:
        sim.stop()


def serve(root: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.onesim", "serve", "--root", str(root),
                             "--delay", "0.01", *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, json.loads(line)


def test_command_line_server(tmp_path: Path) -> None:
    root = tmp_path / "cli"
    proc, info = serve(root, "--version", "6.8.0")
    try:
        assert set(info) == {"endpoint", "events", "credentials", "root"}
        assert info["endpoint"].startswith("http://127.0.0.1:") and info["endpoint"].endswith(
            "/RPC2")
        assert info["events"].startswith("tcp://127.0.0.1:") and info["root"] == str(root)
        assert info["credentials"].startswith("oneadmin:")
        one = pyone.OneServer(info["endpoint"], session=info["credentials"])
        assert one.system.version() == "6.8.0"
        sub = Subscription(info["events"])
        try:
            one.template.allocate('NAME="cli"\nCPU="1"\nMEMORY="8"')
            # system.version's own event may still be on its way (one_hm.rb
            # publishes from a thread of its own): skip to the allocate's
            keys = []
            while (msg := sub.next(timeout=3)) is not None and len(keys) < 3:
                keys.append(msg[0])
                if msg[0] == "EVENT API one.template.allocate 1":
                    break
            assert keys[-1:] == ["EVENT API one.template.allocate 1"], keys
        finally:
            sub.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    assert proc.stdout is not None and proc.stdout.read() == ""  # exactly one line
    proc, again = serve(root)
    try:
        one = pyone.OneServer(again["endpoint"], session=again["credentials"])
        assert again["credentials"] == info["credentials"]
        assert one.templatepool.info(-2, -1, -1).VMTEMPLATE[0].NAME == "cli"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
