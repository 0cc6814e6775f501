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
Must not: print (it logs one structured line per event), or talk to pyone,
zmq or SQL directly.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent import events as events_mod
from agent.attach import Workspace, sweep
from agent.backup import BackupOptions, Settings, backup_vm, exclusive
from agent.catalog import Catalog
from agent.cloud import Cloud
from agent.config import Config
from agent.control import ControlServer, Verifier
from agent.errors import CloudError, DeviceError, Interrupted, NotFound, OnebackError, UsageError
from agent.lease import Lease, is_alive
from agent.model import VM_DONE, Job, VmInfo
from agent.policy import due_work, vm_policy
from agent.snapshots import create_set, expire_sets, sets_of
from agent.store import ChunkStore
from agent.subscriber import Subscriber

log = logging.getLogger("oneback.agent")
STATUS = "ONEBACK_STATUS"
LAST_BACKUP = "ONEBACK_LAST_BACKUP"


def event(name: str, /, **fields: object) -> None:
    """One structured log line (the CLI's formatter renders it as JSON)."""
    log.info(name, extra={"fields": fields})


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
    def __init__(self, cfg: Config, cloud: Cloud, catalog: Catalog, store: ChunkStore,
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
        self._work = threading.Condition()
        self._running: dict[int, Job] = {}

    # -- the main loop ------------------------------------------------------------

    def run(self, should_exit: threading.Event) -> None:
        """Serve until `should_exit` is set; then shut down gracefully."""
        self.startup()
        sub = Subscriber(self.cfg.opennebula.events, events_mod.TOPICS)
        if self.secret is not None:
            self.control = ControlServer(
                self.cfg.agent.listen_host, self.cfg.agent.listen_port, Verifier(self.secret),
                accepted=self._hook_request, refused=self._hook_refused)
            event("control.listening", address=self.control.address)
        workers = [threading.Thread(target=self._worker, name=f"oneback-worker-{i}",
                                    daemon=True) for i in range(self.cfg.agent.max_jobs)]
        for w in workers:
            w.start()
        self.wakeups.add(events_mod.everything("start"))
        next_reconcile = time.monotonic() + self.cfg.agent.reconcile_interval
        try:
            while not should_exit.is_set():
                batch = sub.poll(0.2)
                if batch.connected:
                    event("events.connected", endpoint=self.cfg.opennebula.events)
                    self.wakeups.add(events_mod.everything("events (re)connected"))
                if batch.disconnected:
                    event("events.disconnected", endpoint=self.cfg.opennebula.events)
                for topic, body in batch.messages:
                    trigger = events_mod.parse_message(topic, body)
                    if trigger is not None:
                        self.wakeups.add(trigger)
                if time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + self.cfg.agent.reconcile_interval
                    self.wakeups.add(events_mod.everything("reconcile timer"))
                self._reconcile_pending()
        finally:
            sub.close()
            if self.control is not None:
                self.control.close()
            self.shutdown(workers)

    def startup(self) -> None:
        """Requeue the jobs of a run that died, and remove its cloud leftovers."""
        recovered = self.catalog.jobs_recover(
            lambda owner: is_alive(self.cfg.storage.catalog, owner))
        report = sweep(self.cloud, self.catalog, self.cfg.storage.catalog, self.cfg.proxy.vm_id)
        event("agent.started", owner=self.lease.owner, recovered_jobs=recovered,
              swept=list(report.removed), sweep_failed=list(report.failed),
              sweep_kept=list(report.kept))

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

    def _hook_request(self, trigger: events_mod.Trigger) -> None:
        event("hook.accepted", vm_id=trigger.vm_id, reason=trigger.reason,
              snapshot=trigger.snapshot)
        if trigger.snapshot and trigger.vm_id is not None:
            self._snapshot_request(trigger.vm_id, trigger.snapshot, trigger.snapshot_ttl)
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
        params = {"name": name, **({"ttl": str(ttl)} if ttl else {})}
        job, new = self.catalog.job_enqueue(vm_id, "snapshot", "hook request", params)
        if new:
            event("job.queued", job=job.id, vm_id=vm_id, kind="snapshot", reason="hook")
        with self._work:
            self._work.notify()

    def _hook_refused(self, peer: str, why: str) -> None:
        log.warning("hook.refused", extra={"fields": {"peer": peer, "why": why}})

    def _reconcile_pending(self) -> None:
        vms, everything = self.wakeups.take()
        if everything:
            try:
                pool = self.cloud.vms()
                for vm in pool:
                    self.reconcile(vm)
                    vms.discard(vm.id)
                for s in expire_sets(self.cloud, self.clock(), pool):
                    event("snapshot.expired", vm_id=s.vm_id, name=s.name)
            except OnebackError as e:
                event("reconcile.failed", error=str(e))
                self.wakeups.add(events_mod.everything("retry reconcile"))
                return
        for vm_id in sorted(vms):
            try:
                self.reconcile(self.cloud.vm(vm_id))
            except NotFound:
                self._gone(vm_id)
            except OnebackError as e:
                event("reconcile.failed", vm_id=vm_id, error=str(e))

    def _gone(self, vm_id: int) -> None:
        last = self.catalog.last_backup(vm_id)
        if last is not None and not last.vm_gone:
            self.catalog.mark_vm_gone(vm_id)
            event("vm.gone", vm_id=vm_id)

    def reconcile(self, vm: VmInfo) -> None:
        """Queue what is due for `vm` now (idempotent)."""
        if vm.id == self.cfg.proxy.vm_id:
            return
        if vm.state == VM_DONE:
            self._gone(vm.id)
            return
        pol = vm_policy(vm)
        if not pol.opted_in:
            return
        if pol.error:
            self._set_status(vm, f"error: {pol.error}")
            return
        last = self.catalog.last_backup(vm.id)
        for due in due_work(vm, pol, last.started if last else None, self.clock(),
                            last.finished if last else None):
            job, new = self.catalog.job_enqueue(vm.id, due.kind, due.reason, due.params)
            if new:
                event("job.queued", job=job.id, vm_id=vm.id, kind=due.kind, reason=due.reason)
                with self._work:
                    self._work.notify()

    def _set_status(self, vm: VmInfo, status: str, extra: dict[str, str] | None = None) -> None:
        attrs = {STATUS: status, **(extra or {})}
        if all(vm.user_template.get(k) == v for k, v in attrs.items()):
            return  # unchanged: an update would only echo back as an event
        try:
            self.cloud.update_user_template(vm.id, attrs, merge=True)
        except OnebackError as e:
            event("status.failed", vm_id=vm.id, error=str(e))

    # -- doing --------------------------------------------------------------

    def _worker(self) -> None:
        while not self.stopping.is_set():
            job = self.catalog.job_claim(self.lease.owner, self.cfg.agent.max_jobs)
            if job is None:
                with self._work:
                    self._work.wait(0.2)
                continue
            self._running[job.id] = job
            try:
                self._run_job(job)
            finally:
                self._running.pop(job.id, None)

    def _run_job(self, job: Job) -> None:
        event("job.started", job=job.id, vm_id=job.vm_id, kind=job.kind, attempt=job.attempts)
        try:
            vm = self.cloud.vm(job.vm_id)
            pol = vm_policy(vm)
            if not pol.opted_in:      # it opted out since: do nothing
                self.catalog.job_finish(job.id, "skipped: not opted in")
                return
            if job.kind == "backup":
                result = self._backup(vm)
            elif job.kind == "snapshot":
                result = self._snapshot(vm, job)
            else:
                raise UsageError(f"unknown job kind {job.kind!r}")
        except Interrupted as e:
            self.catalog.job_fail(job.id, str(e), retry_at=self.clock())
            event("job.interrupted", job=job.id, vm_id=job.vm_id)
        except NotFound as e:
            self.catalog.job_fail(job.id, str(e), retry_at=None)
            self._gone(job.vm_id)
            event("job.failed", job=job.id, vm_id=job.vm_id, error=str(e))
        except OnebackError as e:
            transient = isinstance(e, CloudError | DeviceError) and (
                not isinstance(e, CloudError) or e.transient)
            retry = None
            if transient and job.attempts < self.cfg.agent.max_attempts:
                retry = self.clock() + self.cfg.agent.retry_base * 2 ** (job.attempts - 1)
            self.catalog.job_fail(job.id, str(e), retry_at=retry)
            event("job.failed", job=job.id, vm_id=job.vm_id, error=str(e), retry_at=retry)
            self._status_after_failure(job.vm_id, str(e))
        except Exception as e:  # a bug: keep serving, record it
            self.catalog.job_fail(job.id, f"internal error: {type(e).__name__}: {e}", None)
            log.exception("job.crashed", extra={"fields": {"job": job.id}})
        else:
            self.catalog.job_finish(job.id, result)
            event("job.done", job=job.id, vm_id=job.vm_id, result=result)

    def _status_after_failure(self, vm_id: int, error: str) -> None:
        try:
            self._set_status(self.cloud.vm(vm_id), f"error: {error}"[:1000])
        except OnebackError:
            pass

    def _backup(self, vm: VmInfo) -> str:
        self._set_status(vm, "running")
        workspace = Workspace(self.cloud, self.catalog, self.lease.owner, self.cfg.proxy.vm_id,
                              attach_slots=self.attach_slots)
        settings = Settings.from_config(self.cfg)
        with exclusive(self.cfg.storage.catalog, vm.id):
            result = backup_vm(vm.id, BackupOptions(), cloud=self.cloud, catalog=self.catalog,
                               store=self.store, workspace=workspace, settings=settings,
                               cancel=self.cancel)
        rec = result.record
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.finished))
        status = "ok" if not result.refused else "warning: " + " | ".join(result.refused)
        self._set_status(self.cloud.vm(vm.id), status[:1000],
                         {LAST_BACKUP: f"{when} backup {rec.id} ({rec.kind})"})
        return json.dumps({"backup_id": rec.id, "kind": rec.kind})

    def _snapshot(self, vm: VmInfo, job: Job) -> str:
        name = job.params.get("name", "")
        ttl = int(job.params["ttl"]) if job.params.get("ttl") else None
        if any(s.name == name for s in sets_of(vm)):   # taken before a crash or restart
            outcome = f"snapshot set {name} already existed"
        else:
            created = create_set(self.cloud, self.catalog, self.lease.owner, vm.id, name, ttl,
                                 now=self.clock())
            outcome = f"snapshot set {created.set.name}"
        # Clear the request, unless the owner asked for another one meanwhile.
        fresh = self.cloud.vm(vm.id)
        if fresh.user_template.get("ONEBACK_SNAPSHOT", "").strip() == name:
            self.cloud.update_user_template(vm.id, {"ONEBACK_SNAPSHOT": ""}, merge=True)
        event("snapshot.taken", vm_id=vm.id, name=name, ttl=ttl)
        return outcome
