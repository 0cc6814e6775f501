"""The agent: the long-running service on the proxy VM.

Owns: the loop that turns wake-ups (ZeroMQ events, authenticated hook
requests, (re)connects, the reconcile timer) into a fresh look at the VMs
concerned; queueing what policy says is due into the durable job queue;
the workers that run jobs (one per VM at a time, a global limit, a limit on
disks attached to the proxy) with retries and backoff for transient errors;
reporting back on each VM (ONEBACK_STATUS, ONEBACK_LAST_BACKUP); the start-up
recovery (requeue jobs of a dead run, sweep its cloud leftovers); and a
graceful shutdown (running jobs get `shutdown_grace` seconds to finish, then
are cancelled, undone and requeued). Level-triggered: an event never carries
a decision, every decision is taken from `one.vm.info` and the catalog.

Many tenants, one agent: whatever goes wrong while handling one VM, event,
hook request or job is caught there, logged as one line naming the VM, and
the agent goes on. What keeps failing (one VM's reconcile, one expired set,
one VM's jobs) backs off on its own, exponentially up to `max_backoff`, and
is listed by `oneback status`; the rest is not held up. Workers are
supervised: one that dies is replaced and its job requeued. Fairness: an
owner's interval is never below `min_interval`, a VM has at most
`max_snapshot_sets` sets taken on request, the queue takes turns between
owners, and a failed job cools down before the same work is queued again.
Must not: print (it logs one structured line per event), or talk to pyone,
zmq or SQL directly.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent import events as events_mod
from agent import placement, vmlease
from agent.attach import Workspace, sweep
from agent.backup import BackupOptions, Settings, backup_vm, exclusive
from agent.catalog import Catalog
from agent.cloud import Cloud
from agent.config import Config
from agent.control import ControlServer, Verifier
from agent.copier import start_copier
from agent.errors import (
    CloudError,
    DeviceError,
    Interrupted,
    LeaseBusy,
    LeaseLost,
    NotFound,
    OnebackError,
    UsageError,
)
from agent.lease import Lease, is_alive
from agent.model import VM_DONE, Backoff, DatastoreInfo, Job, VmInfo, is_one_id
from agent.policy import due_work, vm_policy
from agent.progress import NoObserver, Observer
from agent.snapshots import create_set, delete_set, sets_of
from agent.store import Repository
from agent.subscriber import Subscriber

if TYPE_CHECKING:
    from agent.metrics import Served

log = logging.getLogger("oneback.agent")
STATUS = "ONEBACK_STATUS"
LAST_BACKUP = "ONEBACK_LAST_BACKUP"


MAX_FIELD = 2000   # a log field quoting an owner's 10 MB tag stays one short line
REFUSED_PER_SECOND = 20


def _short(value: object) -> object:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + f"... ({len(value)} chars)"
    return value


def event(name: str, /, **fields: object) -> None:
    """One structured log line (the CLI's formatter renders it as JSON)."""
    log.info(name, extra={"fields": {k: _short(v) for k, v in fields.items()}})


def _error(e: BaseException) -> str:
    """An exception as one line: ours carry their message, others are bugs."""
    if isinstance(e, OnebackError):
        return e.message
    return f"internal error: {type(e).__name__}: {e}"


@dataclass
class _Wakeups:
    """VMs to look at again (None: all of them), collapsed."""

    vms: set[int] = field(default_factory=set)
    everything: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, trigger: events_mod.Trigger) -> None:
        with self.cond:
            if trigger.vm_id is None:
                self.everything = True
            else:
                self.vms.add(trigger.vm_id)
            self.cond.notify_all()

    def take(self) -> tuple[set[int], bool]:
        with self.cond:
            vms, everything = self.vms, self.everything
            self.vms, self.everything = set(), False
            return vms, everything


