"""Hostile review of issue 14's placement: a datastore in no cluster.

oned's Datastore::disk_attribute (src/datastore/Datastore.cc) sets a disk's
CLUSTER_ID to the datastore's clusters joined by commas; for a datastore that
was taken out of every cluster (`onecluster deldatastore`) that is "", and
VirtualMachineDisks::set_up_attach (src/vm/VirtualMachineDisk.cc) checks the
cluster only `if (!disk_cluster_ids.empty())`: any proxy attaches its images.
So every agent serves such a VM; none may call it "not served here"."""

from __future__ import annotations

from tests.agentkit import pattern
from tests.agentproc import AgentProcess, agent_config
from tests.onesim.testing import create_image, create_vm
from tests.test_multi_agent import DISK, World, world  # noqa: F401  (the fixture)


def test_a_vm_on_a_datastore_in_no_cluster_is_served(world: World) -> None:  # noqa: F811
    w, one = world, world.one
    ds = int(one.datastore.allocate(
        'NAME="nowhere"\nTYPE="IMAGE_DS"\nDS_MAD="fs"\nTM_MAD="local"', 0))
    one.cluster.deldatastore(0, ds)
    assert one.datastore.info(ds).CLUSTERS.ID == []
    img = create_image(one, w.sim, "nowhere-0", pattern(DISK, 7), ds=ds)
    vm = create_vm(one, w.sim, "nowhere", [img])
    agent_config(w.a, reconcile=0.5)
    a = AgentProcess(w.a)
    try:
        a.wait_event("agent.started")
        one.vm.update(vm, 'ONEBACK="yes"', 1)
        done = a.wait_event("job.done", timeout=30, where=lambda x: x.get("vm_id") == vm)
        assert "backup_id" in str(done.get("result")), done
        assert not [x for x in a.events("vm.not_served") if x.get("vm_id") == vm]
    finally:
        a.stop()
    assert w.a.leftovers() == []
