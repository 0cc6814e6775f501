"""Nothing a VM owner or a stranger sends takes the agent down, and nothing
that keeps failing makes it spin: the agent as a real process against onesim,
its control endpoint over raw sockets, its catalog on a real SQLite file."""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import zmq

from agent.control import sign
from tests import agentproc
from tests.agentkit import Cloud, MiB, pattern
from tests.agentproc import AgentProcess, backups, user_template, wait_backups
from tests.onesim.testing import wait_until

DISK = 1 * MiB
FORGED = 2**31 + 5
SECRET = b"s3cret-s3cret-s3cret-s3cret"


def clean_log(a: AgentProcess) -> None:
    """Every line the agent wrote is one JSON object: no traceback, no stray text."""
    assert [x for x in a.lines if x.get("event") == "unparsed"] == []


def signed(body: dict[str, Any], nonce: str) -> tuple[bytes, dict[str, str]]:
    data = json.dumps(body).encode()
    ts = str(int(time.time()))
    return data, {"X-Oneback-Timestamp": ts, "X-Oneback-Nonce": nonce,
                  "X-Oneback-Signature": sign(SECRET, ts, nonce, data),
                  "Content-Type": "application/json", "Content-Length": str(len(data))}


def raw_post(url: str, body: bytes, headers: dict[str, str], timeout: float = 5) -> bytes:
    """One request over a raw socket; the answer's first bytes (b"" if closed)."""
    u = urlsplit(url)
    s = socket.create_connection((u.hostname or "", u.port or 0), timeout=timeout)
    try:
        head = f"POST {u.path} HTTP/1.1\r\nHost: x\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(head.encode() + b"\r\n" + body)
        return s.recv(4096)
    finally:
        s.close()


def code_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


# -- 1. one VM, event, hook request or job: caught there --------------------------------