class Agent:
    def __init__(self, cfg: Config, cloud: Cloud, catalog: Catalog, store: Repository,
                 lease: Lease, *, secret: bytes | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg, self.cloud, self.catalog, self.store, self.lease = (
            cfg, cloud, catalog, store, lease)
        self.secret = secret
        self.clock = clock
        self.wakeups = _Wakeups()
        self.stopping = threading.Event()   # no new jobs
        self.cancel = threading.Event()     # running jobs: stop now
        self.attach_slots = threading.Semaphore(cfg.agent.max_attached)
        self.control: ControlServer | None = None
        self.observer: Observer = NoObserver()   # the metrics, when agent.metrics_listen
        self._work = threading.Condition()
        self._running: dict[int, Job] = {}
        self._current: dict[str, Job] = {}      # worker thread name -> its job
        self._hook_snapshots: deque[events_mod.Trigger] = deque(maxlen=1000)
        self._failing: dict[str, Backoff] = {}  # the catalog's backoff, read once per pass
        self._pool_wanted = False               # a look at every VM is owed
        self._pool_retry = 0.0                  # monotonic: not before (the pool read failed)
        self._pool_failures = 0
        self._refused_lock = threading.Lock()
        self._refused_second, self._refused_count, self._refused_dropped = 0, 0, 0
        # several agents, one repository: where this proxy reaches, what it cannot serve
        self._placement: tuple[frozenset[int], dict[int, DatastoreInfo]] | None = None
        self._unserved: dict[int, str] = {}
        self.leases = self.store if isinstance(self.store, vmlease.LeaseStore) else None
        self._leased: set[int] = set()   # VMs whose lease this agent holds now
        self._leased_lock = threading.Lock()

    # -- the main loop ------------------------------------------------------------

    def run(self, should_exit: threading.Event) -> None:
        """Serve until `should_exit` is set; then shut down gracefully."""
        metrics = self._start_metrics()
        try:
            self._run(should_exit)
        finally:
            if metrics is not None:
                metrics.close()

    def _start_metrics(self) -> Served | None:
        """Serve the metrics (`agent.metrics_listen`); ConfigError, before
        anything else starts, when the address cannot be listened on."""
        if self.cfg.agent.metrics_listen is None:
            return None
        from agent import metrics
        host, port = self.cfg.agent.metrics_listen
        served = metrics.serve(self.catalog, host, port, leases=self._held)
        self.observer = served.metrics
        event("metrics.listening", address=served.address)
        return served

    def _held(self) -> list[int]:
        """The VMs whose lease in the repository this agent holds now (with
        a repository that keeps no leases: the VMs it is backing up)."""
        if self.leases is None:
            return sorted({job.vm_id for job in list(self._running.values())
                           if job.kind == "backup"})
        with self._leased_lock:
            return sorted(self._leased)

    def _run(self, should_exit: threading.Event) -> None:
        self.startup()
        sub = Subscriber(self.cfg.opennebula.events, events_mod.TOPICS)
        if self.secret is not None:
            self.control = ControlServer(
                self.cfg.agent.listen_host, self.cfg.agent.listen_port,
                Verifier(self.secret, remember=self._remember_nonce),
                accepted=self._hook_request, refused=self._hook_refused,
                max_connections=self.cfg.agent.max_connections,
                timeout=self.cfg.agent.connection_timeout)
            event("control.listening", address=self.control.address)
        workers = [self._start_worker(i) for i in range(self.cfg.agent.max_jobs)]
        verify_stop = threading.Event()
        verifier = self._start_verifier(verify_stop)
        copier = start_copier(self.cfg, self.store, self.catalog, verify_stop)  # [copy]
        self.wakeups.add(events_mod.everything("start"))
        next_reconcile = time.monotonic() + self.cfg.agent.reconcile_interval
        next_sync = time.monotonic()
        try:
            while not should_exit.is_set():
                batch = sub.poll(0.2)
                if batch.connected:
                    event("events.connected", endpoint=self.cfg.opennebula.events)
                    self.wakeups.add(events_mod.everything("events (re)connected"))
                if batch.disconnected:
                    event("events.disconnected", endpoint=self.cfg.opennebula.events)
                for topic, body in batch.messages:
                    self._event(topic, body)
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + self.cfg.agent.reconcile_interval
                    self.wakeups.add(events_mod.everything("reconcile timer"))
                self._supervise(workers)
                if time.monotonic() >= next_sync:
                    next_sync = time.monotonic() + self.cfg.agent.sync_interval
                    self._sync()
                try:
                    self._reconcile_pending()
                except Exception as e:  # a bug outside any one VM: log it, go on
                    event("reconcile.crashed", error=_error(e))
        finally:
            sub.close()
            if self.control is not None:
                self.control.close()
            self.shutdown(workers)
            verify_stop.set()   # a step in progress stops between two chunks
            for t in (verifier, copier):
                if t is not None:
                    t.join(self.cfg.agent.shutdown_grace)

    def _event(self, topic: bytes, body: bytes) -> None:
        try:
            trigger = events_mod.parse_message(topic, body)
        except Exception as e:  # one unreadable event is dropped, not the agent
            event("event.failed", topic=topic[:200].decode("ascii", "replace"),
                  error=_error(e))
            return
        if trigger is not None:
            self.wakeups.add(trigger)

    def startup(self) -> None:
        """Requeue the jobs of a run that died, and remove its cloud leftovers."""
        recovered = self.catalog.jobs_recover(
            lambda owner: is_alive(self.cfg.storage.catalog, owner))
        self._unserved = {n.vm_id: n.reason for n in self.catalog.not_served()}
        try:
            report = sweep(self.cloud, self.catalog, self.cfg.storage.catalog,
                           self.cfg.proxy.vm_id)
        except Exception as e:  # the next sweep (around every job) tries again
            event("agent.started", owner=self.lease.owner, recovered_jobs=recovered,
                  sweep_error=_error(e))
            return
        event("agent.started", owner=self.lease.owner, recovered_jobs=recovered,
              swept=list(report.removed), sweep_failed=list(report.failed),
              sweep_kept=list(report.kept), catalog=self.catalog.catalog_id,
              vm_leases=self.leases is not None)

    def shutdown(self, workers: list[threading.Thread]) -> None:
        self.stopping.set()
        with self._work:
            self._work.notify_all()
        deadline = time.monotonic() + self.cfg.agent.shutdown_grace
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        if any(w.is_alive() for w in workers):
            event("agent.cancelling", running=sorted(self._running))
            self.cancel.set()
            for w in workers:
                w.join(self.cfg.opennebula.operation_timeout)
        event("agent.stopped")

    # -- deciding -----------------------------------------------------------

    def _remember_nonce(self, nonce: str, now: float, forget_before: float) -> bool:
        return self.catalog.nonce_use(nonce, now, forget_before)

    def _hook_request(self, trigger: events_mod.Trigger) -> None:
        """On the control endpoint's thread: only note it and wake the loop
        (the hook is answered at once, whatever the cloud is doing)."""
        event("hook.accepted", vm_id=trigger.vm_id, reason=trigger.reason,
              snapshot=trigger.snapshot)
        if trigger.snapshot and trigger.vm_id is not None:
            self._hook_snapshots.append(trigger)
        self.wakeups.add(trigger)

    def _snapshot_request(self, vm_id: int, name: str, ttl: int | None) -> None:
        """A hook asked for a pre-change snapshot of an opted-in VM."""
        try:
            vm = self.cloud.vm(vm_id)
        except OnebackError as e:
            event("hook.snapshot_refused", vm_id=vm_id, error=str(e))
            return
        if not vm_policy(vm).opted_in:
            event("hook.snapshot_refused", vm_id=vm_id, error="VM is not opted in")
            return
        cooling = self._cooling(vm_id, "snapshot")
        if cooling is not None:
            event("hook.snapshot_refused", vm_id=vm_id,
                  error=f"its last snapshot job failed; cooling down until {cooling:.0f}")
            return
        params = {"name": name, **({"ttl": str(ttl)} if ttl else {})}
        job, new = self.catalog.job_enqueue(vm_id, "snapshot", "hook request", params,
                                            uid=vm.uid)
        if new:
            event("job.queued", job=job.id, vm_id=vm_id, kind="snapshot", reason="hook")
        with self._work:
            self._work.notify()

    def _hook_refused(self, peer: str, why: str) -> None:
        """One line per refusal, at most REFUSED_PER_SECOND a second (then one
        line saying how many were not logged): strangers cannot flood the log."""
        second = int(time.monotonic())
        with self._refused_lock:
            if second != self._refused_second:
                dropped = self._refused_dropped
                self._refused_second, self._refused_count, self._refused_dropped = second, 0, 0
                if dropped:
                    log.warning("hook.refused_unlogged", extra={"fields": {"count": dropped}})
            self._refused_count += 1
            if self._refused_count > REFUSED_PER_SECOND:
                self._refused_dropped += 1
                return
        log.warning("hook.refused", extra={"fields": {"peer": peer, "why": _short(why)}})

    # -- what keeps failing ---------------------------------------------------

    def _failed(self, key: str, vm_id: int | None, what: str, e: BaseException,
                base: float) -> None:
        """Log one line naming the VM, and back off `key` (never raises)."""
        error = _error(e)
        try:
            b = self.catalog.backoff_fail(key, what, error, vm_id=vm_id, base=base,
                                          cap=self.cfg.agent.max_backoff, now=self.clock())
        except Exception as e2:
            event(f"{what.split()[0]}.failed", vm_id=vm_id, error=error,
                  backoff_error=_error(e2))
            return
        self._failing[key] = b
        event(f"{what.split()[0]}.failed", vm_id=vm_id, what=what, error=error,
              failures=b.failures, retry_at=b.next_try)

    def _recovered(self, key: str) -> None:
        if self._failing.pop(key, None) is not None:
            try:
                self.catalog.backoff_clear(key)
            except Exception as e:
                event("backoff.clear_failed", key=key, error=_error(e))

    def _backing_off(self, key: str) -> bool:
        b = self._failing.get(key)
        return b is not None and b.next_try > self.clock()

    def _cooling(self, vm_id: int, kind: str) -> float | None:
        """Until when jobs of `kind` for the VM cool down after a failure (None: they don't)."""
        b = self._failing.get(f"job:{vm_id}:{kind}")
        return b.next_try if b is not None and b.next_try > self.clock() else None

    def _load_failing(self) -> None:
        try:
            self._failing = {b.key: b for b in self.catalog.backoffs()}
        except Exception as e:
            event("backoff.read_failed", error=_error(e))

    # -- deciding -----------------------------------------------------------

    def _reconcile_pending(self) -> None:
        vms, everything = self.wakeups.take()
        snapshots = []
        while self._hook_snapshots:
            snapshots.append(self._hook_snapshots.popleft())
        self._pool_wanted = self._pool_wanted or everything
        pool_due = self._pool_wanted and time.monotonic() >= self._pool_retry
        if not (vms or snapshots or pool_due):
            return
        self._load_failing()
        for t in snapshots:
            assert t.vm_id is not None and t.snapshot is not None
            try:
                self._snapshot_request(t.vm_id, t.snapshot, t.snapshot_ttl)
            except Exception as e:
                event("hook.failed", vm_id=t.vm_id, error=_error(e))
        if pool_due:
            self._pool_pass(vms)
        for vm_id in sorted(vms):
            key = f"reconcile:{vm_id}"
            if not is_one_id(vm_id):
                event("reconcile.failed", vm_id=vm_id, error="not an OpenNebula id")
                continue
            if self._backing_off(key):
                continue   # keeps failing: the full pass after its backoff retries it
            try:
                vm = self.cloud.vm(vm_id)
            except NotFound:
                self._gone(vm_id)
                continue
            except Exception as e:
                self._failed(key, vm_id, "reconcile", e, self.cfg.agent.retry_base)
                continue
            self._reconcile_one(vm)

    def _pool_pass(self, vms: set[int]) -> None:
        """Look at every VM, and expire what has expired. A failing pool read
        is retried after a backoff, never at once; a failing VM or set backs
        off alone."""
        try:
            pool = self.cloud.vms()
        except Exception as e:
            self._pool_failures += 1
            delay = min(self.cfg.agent.max_backoff,
                        self.cfg.agent.retry_base * 2 ** min(self._pool_failures - 1, 40))
            self._pool_retry = time.monotonic() + delay
            self._failed("reconcile:all", None, "reconcile of every VM", e,
                         self.cfg.agent.retry_base)
            return
        self._pool_wanted, self._pool_failures, self._pool_retry = False, 0, 0.0
        self._recovered("reconcile:all")
        self.observer.seen([vm.id for vm in pool])
        self._load_placement(next((v for v in pool if v.id == self.cfg.proxy.vm_id), None))
        for vm in pool:
            vms.discard(vm.id)
            self._reconcile_one(vm)
        self._expire(pool)
        self._forget_the_gone(pool)
        live = {vm.id for vm in pool}
        if any(v not in live for v in self._unserved):
            self._unserved = {v: r for v, r in self._unserved.items() if v in live}
            try:
                self.catalog.keep_not_served(self._unserved)
            except OnebackError as e:
                event("placement.record_failed", error=e.message)

    def _reconcile_one(self, vm: VmInfo) -> None:
        key = f"reconcile:{vm.id}"
        if self._backing_off(key):
            return
        try:
            self.reconcile(vm)
        except Exception as e:
            self._failed(key, vm.id, "reconcile", e, self.cfg.agent.retry_base)
        else:
            self._recovered(key)

    def _expire(self, pool: list[VmInfo]) -> None:
        """Delete the sets whose TTL has passed, each on its own: one that
        cannot be deleted backs off and does not hold up the others."""
        now = self.clock()
        for vm in pool:
            try:
                expired = [s for s in sets_of(vm) if s.expires is not None and s.expires <= now]
            except Exception as e:
                self._failed(f"expire:{vm.id}", vm.id, "expire", e, self.cfg.agent.retry_base)
                continue
            for s in expired:
                key = f"expire:{vm.id}:{s.name}"
                if self._backing_off(key):
                    continue
                try:
                    result = delete_set(self.cloud, vm.id, s.name)
                    if result.failed:   # the members that went are gone; retry the rest
                        raise CloudError("; ".join(result.failed))
                except NotFound:
                    self._recovered(key)
                except Exception as e:
                    self._failed(key, vm.id, f"expire snapshot set {s.name}", e,
                                 self.cfg.agent.retry_base)
                else:
                    self._recovered(key)
                    event("snapshot.expired", vm_id=s.vm_id, name=s.name,
                          kept=[f"disk {k.disk_id} snapshot {k.snapshot_id}: {k.reason}"
                                for k in result.kept])

    def _forget_the_gone(self, pool: list[VmInfo]) -> None:
        """Backoffs of VMs and sets that no longer exist are dropped."""
        live = {vm.id: {s.name for s in sets_of(vm)} for vm in pool}
        for key, b in list(self._failing.items()):
            kind, _, rest = key.partition(":")
            if b.vm_id is None or kind not in ("reconcile", "expire", "job"):
                continue
            gone = b.vm_id not in live or (
                kind == "expire" and rest.partition(":")[2] not in live[b.vm_id])
            if gone:
                self._recovered(key)

    def _gone(self, vm_id: int) -> None:
        last = self.catalog.last_backup(vm_id)
        if last is not None and not last.vm_gone:
            self.catalog.mark_vm_gone(vm_id)
            event("vm.gone", vm_id=vm_id)

    def reconcile(self, vm: VmInfo) -> None:
        """Queue what is due for `vm` now (idempotent). Work that failed
        recently is not queued again before its cool-down ends."""
        if vm.id == self.cfg.proxy.vm_id:
            return
        if vm.state == VM_DONE:
            self.observer.policy(vm.id, None)
            self._gone(vm.id)
            return
        pol = vm_policy(vm, self.cfg.agent.min_interval)
        self.observer.policy(vm.id, pol.interval if pol.opted_in else None)
        if not pol.opted_in:
            self._served(vm.id, None)
            return
        reason = self._not_served(vm)
        self._served(vm.id, reason)
        if reason is not None:
            return   # another agent's: neither queued nor failed, nor its status touched
        if pol.error:
            self._set_status(vm, f"error: {pol.error}")
            return
        current = vm.user_template.get(STATUS, "")
        if pol.note and pol.note not in current:
            self._set_status(vm, _noted(current.split("; ")[0] or "scheduled", pol.note))
        last = self.catalog.last_backup(vm.id)
        for due in due_work(vm, pol, last.started if last else None, self.clock(),
                            last.finished if last else None):
            if self._cooling(vm.id, due.kind) is not None:
                continue
            job, new = self.catalog.job_enqueue(vm.id, due.kind, due.reason, due.params,
                                                uid=vm.uid)
            if new:
                event("job.queued", job=job.id, vm_id=vm.id, kind=due.kind, reason=due.reason)
                with self._work:
                    self._work.notify()

    # -- several agents, one repository ------------------------------------------

    def _load_placement(self, proxy: VmInfo | None) -> None:
        """Read where this proxy reaches (its cluster, or agent.clusters) and
        every datastore's CLUSTERS; on failure the last reading stays."""
        try:
            if proxy is None and self.cfg.agent.clusters is None:
                proxy = self.cloud.vm(self.cfg.proxy.vm_id)
            clusters = placement.proxy_clusters(proxy, self.cfg.agent.clusters)
            self._placement = (clusters, self.cloud.datastores())
        except OnebackError as e:
            event("placement.failed", error=e.message)

    def _not_served(self, vm: VmInfo) -> str | None:
        """Why this proxy cannot back `vm` up (None: it can, or it is not known yet)."""
        if self._placement is None:
            self._load_placement(None)
        if self._placement is None:
            return None   # unknown: try; oned refuses an attach it cannot do
        clusters, datastores = self._placement
        return placement.not_served(vm, clusters, datastores)

    def _served(self, vm_id: int, reason: str | None) -> None:
        """Record (on a change) that the VM is, or is not, this proxy's to serve."""
        if self._unserved.get(vm_id) == reason:
            return
        if reason is None:
            self._unserved.pop(vm_id, None)
        else:
            self._unserved[vm_id] = reason
            event("vm.not_served", vm_id=vm_id, reason=reason)
        try:
            self.catalog.set_not_served(vm_id, reason, self.clock())
        except OnebackError as e:
            event("placement.record_failed", vm_id=vm_id, error=e.message)

    def _sync(self, vm_id: int | None = None, vm_locked: bool = False) -> None:
        """Import the backups the other agents made (never raises)."""
        from agent import repository
        try:
            report = repository.sync(self.catalog, self.store, vm_id=vm_id,
                                     vm_locked=vm_locked)
        except Exception as e:
            event("catalog.sync_failed", vm_id=vm_id, error=_error(e))
            return
        if report.imported or report.dropped or report.damaged:
            event("catalog.synced", vm_id=vm_id,
                  imported=[i.backup_id for i in report.imported],
                  dropped=[b for b, _ in report.dropped],
                  damaged=[f"{n}: {why}" for n, why in report.damaged][:20])

    def _set_status(self, vm: VmInfo, status: str, extra: dict[str, str] | None = None) -> None:
        attrs = {STATUS: status[:1000], **(extra or {})}
        if all(vm.user_template.get(k) == v for k, v in attrs.items()):
            return  # unchanged: an update would only echo back as an event
        try:
            self.cloud.update_user_template(vm.id, attrs, merge=True)
        except OnebackError as e:
            event("status.failed", vm_id=vm.id, error=str(e))

    # -- the continuous verify ----------------------------------------------

    def _start_verifier(self, stop: threading.Event) -> threading.Thread | None:
        """The continuous verify on its own thread (`[verify] rate`; none when
        off) until `stop`: it reads chunks beside the backups and never holds
        them up."""
        if self.cfg.verify.rate <= 0:
            return None
        t = threading.Thread(target=run_verifier, name="oneback-verify", daemon=True,
                             args=(self.cfg, self.store, self.catalog, stop))
        t.start()
        return t

    # -- doing --------------------------------------------------------------

    def _start_worker(self, i: int) -> threading.Thread:
        w = threading.Thread(target=self._worker, name=f"oneback-worker-{i}", daemon=True)
        w.start()
        return w

    def _supervise(self, workers: list[threading.Thread]) -> None:
        """Replace a worker that died; its job goes back to the queue."""
        for i, w in enumerate(workers):
            if w.is_alive() or self.stopping.is_set():
                continue
            job = self._current.pop(w.name, None)
            if job is not None:
                self._running.pop(job.id, None)
                self._requeue(job, "its worker died")
            event("worker.replaced", worker=w.name, job=job.id if job else None,
                  vm_id=job.vm_id if job else None)
            workers[i] = self._start_worker(i)

    def _requeue(self, job: Job, why: str) -> None:
        """Back to the queue after the cool-down (failed for good after
        `max_attempts`): never left "running"."""
        retry = (self.clock() + self.cfg.agent.failure_cooldown
                 if job.attempts < self.cfg.agent.max_attempts else None)
        try:
            self.catalog.job_fail(job.id, f"internal error: {why}", retry_at=retry)
        except Exception as e:  # the next start's recovery requeues it
            event("job.requeue_failed", job=job.id, vm_id=job.vm_id, error=_error(e))
            return
        event("job.requeued", job=job.id, vm_id=job.vm_id, why=why, retry_at=retry)

    def _worker(self) -> None:
        me = threading.current_thread().name
        failures = 0
        while not self.stopping.is_set():
            try:
                job = self.catalog.job_claim(self.lease.owner, self.cfg.agent.max_jobs)
            except Exception as e:   # the catalog is busy or broken: wait, try again
                failures += 1
                event("worker.claim_failed", worker=me, error=_error(e))
                self.stopping.wait(min(30.0, 0.2 * 2 ** min(failures, 8)))
                continue
            failures = 0
            if job is None:
                with self._work:
                    self._work.wait(0.2)
                continue
            self._running[job.id] = job
            self._current[me] = job
            try:
                self._run_job(job)
            except Exception as e:   # recording the job's outcome failed
                event("job.crashed", job=job.id, vm_id=job.vm_id, error=_error(e))
                self._requeue(job, _error(e))
            # Not in a `finally`: if this thread dies, `_supervise` finds its job here.
            self._running.pop(job.id, None)
            self._current.pop(me, None)

    def _run_job(self, job: Job) -> None:
        event("job.started", job=job.id, vm_id=job.vm_id, kind=job.kind, attempt=job.attempts)
        note = ""
        try:
            vm = self.cloud.vm(job.vm_id)
            pol = vm_policy(vm, self.cfg.agent.min_interval)
            note = pol.note
            if not pol.opted_in:      # it opted out since: do nothing
                self.catalog.job_finish(job.id, "skipped: not opted in")
                return
            if job.kind == "backup":
                result = self._backup(vm, note, job)
            elif job.kind == "snapshot":
                result = self._snapshot(vm, job)
            else:
                raise UsageError(f"unknown job kind {job.kind!r}")
        except Interrupted as e:
            self.catalog.job_fail(job.id, str(e), retry_at=self.clock())
            event("job.interrupted", job=job.id, vm_id=job.vm_id)
        except NotFound as e:
            self.observer.job_failed(job.vm_id, job.kind)
            self.catalog.job_fail(job.id, str(e), retry_at=None)
            self._gone(job.vm_id)
            event("job.failed", job=job.id, vm_id=job.vm_id, error=str(e))
        except OnebackError as e:
            self.observer.job_failed(job.vm_id, job.kind)
            transient = isinstance(e, CloudError | DeviceError) and (
                not isinstance(e, CloudError) or e.transient)
            retry = None
            if transient and job.attempts < self.cfg.agent.max_attempts:
                retry = self.clock() + self.cfg.agent.retry_base * 2 ** (job.attempts - 1)
            self.catalog.job_fail(job.id, str(e), retry_at=retry)
            event("job.failed", job=job.id, vm_id=job.vm_id, error=str(e), retry_at=retry)
            if retry is None:
                self._cool_down(job, e)
            self._status_after_failure(job.vm_id, str(e))
        except Exception as e:  # a bug: keep serving, record it
            self.observer.job_failed(job.vm_id, job.kind)
            self.catalog.job_fail(job.id, _error(e), None)
            event("job.crashed", job=job.id, vm_id=job.vm_id, error=_error(e))
            self._cool_down(job, e)
        else:
            self.catalog.job_finish(job.id, result)
            self._recovered(f"job:{job.vm_id}:{job.kind}")
            event("job.done", job=job.id, vm_id=job.vm_id, result=result)

    def _cool_down(self, job: Job, e: BaseException) -> None:
        """The same work is not queued again before `failure_cooldown` (doubled
        for each failure in a row)."""
        self._failed(f"job:{job.vm_id}:{job.kind}", job.vm_id, f"job {job.kind}", e,
                     self.cfg.agent.failure_cooldown)

    def _status_after_failure(self, vm_id: int, error: str) -> None:
        try:
            self._set_status(self.cloud.vm(vm_id), f"error: {error}"[:1000])
        except OnebackError:
            pass

    def _backup(self, vm: VmInfo, note: str = "", job: Job | None = None) -> str:
        reason = self._not_served(vm)
        if reason is not None:
            self._served(vm.id, reason)
            return f"skipped: not served here ({reason})"
        workspace = Workspace(self.cloud, self.catalog, self.lease.owner, self.cfg.proxy.vm_id,
                              attach_slots=self.attach_slots)
        settings = Settings.from_config(self.cfg)
        with exclusive(self.cfg.storage.catalog, vm.id):
            held = None
            if self.leases is not None:
                try:
                    held = vmlease.acquire(self.leases, vm.id, self.catalog.catalog_id,
                                           self.cfg.agent.lease_time,
                                           agent=f"proxy VM {self.cfg.proxy.vm_id}",
                                           process=self.lease.owner)
                except LeaseBusy as e:
                    event("lease.busy", vm_id=vm.id, why=e.message)
                    return f"skipped: {e.message}"
                event("lease.acquired", vm_id=vm.id, owner=held.owner, token=held.token,
                      until=held.until)
                with self._leased_lock:
                    self._leased.add(vm.id)
            try:   # from here on, every way out releases the lease
                if held is not None:
                    # another agent's backup may have made this job moot: still due?
                    self._sync(vm.id, vm_locked=True)
                    last = self.catalog.last_backup(vm.id)
                    if job is not None and last is not None and not any(
                            d.kind == "backup" for d in due_work(
                                vm, vm_policy(vm, self.cfg.agent.min_interval), last.started,
                                self.clock(), last.finished)):
                        return f"skipped: no longer due (backup {last.id} was made meanwhile)"
                self._set_status(vm, _noted("running", note))
                cancel = threading.Event()
                try:
                    if held is None:
                        result = backup_vm(vm.id, BackupOptions(), cloud=self.cloud,
                                           catalog=self.catalog, store=self.store,
                                           workspace=workspace, settings=settings,
                                           progress=self.observer.backup(vm.id),
                                           cancel=self.cancel)
                    else:
                        with vmlease.Heartbeat(held, cancel, also=self.cancel):
                            result = backup_vm(vm.id, BackupOptions(), cloud=self.cloud,
                                               catalog=self.catalog, store=self.store,
                                               workspace=workspace, settings=settings,
                                               progress=self.observer.backup(vm.id),
                                               cancel=cancel)
                except Interrupted as e:
                    if held is not None and held.lost:
                        event("lease.lost", vm_id=vm.id, token=held.token, to=held.lost)
                        return (f"stopped: {LeaseLost(held.lost_message()).message}"
                                f" ({e.message})")
                    raise
            finally:
                with self._leased_lock:
                    self._leased.discard(vm.id)
                if held is not None and not held.lost:
                    held.release()
                    event("lease.released", vm_id=vm.id, token=held.token)
        rec = result.record
        self.observer.backup_done(vm.id, rec)
        forgotten = self._retain(vm)
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.finished))
        status = "ok" if not result.refused else "warning: " + " | ".join(result.refused)
        self._set_status(self.cloud.vm(vm.id), _noted(status, note)[:1000],
                         {LAST_BACKUP: f"{when} backup {rec.id} ({rec.kind})"})
        return json.dumps({"backup_id": rec.id, "kind": rec.kind, "forgotten": forgotten})

    def _retain(self, vm: VmInfo) -> list[int]:
        """Apply the VM's keep policy (ONEBACK_KEEP, else [retention]) after a
        successful backup: forget what it no longer keeps (chunks are freed by
        `oneback prune`). A failure here is logged; the backup stands."""
        from agent import repository
        keep = vm_policy(vm).keep or self.cfg.retention
        if keep.empty:
            return []
        try:
            plan = repository.plan_forget(self.catalog, keep, [vm.id])
            forgotten = repository.forget(self.catalog, self.store, plan.forget)
        except OnebackError as e:
            event("retention.failed", vm_id=vm.id, error=e.message)
            return []
        if forgotten:
            event("retention.forgot", vm_id=vm.id, backups=forgotten, policy=keep.text())
        return forgotten

    def _snapshot(self, vm: VmInfo, job: Job) -> str:
        name = job.params.get("name", "")
        ttl = int(job.params["ttl"]) if job.params.get("ttl") else None
        existing = sets_of(vm)
        limit = self.cfg.agent.max_snapshot_sets
        refused = ""
        if any(s.name == name for s in existing):   # taken before a crash or restart
            outcome = f"snapshot set {name} already existed"
        elif len(existing) >= limit:   # refused, and the request cleared: no retry loop
            refused = (f"VM {vm.id} already has {len(existing)} snapshot sets, the most the"
                       f" operator allows; delete one with 'oneback snapshot delete {vm.id}"
                       f" NAME' and ask again")
            outcome = f"refused: {refused}"
        else:
            created = create_set(self.cloud, self.catalog, self.lease.owner, vm.id, name, ttl,
                                 now=self.clock())
            outcome = f"snapshot set {created.set.name}"
        # Clear the request, unless the owner asked for another one meanwhile.
        fresh = self.cloud.vm(vm.id)
        if fresh.user_template.get("ONEBACK_SNAPSHOT", "").strip() == name:
            self.cloud.update_user_template(vm.id, {"ONEBACK_SNAPSHOT": ""}, merge=True)
        if refused:
            event("snapshot.refused", vm_id=vm.id, name=name, sets=len(existing), limit=limit)
            self._set_status(fresh, f"error: snapshot set {name} refused: {refused}")
        else:
            event("snapshot.taken", vm_id=vm.id, name=name, ttl=ttl)
        return outcome


