"""Per-VM leases kept in the repository: two agents sharing a repository
never back one VM up at the same time, and a dead agent's VMs are taken
over once its lease expires.

Owns: the lease record (who holds VM N, until when), acquiring it (an
atomic create, or a compare-and-swap over a lease that expired or was
released), renewing it while the work runs (`Heartbeat`: a renewal that
finds another holder sets the job's cancel event, so the backup stops and
cleans up), releasing it, and reading it for `oneback status`. Must not:
know about the cloud, the catalog or backups. `agent/lease.py` is another
thing: the catalog-local process lock of one proxy.

Time is the repository's (`LeaseStore.lease_now`, as prune uses the
repository's mtimes): a lease expires `ttl` seconds after it was written,
measured on that clock, so agents on machines whose clocks differ agree.
A holder renews every `ttl / 3`; a lease is taken over only when it
expired (or was released), so an agent that is alive and can reach the
repository keeps its VMs. A record that cannot be read (garbled, forged,
from a newer oneback) is held for one `ttl` of the reader from its write,
then taken over; one written less than its `ttl` in the future (the
repository's clock stepped back) is held as if written now, one further
ahead (a forged mtime) counts as expired; a `ttl` above MAX_TTL is cut to it.

The storage side is the small `LeaseStore` Protocol a repository
implements, three calls that map onto S3's conditional writes:

- `lease_get(name)` -> the current object (bytes, a version token, the
  time it was written), or None. S3: GET, version = the ETag, written =
  Last-Modified.
- `lease_put(name, data, replaces)` -> the object written, or None when
  another writer won: create only if absent (`replaces=None`; S3 PUT with
  `If-None-Match: *`, 412 -> None) or replace only if the current version
  is still `replaces` (S3 PUT with `If-Match: <ETag>`, 412 -> None).
- `lease_now()` -> the repository's clock (S3: the `Date` of a response).
- `lease_names()` -> every lease's name (S3: ListObjectsV2 under the prefix);
  only `oneback cleanup` lists them, to spare other agents' live objects.

`LocalStore` implements it with one file per generation and `link` as
the exclusive create (`agent/store/leases.py`). After every write the
writer reads the lease again (`confirm`) and only goes on if it is still
its own.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from agent.errors import LeaseBusy, LeaseLost, OnebackError
from agent.model import StoredLease

MAX_TTL = 3600.0
"""The longest lease a record may claim (seconds): a forged one cannot block a VM for long."""
FUTURE = 5.0
"""A lease written up to this many seconds ahead of the repository's clock is
taken as it is (file times are coarse); further ahead but within its ttl, as
written now; further still, as forged."""
VERSION = 1


@runtime_checkable
class LeaseStore(Protocol):
    """What a repository offers for leases (see the module docstring)."""

    def lease_now(self) -> float: ...
    def lease_get(self, name: str) -> StoredLease | None: ...
    def lease_put(self, name: str, data: bytes, replaces: str | None) -> StoredLease | None: ...
    def lease_names(self) -> list[str]: ...


def lease_name(vm_id: int) -> str:
    return f"vm-{int(vm_id)}"


@dataclass(frozen=True)
class LeaseState:
    """A lease as read: who holds it (`owner` "" when released) and until
    when, on the repository's clock; `problem` says why a record was not
    believed (garbled, written in the future)."""

    vm_id: int
    owner: str
    agent: str
    token: str
    until: float
    version: str
    problem: str = ""
    process: str = ""   # the holder's process id in the names of its cloud objects

    def held_at(self, now: float) -> bool:
        return bool(self.owner) and now < self.until


def parse(vm_id: int, stored: StoredLease, now: float, default_ttl: float) -> LeaseState:
    """The lease `stored` says, believed only as far as it can be."""
    try:
        doc = json.loads(stored.data.decode("utf-8"))
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise ValueError("unknown format")
        owner, agent, token = doc["owner"], doc.get("agent", ""), doc["token"]
        process = doc.get("process", "")
        ttl = float(doc["ttl"])
        if (not all(isinstance(v, str) for v in (owner, agent, token, process))
                or doc.get("vm") != vm_id or not ttl == ttl):   # NaN
            raise ValueError("wrong fields")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return LeaseState(vm_id, "?", "", "", stored.written + default_ttl, stored.version,
                          problem=f"unreadable lease record ({e})")
    ttl = min(max(ttl, 0.0), MAX_TTL)
    if stored.written > now + max(FUTURE, ttl):
        return LeaseState(vm_id, owner, agent, token, now, stored.version,
                          problem="written in the future (forged, or a clock far ahead)")
    if stored.written > now + FUTURE:
        # the repository's clock was stepped back after the write (NTP on
        # the file server): the lease is live, as if written now; a forged
        # one within the bound holds for two lease times at most
        return LeaseState(vm_id, owner, agent, token, now + ttl, stored.version,
                          process=process)
    until = stored.written + ttl
    return LeaseState(vm_id, owner, agent, token, until, stored.version, process=process)


def read(store: LeaseStore, vm_id: int, default_ttl: float) -> tuple[LeaseState | None, float]:
    """The VM's lease (None: never taken) and the repository's time now."""
    now = store.lease_now()
    stored = store.lease_get(lease_name(vm_id))
    return (None if stored is None else parse(vm_id, stored, now, default_ttl)), now


def _record(vm_id: int, owner: str, agent: str, token: str, ttl: float,
            process: str = "") -> bytes:
    return json.dumps({"v": VERSION, "vm": vm_id, "owner": owner, "agent": agent,
                       "token": token, "ttl": ttl, "process": process},
                      sort_keys=True).encode()


class Held:
    """A lease this process holds. `renew` and `release` are thread-safe."""

    def __init__(self, store: LeaseStore, vm_id: int, owner: str, agent: str, ttl: float,
                 token: str, version: str, until: float, process: str = "",
                 renewed_at: float | None = None) -> None:
        self.store, self.vm_id, self.owner, self.agent, self.ttl = store, vm_id, owner, agent, ttl
        self.token, self.version, self.until, self.process = token, version, until, process
        self.lost = ""        # who took it, once lost
        # this host's monotonic clock just before the last confirmed write:
        # the lease runs at least until renewed_at + ttl (as long as the clocks' rates agree)
        self.renewed_at = time.monotonic() if renewed_at is None else renewed_at
        self._lock = threading.Lock()

    def _mine(self, state: LeaseState | None) -> bool:
        return state is not None and state.owner == self.owner and state.token == self.token

    def renew(self) -> None:
        """Extend the lease by `ttl` from now. LeaseLost (and `lost` set)
        when it is no longer ours: another agent took it after it expired."""
        with self._lock:
            if self.lost:
                raise LeaseLost(self.lost_message())
            began = time.monotonic()
            state, _ = read(self.store, self.vm_id, self.ttl)
            if not self._mine(state):
                self.lost = _who(state)
                raise LeaseLost(self.lost_message())
            assert state is not None
            written = self.store.lease_put(
                lease_name(self.vm_id),
                _record(self.vm_id, self.owner, self.agent, self.token, self.ttl, self.process),
                state.version)
            state, _ = read(self.store, self.vm_id, self.ttl)   # confirm
            if written is None or not self._mine(state) or state is None:
                self.lost = _who(state)
                raise LeaseLost(self.lost_message())
            self.version, self.until, self.renewed_at = state.version, state.until, began

    def give_up(self, why: str) -> None:
        """Count the lease as lost: its renewals failed (`why`) and it may
        expire before the next one, after which another agent may take it.
        Takes no lock: a renewal that hangs holds it."""
        if not self.lost:
            self.lost = f"whoever takes it once it expires (its renewals failed: {why})"

    def release(self) -> None:
        """Give the lease up (a released record, so the next taker does not
        wait for the expiry). Nothing happens if it is no longer ours."""
        with self._lock:
            if self.lost:
                return
            try:
                state, _ = read(self.store, self.vm_id, self.ttl)
                if self._mine(state):
                    assert state is not None
                    self.store.lease_put(lease_name(self.vm_id),
                                         _record(self.vm_id, "", "", "", 0.0), state.version)
            except OnebackError:
                pass   # it expires by itself
            self.lost = "released"

    def lost_message(self) -> str:
        return (f"the lease on VM {self.vm_id} passed to {self.lost} while this agent worked;"
                " it stopped and cleaned up (its renewals did not reach the repository in"
                " time)")


def _who(state: LeaseState | None) -> str:
    if state is None:
        return "nobody (the lease was removed)"
    if not state.owner:
        return "nobody (released)"
    return f"agent {state.agent or '?'} (owner {state.owner})"


def acquire(store: LeaseStore, vm_id: int, owner: str, ttl: float, agent: str = "",
            process: str = "") -> Held:
    """Take VM `vm_id`'s lease for `ttl` seconds: create it, or replace one
    that expired or was released. LeaseBusy when another agent holds it
    (or won the race for it). `owner` is the agent (its catalog id: a
    restarted agent takes its own lease back at once, unless the lease names
    another `agent`, i.e. proxy: same catalog id, a clone; the processes of one
    catalog exclude each other with `lease.vm_lock`), `process` the id its
    cloud objects are named with (`oneback cleanup` elsewhere spares them)."""
    token = secrets.token_hex(8)
    data = _record(vm_id, owner, agent, token, ttl, process)
    began = time.monotonic()
    state, now = read(store, vm_id, ttl)
    if state is not None and state.held_at(now) and state.owner != owner:
        raise LeaseBusy(_busy(vm_id, state, now))
    if (state is not None and state.held_at(now) and state.agent and agent
            and state.agent != agent):
        # the same catalog id on another proxy: a cloned proxy VM or catalog
        raise LeaseBusy(f"{_busy(vm_id, state, now)}; that agent has this catalog's id"
                        f" ({owner}: a cloned proxy VM or catalog?): give each proxy its"
                        f" own catalog (`oneback init` on an empty one)")
    written = store.lease_put(lease_name(vm_id), data, None if state is None else state.version)
    confirmed, now = read(store, vm_id, ttl)
    if written is None or confirmed is None or confirmed.token != token:
        raise LeaseBusy(_busy(vm_id, confirmed, now) if confirmed is not None
                        else f"VM {vm_id}'s lease was taken by another agent at the same time")
    return Held(store, vm_id, owner, agent, ttl, token, confirmed.version, confirmed.until,
                process, renewed_at=began)


def _busy(vm_id: int, state: LeaseState | None, now: float) -> str:
    if state is None:
        return f"VM {vm_id}'s lease was taken by another agent at the same time"
    left = max(0.0, state.until - now)
    why = f" ({state.problem})" if state.problem else ""
    return (f"VM {vm_id} is being backed up by {_who(state)}: its lease runs {left:.0f}s more"
            f"{why}; it is taken over if that agent stops renewing it")


class Heartbeat:
    """Renew `held` every `ttl / 3` on a thread until `stop`; when a
    renewal finds the lease gone, set `cancel` (the job stops and cleans
    up). A renewal that fails for another reason (the repository is
    unreachable) is retried at the next beat, unless the lease may expire
    before it: then the lease counts as lost and `cancel` is set, so this
    agent has stopped before another can take the VM over. Entering renews
    the lease once (LeaseLost, `cancel` set, when it ran out and was taken
    since it was acquired): the work starts under a fresh lease."""

    def __init__(self, held: Held, cancel: threading.Event,
                 also: threading.Event | None = None) -> None:
        self.held, self.cancel, self.also = held, cancel, also
        self._stop = threading.Event()
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"lease-vm-{held.vm_id}",
                                        daemon=True)

    def __enter__(self) -> Heartbeat:
        try:
            self.held.renew()
        except LeaseLost:
            self.cancel.set()
            raise
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = max(self.held.ttl / 3, 0.05)
        tick = min(interval, 0.1)
        waited = 0.0
        # Each renewal runs on its own thread, so one that hangs (a hard NFS
        # mount, an S3 endpoint that never answers) cannot keep this one from
        # giving the lease up in time.
        renewal: threading.Thread | None = None
        failed: list[BaseException] = []
        while not self._stop.wait(tick):
            if self.also is not None and self.also.is_set():
                self.cancel.set()   # the agent is shutting down: pass it on
            late = time.monotonic() - self.held.renewed_at + interval >= self.held.ttl
            if renewal is not None and renewal.is_alive():
                if late:
                    self._give_up("a renewal has not answered")
                    return
                continue
            if renewal is not None:
                renewal = None
                error = failed.pop() if failed else None
                if isinstance(error, LeaseLost):
                    self.cancel.set()
                    return
                if isinstance(error, OnebackError):
                    self.errors.append(error.message)
                    if late:
                        self._give_up(error.message)
                        return
            waited += tick
            if waited < interval:
                continue
            waited = 0.0
            renewal = threading.Thread(target=self._renew, args=(failed,), daemon=True,
                                       name=f"lease-renew-vm-{self.held.vm_id}")
            renewal.start()

    def _renew(self, failed: list[BaseException]) -> None:
        try:
            self.held.renew()
        except OnebackError as e:
            failed.append(e)

    def _give_up(self, why: str) -> None:
        self.held.give_up(why)
        self.cancel.set()


@contextmanager
def holding(store: object, vm_id: int, owner: str, ttl: float, cancel: threading.Event, *,
            agent: str = "", process: str = "") -> Iterator[Held | None]:
    """Hold VM `vm_id`'s lease around a backup: acquired (LeaseBusy when
    another agent has it), renewed by a `Heartbeat` that sets `cancel` when
    it is lost, released at the end. None (no lease) for a store without
    leases."""
    if not isinstance(store, LeaseStore):
        yield None
        return
    held = acquire(store, vm_id, owner, ttl, agent=agent, process=process)
    try:
        with Heartbeat(held, cancel):
            yield held
    finally:
        held.release()


def live_processes(store: object, default_ttl: float) -> set[str]:
    """The processes (of any agent) holding a lease now: their cloud objects
    are in use, whichever catalog journaled them."""
    if not isinstance(store, LeaseStore):
        return set()
    now = store.lease_now()
    live = set()
    for name in store.lease_names():
        if not name.startswith("vm-") or not name[3:].isdigit():
            continue
        stored = store.lease_get(name)
        if stored is None:
            continue
        state = parse(int(name[3:]), stored, now, default_ttl)
        if state.held_at(now) and state.process:
            live.add(state.process)
    return live
