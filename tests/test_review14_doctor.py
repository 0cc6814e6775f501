"""Hostile review of issue 14's doctor: agent.clusters listing a cluster the
proxy VM does not run in. oned attaches an image only when its datastore's
clusters hold the cluster of the VM it is attached to (the proxy's, the CID
of its last history record: VirtualMachineDisks::set_up_attach,
src/vm/VirtualMachineDisk.cc), so the agent would take VMs there for its own
and every backup of them would fail at the attach."""

from __future__ import annotations

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
