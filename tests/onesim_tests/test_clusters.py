"""Clusters, hosts and datastores per cluster: the documents, the scheduler
placing a VM in the cluster its images are in, and one.vm.attach refusing
an image of a datastore outside the VM's cluster, as oned does
(VirtualMachineDisks::set_up_attach)."""

from __future__ import annotations

import xmlrpc.client
from typing import Any

from tests.onesim import Simulator
from tests.onesim.testing import (
    create_cluster,
    create_datablock,
    create_proxy_vm,
    shared_dir,
    wait_vm,
    xsd_errors,
)


def raw(sim: Simulator) -> Any:
    return xmlrpc.client.ServerProxy(sim.endpoint)


def test_a_fresh_cloud_has_the_default_cluster(onesim: Simulator) -> None:
    ok, body, *_ = raw(onesim).one.cluster.info(onesim.credentials, 0)
    assert ok
    assert body == ("<CLUSTER><ID>0</ID><NAME>default</NAME><HOSTS><ID>0</ID></HOSTS>"
                    "<DATASTORES><ID>0</ID><ID>1</ID><ID>2</ID></DATASTORES><VNETS></VNETS>"
                    "<TEMPLATE></TEMPLATE></CLUSTER>")


def test_clusters_hosts_and_datastores(onesim: Simulator, one: Any) -> None:
    cid, hid, ds = create_cluster(one, "east")
    assert cid == 100   # ClusterPool: user clusters start at 100
    cluster = raw(onesim).one.cluster.info(onesim.credentials, cid)[1]
    assert f"<HOSTS><ID>{hid}</ID></HOSTS>" in cluster
    assert f"<DATASTORES><ID>0</ID><ID>{ds}</ID></DATASTORES>" in cluster
    pool = raw(onesim).one.clusterpool.info(onesim.credentials)[1]
    assert pool.startswith("<CLUSTER_POOL><CLUSTER><ID>100</ID>")
    dsdoc = raw(onesim).one.datastore.info(onesim.credentials, ds)[1]
    assert f"<CLUSTERS><ID>{cid}</ID></CLUSTERS>" in dsdoc
    system = raw(onesim).one.datastore.info(onesim.credentials, 0)[1]
    assert f"<CLUSTERS><ID>0</ID><ID>{cid}</ID></CLUSTERS>" in system
    host = raw(onesim).one.host.info(onesim.credentials, hid)[1]
    assert f"<CLUSTER_ID>{cid}</CLUSTER_ID><CLUSTER>east</CLUSTER>" in host
    if shared_dir() is not None:
        assert xsd_errors(cluster, "cluster.xsd") == []
        assert xsd_errors(pool, "cluster_pool.xsd") == []
        assert xsd_errors(host, "host.xsd") == []
    # a datastore leaves a cluster; the host goes back to the default one
    one.cluster.deldatastore(cid, 0)
    one.cluster.delhost(cid, hid)
    cluster = raw(onesim).one.cluster.info(onesim.credentials, cid)[1]
    assert f"<HOSTS></HOSTS><DATASTORES><ID>{ds}</ID></DATASTORES>" in cluster
    # oned's refusals
    assert raw(onesim).one.cluster.allocate(onesim.credentials, "east")[:3] == [
        False, "[one.cluster.allocate] Error allocating a new cluster. NAME is already taken by"
        " CLUSTER 100.", 0x4000]
    assert raw(onesim).one.cluster.info(onesim.credentials, 7)[:3] == [
        False, "[one.cluster.info] Error getting cluster [7].", 0x400]


def test_a_vm_runs_in_the_cluster_of_its_images(onesim: Simulator, one: Any) -> None:
    cid, hid, ds = create_cluster(one, "east")
    vm = create_proxy_vm(one, onesim, "in-east", ds=ds)
    info = one.vm.info(vm)
    last = info.HISTORY_RECORDS.HISTORY[-1]
    assert (last.HID, last.CID) == (hid, cid)
    assert info.TEMPLATE["AUTOMATIC_REQUIREMENTS"] == (
        f"(CLUSTER_ID = {cid}) & !(PIN_POLICY = PINNED)")
    home = create_proxy_vm(one, onesim, "in-default")
    last = one.vm.info(home).HISTORY_RECORDS.HISTORY[-1]
    assert (last.HID, last.CID) == (0, 0)


def test_attach_refuses_an_image_its_cluster_cannot_reach(onesim: Simulator, one: Any) -> None:
    cid, hid, ds = create_cluster(one, "east")
    vm = create_proxy_vm(one, onesim, "in-east", ds=ds)
    elsewhere = create_datablock(one, "default-ds-disk", 1)   # datastore 1: cluster 0
    answer = raw(onesim).one.vm.attach(onesim.credentials, vm,
                                       f'DISK=[IMAGE_ID="{elsewhere}"]')
    assert answer[:3] == [False, f"[one.vm.attach] Image [{elsewhere}] is not part of "
                                 f"cluster [{cid}]", 0x800]
    wait_vm(one, vm, "ACTIVE", "RUNNING")
    assert one.image.info(elsewhere).STATE == 1     # released: READY again
    assert len(one.vm.info(vm).TEMPLATE["DISK"] if isinstance(
        one.vm.info(vm).TEMPLATE["DISK"], list) else [1]) == 1
    # reachable once its datastore joins the cluster
    one.cluster.adddatastore(cid, 1)
    one.vm.attach(vm, f'DISK=[IMAGE_ID="{elsewhere}"]')
    wait_vm(one, vm, "ACTIVE", "RUNNING")
    assert one.image.info(elsewhere).STATE == 2     # USED
