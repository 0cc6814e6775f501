"""The keep rules (agent/retention.py): restic's `forget` semantics, buckets in
UTC, on a fixed clock (no I/O); and the policy's text form (ONEBACK_KEEP)."""

from __future__ import annotations

import calendar
import time

import pytest

from agent.errors import UsageError
from agent.retention import KeepPolicy, apply, parse


def at(text: str) -> float:
    """'2026-03-01 10:30' UTC as a timestamp."""
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


def kept(policy: KeepPolicy, backups: list[tuple[int, str]]) -> list[int]:
    return sorted(d.backup_id for d in apply(policy, [(b, at(t)) for b, t in backups])
                  if d.keep)


# Two or three backups a day over a few days around a month and ISO-week boundary.
SERIES = [
    (1, "2026-01-28 09:00"), (2, "2026-01-28 21:00"),     # Wed, week 5
    (3, "2026-01-30 09:00"),                              # Fri
    (4, "2026-02-01 09:00"), (5, "2026-02-01 09:40"),     # Sun, still week 5; February
    (6, "2026-02-02 09:00"), (7, "2026-02-02 10:00"),     # Mon, week 6
    (8, "2026-02-02 10:30"),
]


def test_keep_last_keeps_the_n_newest() -> None:
    assert kept(KeepPolicy(last=3), SERIES) == [6, 7, 8]
    assert kept(KeepPolicy(last=100), SERIES) == list(range(1, 9))


def test_daily_keeps_the_newest_of_each_of_the_last_n_days_that_have_a_backup() -> None:
    # days without a backup (Jan 29, 31) do not count, as in restic
    assert kept(KeepPolicy(daily=3), SERIES) == [3, 5, 8]
    assert kept(KeepPolicy(daily=10), SERIES) == [2, 3, 5, 8]


def test_hourly_weekly_monthly_yearly_buckets() -> None:
    assert kept(KeepPolicy(hourly=2), SERIES) == [6, 8]   # 10h holds 7 and 8: 8 is newer
    assert kept(KeepPolicy(weekly=2), SERIES) == [5, 8]          # ISO weeks: Sunday ends one
    assert kept(KeepPolicy(monthly=2), SERIES) == [3, 8]
    assert kept(KeepPolicy(yearly=5), SERIES + [(9, "2025-12-31 23:59")]) == [8, 9]


def test_a_backup_is_kept_if_any_rule_keeps_it_and_says_why() -> None:
    decisions = apply(KeepPolicy(last=1, daily=2, monthly=2),
                      [(b, at(t)) for b, t in SERIES])
    assert [d.backup_id for d in decisions] == [8, 7, 6, 5, 4, 3, 2, 1]   # newest first
    why = {d.backup_id: d.reasons for d in decisions}
    assert why[8] == ("last", "daily 2026-02-02", "monthly 2026-02")
    assert why[5] == ("daily 2026-02-01",)
    assert why[3] == ("monthly 2026-01",)
    assert [d.backup_id for d in decisions if not d.keep] == [7, 6, 4, 2, 1]


def test_an_empty_policy_keeps_everything_and_ties_order_by_id() -> None:
    assert kept(KeepPolicy(), SERIES) == list(range(1, 9))
    same = [(1, "2026-01-01 00:00"), (2, "2026-01-01 00:00")]
    assert kept(KeepPolicy(last=1), same) == [2]
    assert kept(KeepPolicy(daily=1), same) == [2]


def test_buckets_are_utc_whatever_the_local_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")   # UTC+14: local days differ
    time.tzset()
    try:
        assert kept(KeepPolicy(daily=3), SERIES) == [3, 5, 8]
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize(("text", "policy"), [
    ("7", KeepPolicy(last=7)),
    (" 7 ", KeepPolicy(last=7)),
    ("daily=7,weekly=4,monthly=6", KeepPolicy(daily=7, weekly=4, monthly=6)),
    ("Last=2, yearly=1", KeepPolicy(last=2, yearly=1)),
    ("hourly=24,daily=0", KeepPolicy(hourly=24)),
])
def test_parse_accepts_a_number_or_rules(text: str, policy: KeepPolicy) -> None:
    assert parse(text) == policy
    assert parse(policy.text()) == policy


@pytest.mark.parametrize(("text", "says"), [
    ("0", "forget them all"),
    ("-3", "daily=7,weekly=4,monthly=6"),
    ("seven", "daily=7,weekly=4,monthly=6"),
    ("fortnightly=2", "rules: last, hourly, daily, weekly, monthly, yearly"),
    ("daily=x", "daily=7"),
    ("daily=1,daily=2", "daily is given twice"),
    ("daily=0,weekly=0", "every rule is 0"),
    ("", "daily=7"),
])
def test_parse_refuses_bad_text_in_one_line_naming_the_tag(text: str, says: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(text)
    assert e.value.message.startswith("ONEBACK_KEEP is ")
    assert says in e.value.message and "\n" not in e.value.message
