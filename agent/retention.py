"""Retention: which backups a keep policy keeps. Pure logic, no I/O.

Owns: the keep rules (restic's `forget` semantics) and the policy's text form.
A backup is kept if any rule keeps it. `last=N` keeps the N newest backups;
`hourly=N` (daily, weekly, monthly, yearly likewise) walks the backups newest
first and keeps the newest backup of each bucket (hour, day, ISO week, month,
year) until N buckets have one. Buckets are in UTC (`started` of a backup),
so a policy means the same on every proxy whatever its time zone, and a
daylight-saving change never makes a day of 23 or 25 hours. An empty policy
keeps everything. Must not: read clocks, files, the catalog or the config.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

from agent.errors import UsageError

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_MAX = 1_000_000


@dataclass(frozen=True)
class KeepPolicy:
    """How many of each to keep; 0 means the rule is off."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX:
                raise UsageError(f"keep {f.name} is {value!r}: it must be a number from 0 to"
                                 f" {_MAX}")

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))

    def text(self) -> str:
        """`daily=7,weekly=4` (the form `parse` reads)."""
        return ",".join(f"{r}={getattr(self, r)}" for r in RULES if getattr(self, r))


def parse(text: str, what: str = "ONEBACK_KEEP") -> KeepPolicy:
    """`"7"` keeps the last 7; `"daily=7,weekly=4,monthly=6"` (also `last=3`).
    UsageError names `what` and the fix."""
    value = text.strip()
    if re.fullmatch(r"[0-9]{1,7}", value):
        if int(value) == 0:
            raise UsageError(f"{what} is {value!r}: keeping 0 backups would forget them all;"
                             " give a positive number, or rules like daily=7,weekly=4")
        return KeepPolicy(last=int(value))
    counts: dict[str, int] = {}
    for part in value.split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*=\s*([0-9]{1,7})\s*", part.lower())
        if m is None or m.group(1) not in RULES:
            raise UsageError(
                f"{what} is {text[:80]!r}: write a number of backups (7) or rules like"
                f" daily=7,weekly=4,monthly=6 (rules: {', '.join(RULES)})")
        if m.group(1) in counts:
            raise UsageError(f"{what} is {text[:80]!r}: {m.group(1)} is given twice")
        counts[m.group(1)] = int(m.group(2))
    policy = KeepPolicy(**counts)
    if policy.empty:
        raise UsageError(f"{what} is {text[:80]!r}: every rule is 0, which would forget every"
                         " backup; give at least one positive count")
    return policy


def _bucket(fmt: str) -> Callable[[float], str]:
    def key(t: float) -> str:
        return time.strftime(fmt, time.gmtime(t))
    return key


def _week(t: float) -> str:
    iso = datetime.datetime.fromtimestamp(t, datetime.UTC).isocalendar()
    return f"{iso.year:04d}-W{iso.week:02d}"


_BUCKETS: dict[str, Callable[[float], str]] = {
    "hourly": _bucket("%Y-%m-%dT%H"),
    "daily": _bucket("%Y-%m-%d"),
    "weekly": _week,
    "monthly": _bucket("%Y-%m"),
    "yearly": _bucket("%Y"),
}


@dataclass(frozen=True)
class Decision:
    """One backup and why it stays (empty `reasons`: it is forgotten)."""

    backup_id: int
    started: float
    reasons: tuple[str, ...]

    @property
    def keep(self) -> bool:
        return bool(self.reasons)


def apply(policy: KeepPolicy, backups: Iterable[tuple[int, float]]) -> list[Decision]:
    """Decide for each (backup id, started) of ONE VM, newest first in the
    result. Ties on `started` are ordered by id (the later id is newer). An
    empty policy keeps everything."""
    ordered: Sequence[tuple[int, float]] = sorted(backups, key=lambda b: (b[1], b[0]),
                                                  reverse=True)
    reasons: dict[int, list[str]] = {b: [] for b, _ in ordered}
    if policy.empty:
        for b, _ in ordered:
            reasons[b].append("no policy")
    for b, _ in ordered[:policy.last]:
        reasons[b].append("last")
    for rule, key in _BUCKETS.items():
        n = getattr(policy, rule)
        seen: set[str] = set()
        for b, started in ordered:
            if len(seen) >= n:
                break
            bucket = key(started)
            if bucket not in seen:
                seen.add(bucket)
                reasons[b].append(f"{rule} {bucket}")
    return [Decision(b, s, tuple(reasons[b])) for b, s in ordered]
