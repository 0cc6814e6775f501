"""How oneback looks again at an object OpenNebula is still settling: soon at
first (most operations settle in well under a second), then less often, never
less often than `opennebula.poll_interval`. Checked on the schedule itself, not
by timing, and on the real wait against onesim."""

from __future__ import annotations

from itertools import islice

from agent.cloud import POLL_FIRST, Cloud, poll_pauses
from tests.onesim.simulator import Simulator


def test_pauses_start_short_and_double_up_to_the_poll_interval() -> None:
    pauses = list(islice(poll_pauses(0.5), 10))
    assert pauses[0] == POLL_FIRST < 0.5
    assert all(b == min(2 * a, 0.5) for a, b in zip(pauses, pauses[1:], strict=False))
    assert pauses[-1] == 0.5 and max(pauses) == 0.5
    # within the first second of an operation it is looked at several times
    looks, waited = 0, 0.0
    for p in poll_pauses(0.5):
        if waited + p > 1.0:
            break
        waited, looks = waited + p, looks + 1
    assert looks >= 5


def test_a_poll_interval_below_the_first_pause_is_kept() -> None:
    assert list(islice(poll_pauses(0.005), 3)) == [0.005, 0.005, 0.005]


def test_a_real_wait_returns_once_the_vm_has_settled(onesim: Simulator) -> None:
    one = Cloud(onesim.endpoint, onesim.credentials, poll_interval=30.0,
                operation_timeout=20.0)
    probes: list[int] = []

    def probe() -> int | None:
        probes.append(1)
        return one.version()[0] if len(probes) >= 3 else None

    assert one._wait("three looks", probe) >= 5
    assert len(probes) == 3
