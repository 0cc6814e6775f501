"""The agent's Prometheus metrics: the only module that imports prometheus_client.

Owns: a private registry served over HTTP on `agent.metrics_listen`; the
counters and histograms the agent feeds as it works (through the
`progress.Observer` it implements: backups and failures by VM, bytes read,
changed and stored, durations per phase); and the gauges read at scrape
time from the catalog, so they survive a restart and never drift from it
(the job queue, the last success per VM, the repository's size, the
continuous verify), plus the VMs' configured intervals and the VM leases
this agent holds. Every name starts with `oneback_` and carries its unit.
Must not: decide anything, talk to the cloud, or raise into the agent (a
scrape that cannot read the catalog reports `oneback_catalog_readable 0`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.errors import ConfigError
from agent.model import BackupRecord, VerifyProgress
from agent.progress import Progress

# Phases a backup reports (agent.backup) -> the phase the metrics time.
# "detach" covers the cleanup: detach, delete the image and the snapshot;
# "ready" (the device found) ends the attach; "commit" is timed from the
# last disk's "done" to the commit (flush, manifest, catalog).
PHASES = {"snapshot": "snapshot", "save-as": "save-as", "attach": "attach", "read": "read",
          "detach": "cleanup"}
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600)


class MetricsCatalog(Protocol):
    """What the scrape reads from the catalog."""

    def job_queue_stats(self) -> tuple[int, int, float | None]: ...
    def last_successes(self) -> dict[int, float]: ...
    def stored_totals(self) -> tuple[int, int]: ...
    def backup_count(self) -> int: ...
    def verify_progress(self, key: str) -> VerifyProgress | None: ...


class _Phases:
    """One backup's phases, timed per disk (a Progress). Snapshots are taken
    one after another: a snapshot ends at the next phase of any disk."""

    def __init__(self, histogram: Histogram, clock: Callable[[], float]) -> None:
        self._histogram, self._clock = histogram, clock
        self._open: dict[int, tuple[str, float]] = {}
        self._last_done: float | None = None
        self._lock = threading.Lock()

    def phase(self, disk_id: int, phase: str) -> None:
        now = self._clock()
        with self._lock:
            for other, (name, since) in list(self._open.items()):
                if other == disk_id or name == "snapshot":
                    self._histogram.labels(name).observe(max(0.0, now - since))
                    del self._open[other]
            if phase in PHASES:
                self._open[disk_id] = (PHASES[phase], now)
            elif phase == "done":
                self._last_done = now

    def disk_size(self, disk_id: int, size: int) -> None:
        pass

    def advanced(self, nbytes: int) -> None:
        pass

    def committed(self) -> None:
        with self._lock:
            if self._last_done is not None:
                self._histogram.labels("commit").observe(
                    max(0.0, self._clock() - self._last_done))


class Metrics:
    """The agent's metrics, an `Observer`; `serve` makes one and serves it."""

    def __init__(self, catalog: MetricsCatalog, *,
                 leases: Callable[[], Iterable[int]] = lambda: (),
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._intervals: dict[int, int] = {}
        self._watching: dict[int, _Phases] = {}
        r = self.registry
        self.backups = Counter("oneback_backups", "Backups committed, by VM", ["vm"],
                               registry=r)
        self.failures = Counter("oneback_backup_failures",
                                "Backup jobs that failed (each attempt), by VM", ["vm"],
                                registry=r)
        self.read = Counter("oneback_backup_read_bytes",
                            "Bytes read from VM disks by committed backups", ["vm"], registry=r)
        self.changed = Counter("oneback_backup_changed_bytes",
                               "Bytes found changed since the previous backup", ["vm"],
                               registry=r)
        self.stored = Counter("oneback_backup_stored_bytes",
                              "Bytes written to the repository (after dedup and compression)",
                              ["vm"], registry=r)
        self.duration = Histogram("oneback_backup_duration_seconds",
                                  "Wall time of committed backups", buckets=DURATION_BUCKETS,
                                  registry=r)
        self.phases = Histogram(
            "oneback_backup_phase_duration_seconds",
            "Time per disk in each backup phase (snapshot, save-as, attach, read, cleanup;"
            " commit per backup)", ["phase"], buckets=DURATION_BUCKETS, registry=r)
        r.register(_FromCatalog(catalog, self._intervals_now, leases, clock))

    # -- the Observer -----------------------------------------------------------

    def backup(self, vm_id: int) -> Progress:
        phases = _Phases(self.phases, time.monotonic)
        with self._lock:
            self._watching[vm_id] = phases
        return phases

    def backup_done(self, vm_id: int, record: BackupRecord) -> None:
        with self._lock:
            phases = self._watching.pop(vm_id, None)
        if phases is not None:
            phases.committed()
        vm = str(vm_id)
        self.backups.labels(vm).inc()
        self.read.labels(vm).inc(sum(d.bytes_read for d in record.disks))
        self.changed.labels(vm).inc(sum(d.bytes_changed for d in record.disks))
        self.stored.labels(vm).inc(sum(d.bytes_stored for d in record.disks))
        self.duration.observe(max(0.0, record.finished - record.started))

    def job_failed(self, vm_id: int, kind: str) -> None:
        with self._lock:
            self._watching.pop(vm_id, None)
        if kind == "backup":
            self.failures.labels(str(vm_id)).inc()

    def policy(self, vm_id: int, interval: int | None) -> None:
        with self._lock:
            if interval is None:
                self._intervals.pop(vm_id, None)
            else:
                self._intervals[vm_id] = interval

    def seen(self, vm_ids: Collection[int]) -> None:
        with self._lock:
            for vm_id in set(self._intervals) - set(vm_ids):
                del self._intervals[vm_id]

    def _intervals_now(self) -> dict[int, int]:
        with self._lock:
            return dict(self._intervals)


class _FromCatalog(Collector):
    """The gauges read at scrape time."""

    def __init__(self, catalog: MetricsCatalog, intervals: Callable[[], dict[int, int]],
                 leases: Callable[[], Iterable[int]], clock: Callable[[], float]) -> None:
        self._catalog, self._intervals, self._leases, self._clock = (
            catalog, intervals, leases, clock)

    def describe(self) -> Iterable[Metric]:
        return []   # computed at each scrape: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        interval = GaugeMetricFamily(
            "oneback_vm_backup_interval_seconds",
            "The interval an opted-in VM asks for (ONEBACK_INTERVAL, at least"
            " agent.min_interval)", labels=["vm"])
        for vm_id, seconds in sorted(self._intervals().items()):
            interval.add_metric([str(vm_id)], seconds)
        yield interval
        held = GaugeMetricFamily("oneback_vm_lease_held",
                                 "1 for each VM whose lease this agent holds", labels=["vm"])
        try:
            for vm_id in sorted(set(self._leases())):
                held.add_metric([str(vm_id)], 1)
        except Exception:   # the lease source is broken: no leases shown, the rest is
            pass
        yield held
        try:
            found = list(self._from_catalog())
        except Exception:   # busy or broken: say so, never fail the scrape
            found = []
        yield GaugeMetricFamily("oneback_catalog_readable",
                                "1 if this scrape could read the catalog", value=1 if found else 0)
        yield from found

    def _from_catalog(self) -> Iterator[Metric]:
        c, now = self._catalog, self._clock()
        queued, running, oldest = c.job_queue_stats()
        last = c.last_successes()
        chunks, stored = c.stored_totals()
        backups = c.backup_count()
        checks = [p for p in (c.verify_progress("background"), c.verify_progress("command"))
                  if p is not None]
        yield GaugeMetricFamily("oneback_job_queue_depth", "Jobs queued (due or waiting"
                                " for a retry)", value=queued)
        yield GaugeMetricFamily("oneback_jobs_running", "Jobs running", value=running)
        yield GaugeMetricFamily("oneback_job_queue_oldest_age_seconds",
                                "Age of the oldest queued job (0: none queued)",
                                value=0 if oldest is None else max(0.0, now - oldest))
        success = GaugeMetricFamily("oneback_last_success_timestamp_seconds",
                                    "When the newest backup of each VM finished (Unix time)",
                                    labels=["vm"])
        for vm_id, when in sorted(last.items()):
            success.add_metric([str(vm_id)], when)
        yield success
        yield GaugeMetricFamily("oneback_repository_stored_bytes",
                                "Bytes the repository stores for the catalog's backups",
                                value=stored)
        yield GaugeMetricFamily("oneback_repository_chunks",
                                "Chunks the catalog's backups reference", value=chunks)
        yield GaugeMetricFamily("oneback_backups_stored", "Backups in the catalog",
                                value=backups)
        checked = GaugeMetricFamily(
            "oneback_verify_checked_chunks", "Chunks read back by the current pass"
            " (background) or the last run (command)", labels=["check"])
        damage = GaugeMetricFamily("oneback_verify_damage_found",
                                   "Damage found by the current pass or the last run",
                                   labels=["check"])
        last_run = GaugeMetricFamily("oneback_verify_last_run_timestamp_seconds",
                                     "When the verify last ran (Unix time)", labels=["check"])
        passed = GaugeMetricFamily("oneback_verify_last_pass_timestamp_seconds",
                                   "When the continuous verify last completed a pass",
                                   labels=["check"])
        for p in checks:
            checked.add_metric([p.key], p.pass_checked if p.key == "background" else p.checked)
            damage.add_metric([p.key], len(p.damage))
            last_run.add_metric([p.key], p.last_run)
            if p.last_pass_finished is not None:
                passed.add_metric([p.key], p.last_pass_finished)
        yield from (checked, damage, last_run, passed)


class Served:
    """Metrics served over HTTP until `close()`."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.metrics = metrics
        try:
            self._server, self._thread = start_http_server(port, host, metrics.registry)
        except OSError as e:
            raise ConfigError(
                f"agent.metrics_listen {host}:{port}: cannot listen ({e.strerror or e}); stop"
                " what holds the port or choose another one") from None
        bound = self._server.server_address
        self.address = f"http://{host}:{bound[1]}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve(catalog: MetricsCatalog, host: str, port: int, *,
          leases: Callable[[], Iterable[int]] = lambda: ()) -> Served:
    """Serve the agent's metrics on host:port (port 0: a free one; see
    `Served.address`). ConfigError when it cannot listen there."""
    return Served(Metrics(catalog, leases=leases), host, port)
