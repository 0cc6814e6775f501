"""Hostile review of issue 14's doctor: agent.clusters listing a cluster the
proxy VM does not run in. oned attaches an image only when its datastore's
clusters hold the cluster of the VM it is attached to (the proxy's, the CID
of its last history record: VirtualMachineDisks::set_up_attach,
src/vm/VirtualMachineDisk.cc), so the agent would take VMs there for its own
and every backup of them would fail at the attach."""

from __future__ import annotations

import os

from tests.agentkit import Cloud, cloud  # noqa: F401  (the fixture)
from tests.test_doctor import doctor, good_setup


def test_doctor_warns_of_agent_clusters_the_proxy_does_not_run_in(
        cloud: Cloud) -> None:  # noqa: F811
    good_setup(cloud)
    _, checks = doctor(cloud)
    assert checks["proxy VM"]["status"] == "ok", checks["proxy VM"]
    text = cloud.config.read_text()
    cloud.config.write_text(text.replace("reconcile_interval = 60",
                                         "reconcile_interval = 60\nclusters = [0, 5]"))
    _, checks = doctor(cloud)
    check = checks["proxy VM"]
    assert check["status"] == "warn", check
    assert "agent.clusters" in check["message"] and "5" in check["message"], check
    cloud.config.write_text(text.replace("reconcile_interval = 60",
                                         "reconcile_interval = 60\nclusters = [0]"))
    _, checks = doctor(cloud)
    assert checks["proxy VM"]["status"] == "ok", checks["proxy VM"]


def test_doctor_warns_when_the_repository_belongs_to_another_uid(
        cloud: Cloud) -> None:  # noqa: F811
    """Several proxies share one repository; each install made its own
    system user `oneback`, whose uid may differ. The agent writes with umask
    077 (chunks 0400, directories 0700): what one agent wrote the others can
    neither read nor touch, and their backups fail. doctor must say so."""
    good_setup(cloud)
    repo = cloud.tmp / "repo"
    _, checks = doctor(cloud)
    assert checks["repository"]["status"] == "ok", checks["repository"]
    os.chown(repo, 12345, 12345)
    try:
        _, checks = doctor(cloud)
    finally:
        os.chown(repo, os.geteuid(), os.getegid())
    check = checks["repository"]
    assert check["status"] == "warn", check
    assert "uid 12345" in check["message"] and "same uid" in check["message"], check
