"""The agent's Prometheus metrics (agent.metrics_listen), scraped over HTTP
from the real agent process and parsed with prometheus_client's own parser."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from tests.agentkit import Cloud, MiB, pattern
from tests.agentproc import AgentProcess, agent_config, wait_backups
from tests.onesim.testing import wait_until

DISK = 1 * MiB
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def test_a_backup_through_the_agent_shows_in_its_metrics(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    vm = cloud.vm("m", [cloud.image("m0", pattern(DISK, 41)),
                        cloud.image("m1", pattern(2 * DISK, 45))])
    bad = cloud.vm("f", [cloud.image("f0", pattern(DISK, 42))])
    a = agent(reconcile=60, extra='metrics_listen = "127.0.0.1:0"\nmin_interval = 60')
    url = a.wait_event("metrics.listening")["address"]
    before = scrape(url)
    assert value(before, "oneback_catalog_readable") == 1
    assert value(before, "oneback_backups_stored") == 0
    assert value(before, "oneback_backups_total", vm=str(vm)) is None

    cloud.one.vm.update(vm, 'ONEBACK="yes"\nONEBACK_INTERVAL="2h"', 1)
    wait_backups(cloud, vm, 1)
    m = wait_until(lambda: (s := scrape(url)) and value(s, "oneback_backups_total", vm=str(vm))
                   and s, 10, 0.1)
    assert value(m, "oneback_backups_total", vm=str(vm)) == 1
    assert value(m, "oneback_backup_read_bytes_total", vm=str(vm)) == 3 * DISK  # both disks
    assert value(m, "oneback_backup_changed_bytes_total", vm=str(vm)) == 3 * DISK
    assert 0 < (value(m, "oneback_backup_stored_bytes_total", vm=str(vm)) or 0) <= 4 * DISK
    last = value(m, "oneback_last_success_timestamp_seconds", vm=str(vm))
    assert last is not None and abs(last - time.time()) < 30
    assert value(m, "oneback_vm_backup_interval_seconds", vm=str(vm)) == 7200
    assert value(m, "oneback_vm_backup_interval_seconds", vm=str(bad)) is None   # not opted in
    assert value(m, "oneback_backups_stored") == 1
    assert (value(m, "oneback_repository_stored_bytes") or 0) > 0
    assert value(m, "oneback_job_queue_depth") == 0
    assert value(m, "oneback_job_queue_oldest_age_seconds") == 0
    assert value(m, "oneback_backup_duration_seconds_count") == 1
    for phase in ("snapshot", "save-as", "attach", "read", "cleanup"):   # per disk
        assert value(m, "oneback_backup_phase_duration_seconds_count", phase=phase) == 2, phase
    assert value(m, "oneback_backup_phase_duration_seconds_count", phase="commit") == 1
    assert value(m, "oneback_backup_failures_total", vm=str(vm)) is None

    # A backup that fails (the save-as driver fails) is counted against its VM.
    cloud.sim.faults.fail_driver("saveas", count=1, vm_id=bad)
    cloud.one.vm.update(bad, 'ONEBACK="yes"', 1)
    m = wait_until(lambda: (s := scrape(url)) and value(
        s, "oneback_backup_failures_total", vm=str(bad)) and s, 20, 0.1)
    assert value(m, "oneback_backup_failures_total", vm=str(bad)) == 1
    assert value(m, "oneback_backups_total", vm=str(bad)) is None
    assert value(m, "oneback_vm_backup_interval_seconds", vm=str(bad)) == 86400
    assert value(m, "oneback_last_success_timestamp_seconds", vm=str(bad)) is None

    # A verify that finds damage shows at the next scrape (read from the catalog).
    assert value(m, "oneback_verify_damage_found", check="command") is None
    chunk = next(p for p in (cloud.tmp / "repo" / "chunks").rglob("*") if p.is_file())
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.chmod(0o644)
    chunk.write_bytes(bytes(data))
    assert cloud.call("verify", "--read-data").code == 9
    m = scrape(url)
    assert value(m, "oneback_verify_damage_found", check="command") == 1
    assert (value(m, "oneback_verify_checked_chunks", check="command") or 0) >= 1
    assert abs((value(m, "oneback_verify_last_run_timestamp_seconds", check="command") or 0)
               - time.time()) < 30
    assert a.stop() == 0


def test_a_scrape_during_a_backup_sees_the_queue_at_once(
        cloud: Cloud, agent: Callable[..., AgentProcess]) -> None:
    first = cloud.vm("q1", [cloud.image("q10", pattern(DISK, 43))])
    second = cloud.vm("q2", [cloud.image("q20", pattern(DISK, 44))])
    cloud.sim.faults.slow_driver("saveas", 4.0, count=1)
    a = agent(reconcile=60, extra='metrics_listen = "127.0.0.1:0"\nmax_jobs = 1')
    url = a.wait_event("metrics.listening")["address"]
    cloud.one.vm.update(first, 'ONEBACK="yes"', 1)
    a.wait_event("job.started")
    cloud.one.vm.update(second, 'ONEBACK="yes"', 1)
    a.wait_event("job.queued", where=lambda x: x.get("vm_id") == second)
    time.sleep(0.3)
    t0 = time.monotonic()
    m = scrape(url)
    assert time.monotonic() - t0 < 2, "the scrape waited for the backup"
    assert value(m, "oneback_jobs_running") == 1
    assert value(m, "oneback_job_queue_depth") == 1
    assert 0.2 <= (value(m, "oneback_job_queue_oldest_age_seconds") or 0) < 30
    assert value(m, "oneback_backups_stored") == 0
    held = [k[1] for k in m if k[0] == "oneback_vm_lease_held"]
    assert held == [(("vm", str(first)),)]
    wait_backups(cloud, second, 1, timeout=60)
    m = scrape(url)
    assert value(m, "oneback_backups_stored") == 2
    assert value(m, "oneback_job_queue_depth") == 0
    assert a.stop() == 0


def test_metrics_listen_invalid_is_one_line_and_exit_3(cloud: Cloud) -> None:
    original = cloud.config.read_text()
    for bad in ('"9464"', '"localhost:http"', '"127.0.0.1:70000"', "9464"):
        cloud.config.write_text(original)
        agent_config(cloud, extra=f"metrics_listen = {bad}")
        r = cloud.call("agent", timeout=30)
        assert r.code == 3, (bad, r.err)
        line = r.err.strip()
        assert "\n" not in line and "agent.metrics_listen must be HOST:PORT" in line, line


def test_metrics_port_in_use_stops_the_agent_with_one_clear_line(cloud: Cloud) -> None:
    """Decided: an agent told to serve metrics where it cannot does not start
    (exit 3, one line): an operator who asked for metrics would otherwise
    watch an agent that is silently unobserved."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        port = holder.getsockname()[1]
        agent_config(cloud, extra=f'metrics_listen = "127.0.0.1:{port}"')
        r = cloud.call("agent", timeout=30)
    finally:
        holder.close()
    assert r.code == 3, r.err
    last = r.err.strip().splitlines()[-1]
    assert last.startswith("oneback: agent.metrics_listen 127.0.0.1:") and "in use" in last, last
    assert "Traceback" not in r.err
    assert cloud.leftovers() == []
