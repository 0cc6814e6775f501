"""Hostile review of issue 14's configuration: TOML allows `nan` and `inf`.
`agent.lease_time = nan` passed the 1..3600 check (every comparison with
NaN is false), so leases were written with a NaN lease time (read back as
garbled and free at once: any agent took the VM over) and the heartbeat
waited NaN seconds; `reconcile_interval = nan` never reconciled. A number
that is not finite is refused in one line."""

from __future__ import annotations

import pytest

from tests.agentkit import Cloud, cloud  # noqa: F401  (the fixture)


@pytest.mark.parametrize("line", ["lease_time = nan", "sync_interval = nan",
                                  "reconcile_interval = nan", "sync_interval = inf"])
def test_a_number_that_is_not_finite_is_refused(cloud: Cloud, line: str) -> None:  # noqa: F811
    text = cloud.config.read_text()
    cloud.config.write_text(text + f"\n[agent]\n{line}\n")
    r = cloud.call("list", "--json")
    key = line.split(" ")[0]
    assert r.code == 3, (r.code, r.out, r.err)
    assert f"agent.{key}" in r.err and "Traceback" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err
