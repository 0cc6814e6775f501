"""The agent's durable job queue, part of the catalog.

Owns: enqueueing (events for the same VM collapse into one queued job per
kind), claiming (a due job of a VM that has no running job, up to a global limit,
taking turns between VM owners so that one owner's hundred VMs do not starve
another's one), finishing, failing with a retry time, and recovering jobs
whose owner died. Must not: decide what work is due (policy does) or run it
(the daemon does).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from agent.model import Backoff, Job

_COLUMNS = ("id, vm_id, kind, params, state, reason, attempts, not_before, owner, created,"
            " updated, result, error, uid")


def _readable(rows: list[tuple[Any, ...]]) -> list[Job]:
    """The rows that can be read (job_claim fails the others when it meets them)."""
    out = []
    for r in rows:
        try:
            out.append(_job(r))
        except (ValueError, TypeError, AttributeError):
            continue
    return out


def _job(r: tuple[Any, ...]) -> Job:
    return Job(int(r[0]), int(r[1]), str(r[2]), json.loads(str(r[3])), str(r[4]), str(r[5]),
               int(r[6]), float(r[7]), None if r[8] is None else str(r[8]), float(r[9]),
               float(r[10]), str(r[11]), str(r[12]), None if r[13] is None else int(r[13]))


class JobQueue:
    """Mixed into Catalog: uses its serialised, error-translating `_guard`."""

    _guard: Callable[..., AbstractContextManager[sqlite3.Connection]]

    def job_enqueue(self, vm_id: int, kind: str, reason: str,
                    params: Mapping[str, str] | None = None,
                    now: float | None = None, uid: int | None = None) -> tuple[Job, bool]:
        """Queue a job, or collapse into the one already queued or running
        for this VM and kind (a running job is doing the work that is due).
        `uid` is the VM owner's. Returns (that job, whether it is new)."""
        now = time.time() if now is None else now
        with self._guard("queueing a job", write=True) as conn:
            running = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE vm_id = ? AND kind = ?"
                                   " AND state = 'running'", (vm_id, kind)).fetchone()
            if running is not None:
                return _job(running), False
            cur = conn.execute(
                "INSERT INTO jobs (vm_id, kind, params, state, reason, created, updated, uid)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (vm_id, kind, json.dumps(dict(params or {}), sort_keys=True), reason, now, now,
                 uid))
            new = cur.rowcount == 1
            if not new and params:
                conn.execute("UPDATE jobs SET params = ? WHERE vm_id = ? AND kind = ?"
                             " AND state = 'queued'",
                             (json.dumps(dict(params), sort_keys=True), vm_id, kind))
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE vm_id = ? AND kind = ?"
                               " AND state = 'queued'", (vm_id, kind)).fetchone()
        return _job(row), new

    def job_claim(self, owner: str, limit: int, now: float | None = None) -> Job | None:
        """Take a due job whose VM has no running job, if fewer than `limit`
        jobs run. Fair between VM owners (uid): the owner with the fewest
        running jobs goes first, then the one served longest ago; within an
        owner, the oldest due job. Durable on return. A job row that cannot
        be read (written by a broken or newer oneback) is marked failed and
        skipped, never left running."""
        now = time.time() if now is None else now
        with self._guard("claiming a job", write=True) as conn:
            running = conn.execute("SELECT count(*) FROM jobs WHERE state = 'running'"
                                   ).fetchone()[0]
            if running >= limit:
                return None
            while True:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs j WHERE state = 'queued' AND not_before <= ?"
                    " AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.vm_id = j.vm_id"
                    " AND r.state = 'running')"
                    " ORDER BY (SELECT count(*) FROM jobs r WHERE r.state = 'running'"
                    "           AND r.uid IS j.uid),"
                    "          (SELECT coalesce(max(c.claimed), 0) FROM jobs c"
                    "           WHERE c.uid IS j.uid),"
                    "          not_before, id LIMIT 1", (now,)).fetchone()
                if row is None:
                    return None
                conn.execute("UPDATE jobs SET state = 'running', owner = ?,"
                             " attempts = attempts + 1, updated = ?, claimed = ? WHERE id = ?",
                             (owner, now, now, row[0]))
                row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?",
                                   (row[0],)).fetchone()
                try:
                    return _job(row)
                except (ValueError, TypeError, AttributeError) as e:
                    conn.execute("UPDATE jobs SET state = 'failed', owner = NULL, updated = ?,"
                                 " params = '{}', error = ? WHERE id = ?",
                                 (now, f"unreadable job row: {type(e).__name__}: {e}"[:500],
                                  row[0]))

    def job_finish(self, job_id: int, result: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._guard("finishing a job", write=True) as conn:
            conn.execute("UPDATE jobs SET state = 'done', result = ?, error = '', owner = NULL,"
                         " updated = ? WHERE id = ?", (result, now, job_id))

    def job_fail(self, job_id: int, error: str, retry_at: float | None,
                 now: float | None = None) -> None:
        """Record a failure; with `retry_at`, queue the job again for then
        (unless a newer request for the same work is already queued)."""
        now = time.time() if now is None else now
        with self._guard("failing a job", write=True) as conn:
            if retry_at is not None:
                try:
                    conn.execute("UPDATE jobs SET state = 'queued', error = ?, owner = NULL,"
                                 " not_before = ?, updated = ? WHERE id = ?",
                                 (error, retry_at, now, job_id))
                    return
                except sqlite3.IntegrityError:
                    pass  # another request is queued: it will do the work
            conn.execute("UPDATE jobs SET state = 'failed', error = ?, owner = NULL,"
                         " updated = ? WHERE id = ?", (error, now, job_id))

    def jobs_recover(self, alive: Callable[[str], bool], now: float | None = None) -> int:
        """Requeue running jobs whose owner is gone (a crash or SIGKILL)."""
        now = time.time() if now is None else now
        with self._guard("recovering jobs", write=True) as conn:
            rows = conn.execute("SELECT id, owner, vm_id, kind FROM jobs"
                                " WHERE state = 'running'").fetchall()
            recovered = 0
            for job_id, owner, vm_id, kind in rows:
                if owner and alive(owner):
                    continue
                queued = conn.execute("SELECT 1 FROM jobs WHERE vm_id = ? AND kind = ?"
                                      " AND state = 'queued'", (vm_id, kind)).fetchone()
                if queued:
                    conn.execute("UPDATE jobs SET state = 'failed', owner = NULL, error ="
                                 " 'interrupted; merged into the queued job', updated = ?"
                                 " WHERE id = ?", (now, job_id))
                else:
                    conn.execute("UPDATE jobs SET state = 'queued', owner = NULL, updated = ?"
                                 " WHERE id = ?", (now, job_id))
                recovered += 1
        return recovered

    def jobs(self, states: tuple[str, ...] = ("queued", "running"),
             limit: int = 100) -> list[Job]:
        """Jobs in these states, newest first."""
        marks = ",".join("?" * len(states))
        with self._guard("listing jobs") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks})"
                                " ORDER BY id DESC LIMIT ?", (*states, limit)).fetchall()
        return _readable(rows)

    def job_queue_stats(self) -> tuple[int, int, float | None]:
        """(queued jobs, running jobs, when the oldest queued job was created
        or None): the queue at a glance, for the metrics."""
        with self._guard("reading the job queue") as conn:
            queued, oldest = conn.execute("SELECT count(*), min(created) FROM jobs"
                                          " WHERE state = 'queued'").fetchone()
            running = conn.execute("SELECT count(*) FROM jobs WHERE state = 'running'"
                                   ).fetchone()[0]
        return int(queued), int(running), None if oldest is None else float(oldest)

    def iter_last_jobs(self, vm_id: int, kind: str) -> Iterator[Job]:
        with self._guard("reading jobs") as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE vm_id = ? AND kind = ?"
                                " ORDER BY id DESC LIMIT 5", (vm_id, kind)).fetchall()
        return iter(_readable(rows))

    # -- hook nonces ------------------------------------------------------------

    def nonce_use(self, nonce: str, now: float, forget_before: float) -> bool:
        """Record a hook request's nonce; False if it was seen before (a
        replay, also across restarts). Forgets nonces seen before `forget_before`."""
        with self._guard("recording a hook nonce", write=True) as conn:
            conn.execute("DELETE FROM nonces WHERE seen < ?", (forget_before,))
            cur = conn.execute("INSERT INTO nonces (nonce, seen) VALUES (?, ?)"
                               " ON CONFLICT DO NOTHING", (nonce, now))
            return cur.rowcount == 1

    # -- what keeps failing ----------------------------------------------------

    def backoff_fail(self, key: str, what: str, error: str, *, vm_id: int | None, base: float,
                     cap: float, now: float | None = None) -> Backoff:
        """Record one more failure of `key`: the next try is `base` seconds
        after it, doubled for each failure in a row, at most `cap`."""
        now = time.time() if now is None else now
        with self._guard("recording a failure", write=True) as conn:
            row = conn.execute("SELECT failures, first_failed FROM backoff WHERE key = ?",
                               (key,)).fetchone()
            failures = 1 if row is None else int(row[0]) + 1
            first = now if row is None else float(row[1])
            delay = min(cap, base * 2 ** min(failures - 1, 40))
            conn.execute(
                "INSERT INTO backoff (key, vm_id, what, failures, error, first_failed,"
                " last_failed, next_try) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET failures = excluded.failures,"
                " error = excluded.error, what = excluded.what,"
                " last_failed = excluded.last_failed, next_try = excluded.next_try",
                (key, vm_id, what, failures, error[:1000], first, now, now + delay))
        return Backoff(key, vm_id, what, failures, error[:1000], first, now, now + delay)

    def backoff_clear(self, key: str) -> bool:
        """It worked: forget its failures. True if there were any."""
        with self._guard("clearing a failure", write=True) as conn:
            return conn.execute("DELETE FROM backoff WHERE key = ?", (key,)).rowcount > 0

    def backoffs(self) -> list[Backoff]:
        """Everything that is failing, soonest retry first."""
        with self._guard("reading failures") as conn:
            rows = conn.execute("SELECT key, vm_id, what, failures, error, first_failed,"
                                " last_failed, next_try FROM backoff ORDER BY next_try, key"
                                ).fetchall()
        return [Backoff(str(r[0]), None if r[1] is None else int(r[1]), str(r[2]), int(r[3]),
                        str(r[4]), float(r[5]), float(r[6]), float(r[7])) for r in rows]