def test_an_owner_tag_that_breaks_parsing_does_not_stop_the_agent(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """A 5000-digit ONEBACK_KEEP made int() raise inside the full reconcile:
    the agent exited at every start, and no VM was backed up any more."""
    bad = cloud.vm("bad", [cloud.image("bad0", pattern(DISK, 40))])
    good = cloud.vm("good", [cloud.image("good0", pattern(DISK, 41))])
    cloud.one.vm.update(bad, 'ONEBACK="yes"\nONEBACK_KEEP="' + "9" * 5000 + '"', 1)
    cloud.one.vm.update(good, 'ONEBACK="yes"', 1)
    a = agent(reconcile=60)
    wait_backups(cloud, good, 1)
    status = wait_until(lambda: user_template(cloud, bad).get("ONEBACK_STATUS", ""), 10, 0.1)
    assert status.startswith("error: ONEBACK_KEEP") and len(status) < 300
    assert backups(cloud, bad) == []
    assert a.proc.poll() is None
    clean_log(a)


def test_a_forged_vm_id_from_the_bus_or_a_hook_is_logged_and_the_agent_goes_on(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """An id beyond oned's range made pyone raise OverflowError: from the
    event bus it ended the agent; from a hook request it put a traceback into
    the log."""
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    try:
        a = agent(events=f"tcp://127.0.0.1:{port}", reconcile=3600)
        a.wait_event("events.connected")
        vm = cloud.vm("after", [cloud.image("after0", pattern(DISK, 42))])
        for _ in range(20):   # a slow joiner may miss the first ones
            pub.send_multipart([f"EVENT VM {FORGED}/ACTIVE/RUNNING".encode(), b"PFZNLz4="])
            time.sleep(0.05)
        # events.py reads an id out of oned's range as "look at every VM": the
        # agent logs no failure for it, it just goes on (checked below)
        time.sleep(0.5)
        data, headers = signed({"vm_id": FORGED, "event": "test", "snapshot": "x"}, "f" * 32)
        answer = raw_post(a.control_url, data, headers)
        assert code_of(answer) == 400
        assert a.proc.poll() is None
        # still serving: an event for a real VM is acted on
        cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
        pub.send_multipart([f"EVENT VM {vm}/ACTIVE/RUNNING".encode(), b"PFZNLz4="])
        wait_backups(cloud, vm, 1)
        clean_log(a)
    finally:
        pub.close(0)


def test_an_unreadable_job_is_failed_and_the_worker_goes_on(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """A job row the agent cannot read killed the worker that claimed it,
    and the row stayed "running" forever: with one worker, nothing ran again."""
    from agent.catalog import Catalog

    catalog = cloud.tmp / "catalog.sqlite"
    Catalog.open(catalog).close()
    with sqlite3.connect(catalog) as db:
        db.execute("INSERT INTO jobs (vm_id, kind, params, state, reason, created, updated)"
                   " VALUES (77, 'backup', '{not json', 'queued', 'test', 0, 0)")
    vm = cloud.vm("w", [cloud.image("w0", pattern(DISK, 43))])
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    a = agent(reconcile=60, extra="max_jobs = 1")
    wait_backups(cloud, vm, 1)
    with sqlite3.connect(catalog) as db:
        state, error = db.execute("SELECT state, error FROM jobs WHERE vm_id = 77").fetchone()
    assert state == "failed" and "unreadable job" in error
    doc = cloud.call("status", "--json").json()
    assert any(j["vm_id"] == 77 and j["state"] == "failed" for j in doc["recent"])
    clean_log(a)


def test_a_ten_megabyte_user_template_value(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """libxml2 refuses a text node over 10 MB unless asked: such a VM made the
    agent exit at every start (fixed by agent/xmldoc.py's huge_tree). Nothing
    else on the agent's path may choke on it either: its status updates, its
    backup (the VM document is kept in the catalog), the log."""
    big = cloud.vm("big", [cloud.image("big0", pattern(DISK, 44))])
    other = cloud.vm("other", [cloud.image("other0", pattern(DISK, 45))])
    cloud.one.vm.update(big, 'ONEBACK="yes"\nNOTES="' + "x" * (10 * MiB + 10) + '"', 1)
    cloud.one.vm.update(other, 'ONEBACK="yes"', 1)
    a = agent(reconcile=60)
    wait_backups(cloud, other, 1, timeout=60)
    wait_backups(cloud, big, 1, timeout=60)
    wait_until(lambda: status_of(cloud, big) == "ok", 20, 0.2)
    assert a.proc.poll() is None
    assert max(len(json.dumps(x)) for x in a.lines) < 20000
    clean_log(a)


def status_of(cloud: Cloud, vm: int) -> str:
    """ONEBACK_STATUS read over plain XML-RPC: pyone's own parser refuses a
    document with a 10 MB text node."""
    import re
    import xmlrpc.client

    ok, doc, *_ = xmlrpc.client.ServerProxy(cloud.sim.endpoint).one.vm.info(
        cloud.sim.credentials, vm)
    assert ok, doc
    m = re.search(r"<ONEBACK_STATUS><!\[CDATA\[(.*?)\]\]></ONEBACK_STATUS>", doc)
    return m.group(1) if m else ""


# -- 2. the control endpoint, as a stranger reaches it ------------------------------------


def test_the_endpoint_refuses_bad_lengths_at_once_and_replays_after_a_restart(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """`Content-Length: -1` read until the client hung up, unauthenticated;
    `abc` put a traceback into the log; the nonces were forgotten at a restart."""
    a = agent(reconcile=3600)
    url = a.control_url
    for length, code in (("-1", 400), ("abc", 400), (str(10**12), 413)):
        started = time.monotonic()
        answer = raw_post(url, b"", {"Content-Length": length})   # the socket stays open
        assert code_of(answer) == code, (length, answer)
        assert time.monotonic() - started < 3
    vm = cloud.vm("n", [cloud.image("n0", pattern(DISK, 46))])
    data, headers = signed({"vm_id": vm, "event": "test"}, "r" * 32)
    assert code_of(raw_post(url, data, headers)) == 202
    assert a.stop() == 0
    clean_log(a)
    b = agent(reconcile=3600)
    assert code_of(raw_post(b.control_url, data, headers)) == 401
    assert b.wait_event("hook.refused")["why"] == "replayed request"
    clean_log(b)


def test_a_stranger_cannot_flood_the_log(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    a = agent(reconcile=3600)
    url = a.control_url
    for _ in range(200):
        assert code_of(raw_post(url, b"{}", {"Content-Length": "2"})) == 401
    time.sleep(1.1)
    raw_post(url, b"{}", {"Content-Length": "2"})
    def total() -> int:
        return len(a.events("hook.refused")) + sum(
            x["count"] for x in a.events("hook.refused_unlogged"))

    wait_until(lambda: total() == 201, 5, 0.1)     # every refusal counted ...
    seconds = {x["ts"][:19] for x in a.events("hook.refused")}
    logged = len(a.events("hook.refused"))
    assert logged <= 20 * (len(seconds) + 1) and logged < 201   # ... not every one logged
    clean_log(a)


# -- 3. fairness -----------------------------------------------------------------------


def test_min_interval_raises_an_owners_interval_and_says_so(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("often", [cloud.image("often0", pattern(DISK, 47))])
    cloud.one.vm.update(vm, 'ONEBACK="yes"\nONEBACK_INTERVAL="1s"', 1)
    agent(reconcile=0.3, extra="min_interval = 3")
    wait_backups(cloud, vm, 1)
    first = time.monotonic()
    status = wait_until(lambda: "minimum" in (s := user_template(cloud, vm).get(
        "ONEBACK_STATUS", "")) and s, 10, 0.1)
    assert "ONEBACK_INTERVAL=1s is below the minimum of 3s" in status
    wait_backups(cloud, vm, 2, timeout=20)
    assert time.monotonic() - first > 2
    found = backups(cloud, vm)
    assert found[1]["started"] - found[0]["started"] >= 3


def test_snapshot_sets_per_vm_are_capped(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("sets", [cloud.image("sets0", pattern(DISK, 48))])
    for name in ("one", "two"):
        r = cloud.call("snapshot", "create", str(vm), "--name", name)
        assert r.code == 0, r.err
    r = cloud.call("backup", str(vm))   # so that no backup's "ok" follows the refusal
    assert r.code == 0, r.err
    a = agent(reconcile=60, extra="max_snapshot_sets = 2")
    cloud.one.vm.update(vm, 'ONEBACK="yes"\nONEBACK_SNAPSHOT="three"', 1)
    refused = a.wait_event("snapshot.refused", where=lambda x: x.get("vm_id") == vm)
    assert refused["limit"] == 2 and refused["sets"] == 2
    wait_until(lambda: not user_template(cloud, vm).get("ONEBACK_SNAPSHOT"), 10, 0.1)
    status = wait_until(lambda: "refused" in (s := user_template(cloud, vm).get(
        "ONEBACK_STATUS", "")) and s, 20, 0.1)
    assert "snapshot set three refused" in status
    names = [s["name"] for s in cloud.call("snapshot", "list", str(vm), "--json").json()]
    assert names == ["one", "two"]


def test_the_queue_takes_turns_between_owners(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """Jobs ran oldest first: one owner's many VMs, queued first, went
    before another owner's one."""
    alice = int(cloud.one.user.allocate("alice", "pw-alice", ""))
    bob = int(cloud.one.user.allocate("bob", "pw-bob", ""))
    # bob's VM in the middle of alice's: last but three in either pool order
    many = [cloud.vm(f"a{i}", [cloud.image(f"a{i}d", pattern(DISK, 50 + i))])
            for i in range(3)]
    one = cloud.vm("b", [cloud.image("bd", pattern(DISK, 60))])
    many += [cloud.vm(f"a{i}", [cloud.image(f"a{i}d", pattern(DISK, 50 + i))])
             for i in range(3, 6)]
    for vm in many:
        cloud.one.vm.chown(vm, alice, -1)
    cloud.one.vm.chown(one, bob, -1)
    for vm in [*many, one]:
        cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    a = agent(reconcile=60, extra="max_jobs = 1")
    wait_backups(cloud, one, 1, timeout=60)
    order = [x["vm_id"] for x in a.events("job.started")]
    assert one in order[:2], order


def test_a_failed_job_cools_down_before_it_is_queued_again(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """A job that failed for good was queued again by the next event (its
    own status update) and failed again, in a loop."""
    vm = cloud.vm("cool", [cloud.image("cool0", pattern(DISK, 61))])
    cloud.sim.faults.fail_call("one.vm.disksnapshotcreate", "refused for the test",
                               count=None)
    a = agent(reconcile=0.3, extra="max_attempts = 1\nfailure_cooldown = 30")
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    a.wait_event("job.failed", where=lambda x: x.get("vm_id") == vm)
    time.sleep(3)
    assert len([x for x in a.events("job.started") if x["vm_id"] == vm]) == 1
    doc = cloud.call("status", "--json").json()
    failing = [f for f in doc["failing"] if f["vm_id"] == vm]
    assert failing and failing[0]["key"] == f"job:{vm}:backup"
    assert failing[0]["next_try"] > time.time() + 20


# -- 4. no tight retry loops (issue 10) ---------------------------------------------------


def failures(a: AgentProcess) -> list[dict[str, Any]]:
    return [x for x in a.lines if x.get("event") in ("reconcile.failed", "expire.failed")]


def test_a_failing_pool_read_backs_off_instead_of_spinning(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """The full reconcile requeued itself at once when it failed: four and
    more passes a second against oned, forever."""
    vm = cloud.vm("later", [cloud.image("later0", pattern(DISK, 62))])
    cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    cloud.sim.faults.fail_call("one.vmpool.infoextended", "oned is unwell", count=None)
    a = agent(reconcile=0.3)
    time.sleep(4)
    assert 2 <= len(failures(a)) <= 8, len(failures(a))   # before: ~20
    doc = cloud.call("status", "--json").json()
    assert [f["what"] for f in doc["failing"]] == ["reconcile of every VM"]
    assert "oned is unwell" in doc["failing"][0]["error"]
    text = cloud.call("status")
    assert "reconcile of every VM: failed" in text.out
    cloud.sim.faults.clear()
    wait_backups(cloud, vm, 1, timeout=30)
    wait_until(lambda: cloud.call("status", "--json").json()["failing"] == [], 10, 0.2)


def test_a_set_that_cannot_be_deleted_backs_off_alone(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """One expired set whose deletion oned refuses made every pass fail and
    start over at once; now it backs off alone, and the other VMs are served."""
    stuck = cloud.vm("stuck", [cloud.image("stuck0", pattern(DISK, 63))])
    r = cloud.call("snapshot", "create", str(stuck), "--name", "old", "--ttl", "1s")
    assert r.code == 0, r.err
    time.sleep(1.1)
    cloud.sim.faults.fail_call("one.vm.disksnapshotdelete", "cannot delete", count=None)
    a = agent(reconcile=0.3)
    time.sleep(4)
    tries = [x for x in failures(a) if x.get("vm_id") == stuck]
    assert 2 <= len(tries) <= 8, len(tries)   # before: ~20
    assert all(x["event"] == "expire.failed" for x in tries)
    other = cloud.vm("served", [cloud.image("served0", pattern(DISK, 64))])
    cloud.one.vm.update(other, 'ONEBACK="yes"', 1)
    wait_backups(cloud, other, 1)
    doc = cloud.call("status", "--json").json()
    assert [(f["vm_id"], f["key"]) for f in doc["failing"]] == [(stuck, f"expire:{stuck}:old")]
    assert doc["failing"][0]["failures"] >= 2


def test_one_vm_whose_reconcile_keeps_failing_backs_off_alone(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    """A VM whose catalog record cannot be read (here: its backup's warnings
    damaged) made every full reconcile raise: the agent exited at start."""
    broken = cloud.vm("broken", [cloud.image("broken0", pattern(DISK, 65))])
    r = cloud.call("backup", str(broken))
    assert r.code == 0, r.err
    with sqlite3.connect(cloud.tmp / "catalog.sqlite") as db:
        db.execute("UPDATE backups SET warnings = '{damaged' WHERE vm_id = ?", (broken,))
    fine = cloud.vm("fine", [cloud.image("fine0", pattern(DISK, 66))])
    for vm in (broken, fine):
        cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    a = agent(reconcile=0.3)
    wait_backups(cloud, fine, 1)
    time.sleep(3)
    tries = [x for x in a.events("reconcile.failed") if x.get("vm_id") == broken]
    assert 2 <= len(tries) <= 8, len(tries)    # backing off, not every 0.3s
    assert "internal error: JSONDecodeError" in tries[0]["error"]
    doc = cloud.call("status", "--json").json()
    assert [(f["key"], f["what"]) for f in doc["failing"]] == [(f"reconcile:{broken}",
                                                               "reconcile")]
    assert a.proc.poll() is None
    clean_log(a)


# -- 5. the agent and the CLI writing one catalog at once ----------------------------------


def test_cli_commands_write_while_the_agent_runs_jobs(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    by_agent = [cloud.vm(f"ag{i}", [cloud.image(f"ag{i}d", pattern(DISK, 70 + i))])
                for i in range(3)]
    by_cli = [cloud.vm(f"cl{i}", [cloud.image(f"cl{i}d", pattern(DISK, 80 + i))])
              for i in range(3)]
    a = agent(reconcile=0.5, extra="max_jobs = 3")
    for vm in by_agent:
        cloud.one.vm.update(vm, 'ONEBACK="yes"', 1)
    procs = [cloud.spawn("backup", str(vm)) for vm in by_cli]
    procs += [cloud.spawn("status") for _ in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    for vm in [*by_agent, *by_cli]:
        wait_backups(cloud, vm, 1, timeout=60)
    assert not [x for x in a.lines if "locked" in json.dumps(x)]
    clean_log(a)


# -- 6. supervised workers ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_is_replaced_and_its_job_requeued(
        cloud: Cloud, caplog: pytest.LogCaptureFixture) -> None:
    """The agent in this process, with a clock that kills the first worker
    thread that asks it the time (a SystemExit: no `except Exception` stops
    it). Before, the job stayed "running" forever and the worker was gone."""
    import threading

    from agent import config as config_mod
    from agent.catalog import Catalog
    from agent.cloud import Cloud as OneCloud
    from agent.daemon import Agent
    from agent.lease import Lease
    from agent.store.local import LocalStore

    agentproc.agent_config(cloud, reconcile=0.5, extra="failure_cooldown = 0.5")
    vm = cloud.vm("sup", [cloud.image("sup0", pattern(DISK, 90))])
    cloud.one.vm.update(vm, 'ONEBACK="yes"\nONEBACK_SNAPSHOT="pre"', 1)
    cfg = config_mod.load(cloud.config)
    killed = threading.Event()

    def clock() -> float:
        if threading.current_thread().name.startswith("oneback-worker") and not killed.is_set():
            killed.set()
            raise SystemExit("a worker dies")
        return time.time()

    one = OneCloud(cfg.opennebula.endpoint, cfg.opennebula.read_credentials(),
                   timeout=cfg.opennebula.timeout,
                   operation_timeout=cfg.opennebula.operation_timeout,
                   poll_interval=cfg.opennebula.poll_interval)
    catalog = Catalog.open(cfg.storage.catalog)
    lease = Lease.acquire(cfg.storage.catalog)
    stop = threading.Event()
    agent_ = Agent(cfg, one, catalog, LocalStore.open(cfg.storage.repository),
                   lease, secret=cfg.agent.read_secret(), clock=clock)
    runner = threading.Thread(target=agent_.run, args=(stop,), daemon=True)
    caplog.set_level("INFO", logger="oneback")
    runner.start()
    try:
        def sets() -> list[str]:
            return [s["name"] for s in cloud.call("snapshot", "list", str(vm), "--json").json()]

        assert wait_until(sets, 30, 0.2) == ["pre"]
        assert killed.is_set()
        replaced = [r for r in caplog.records if r.getMessage() == "worker.replaced"]
        assert replaced and replaced[0].__dict__["fields"]["vm_id"] == vm
        assert [j.state for j in catalog.jobs(("running",))] == []
    finally:
        stop.set()
        runner.join(30)
        lease.release()
        catalog.close()
