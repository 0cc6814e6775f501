"""Time: the driver operations in flight and the scheduler.

Owns: `Engine`, a timer thread that runs named operations (the simulated
drivers' answers) when they are due, under the store lock, persisting them
in the store so a restart resumes them; the LifeCycleManager's queue
(`call_later`: work a request queued for the LCM thread, run after the
answer, in memory only, as oned's queue); and `Scheduler`, the simulated
mm_sched that deploys PENDING VMs on host 0 after its interval.
Must not: decide what an operation does (handlers are registered by name).
"""

from __future__ import annotations

import heapq
import itertools
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from tests.onesim.oned import Oned

Op = dict[str, Any]
Handler = Callable[[Op], None]


class Engine:
    def __init__(self, core: Oned) -> None:
        self.core = core
        self.handlers: dict[str, Handler] = {}
        self._heap: list[tuple[float, int, Op]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="onesim-engine", daemon=True)
        self.busy = 0  # operations being run right now

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    def start(self) -> None:
        """Resume the operations a previous run left pending."""
        with self.core.store.lock:
            pending = list(self.core.store.pending)
        for op in pending:
            self._push(op)
        self._thread.start()

    def schedule(self, op: Op, delay: float) -> None:
        """Called with the store lock held: the op is persisted with the object."""
        op = dict(op)
        op["due"] = time.time() + max(delay, 0.0)
        op["seq"] = next(self._seq)
        self.core.store.pending.append(op)
        self._push(op)

    def call_later(self, fn: Callable[[], None], delay: float) -> None:
        """Run `fn` under the store lock `delay` seconds from now, in order with
        every other due operation. Not persisted: a queued LCM action is lost
        when oned stops, as in oned (LifeCycleManager's action queue)."""
        self._push({"op": "", "call": fn, "due": time.time() + max(delay, 0.0)})

    def _push(self, op: Op) -> None:
        with self._cond:
            heapq.heappush(self._heap, (op["due"], next(self._seq), op))
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.time()):
                    timeout = None if not self._heap else max(self._heap[0][0] - time.time(), 0)
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                _, _, op = heapq.heappop(self._heap)
                self.busy += 1
            try:
                with self.core.store.lock:
                    if op in self.core.store.pending:
                        self.core.store.pending.remove(op)
                    call = op.get("call")
                    handler = self.handlers.get(op["op"])
                    if call is not None or handler is not None:
                        try:
                            if call is not None:
                                call()
                            elif handler is not None:
                                handler(op)
                        except Exception:  # a bug must not stop time
                            traceback.print_exc(file=sys.stderr)
                    self.core.save()
            finally:
                with self._cond:
                    self.busy -= 1
                    self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self._heap and self.busy == 0

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


class Scheduler:
    """Deploys PENDING VMs that waited one interval (host 0, the requested or
    default system datastore), like mm_sched with a single host."""

    def __init__(self, core: Oned, deploy: Callable[[int], None]) -> None:
        self.core = core
        self.deploy = deploy
        self._seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="onesim-sched", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        interval = max(self.core.config.scheduler_interval, 0.005)
        while not self._stop.wait(min(interval, 0.05) if interval > 0.05 else interval):
            with self.core.store.lock:
                pending = [vm.id for vm in self.core.store.vms.values() if vm.state == 1]
                now = time.monotonic()
                for vid in list(self._seen):
                    if vid not in pending:
                        del self._seen[vid]
                due = []
                for vid in sorted(pending):
                    first = self._seen.setdefault(vid, now)
                    if now - first >= interval:
                        due.append(vid)
                for vid in due:
                    self._seen.pop(vid, None)
                    try:
                        self.deploy(vid)
                    except Exception:  # a bug must not stop the scheduler
                        traceback.print_exc(file=sys.stderr)
                if due:
                    self.core.save()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