def run_verifier(cfg: Config, store: Repository, catalog: Catalog,
                 should_exit: threading.Event) -> None:
    """Every `interval` seconds, read back the share of the repository due
    at `rate` per day (agent.verify.background_slice) until `should_exit`."""
    from agent import verify
    last = time.monotonic() - cfg.verify.interval
    while not should_exit.wait(cfg.verify.interval):
        now = time.monotonic()
        share = verify.share_due(cfg.verify.rate, now - last)
        last = now
        try:
            step = verify.background_slice(store, catalog, share, workers=cfg.verify.workers,
                                           cancel=should_exit)
        except Interrupted:
            return
        except Exception as e:   # the repository or catalog is busy or broken: next step
            event("verify.failed", error=_error(e))
            continue
        if step.damage:
            event("verify.damaged", chunks=sorted({d.chunk for d in step.damage if d.chunk}),
                  backups=sorted({d.backup_id for d in step.damage if d.backup_id}),
                  damage=[f"backup {d.backup_id} VM {d.vm_id} disk {d.disk_id} block"
                          f" {d.block}: {d.problem}" for d in step.damage[:20]])
        if step.pass_done:
            p = step.progress
            event("verify.pass", checked=p.pass_checked, damage=len(p.damage),
                  started=p.pass_started, seconds=round(time.time() - p.pass_started, 3))


def _noted(status: str, note: str) -> str:
    return f"{status}; {note}" if note else status
