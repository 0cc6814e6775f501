"""one.cluster.*, one.clusterpool.info and one.host.allocate.

Owns: clusters (src/rm/api/ClusterAPI.cc, src/cluster/Cluster.cc): their
documents (HOSTS, DATASTORES, VNETS as oned lists them), allocating one
(ids from 100, ClusterPool's set_lastOID(99)), moving a host into one
(AddHost: a host is in exactly one cluster, DelHost moves it back to the
default cluster 0, the VMs on it take the new CID in their last history
record) and adding or removing a datastore (AddDatastore/DelDatastore: a
datastore is in any number of clusters, its CLUSTERS list), and hosts
(HostAllocateAPI::allocate: cluster -1 is the default cluster 0).
Must not: touch VMs beyond their history's CID, or images.
"""

from __future__ import annotations

from tests.onesim.auth import ADMIN, CREATE, Check, authorize
from tests.onesim.constants import ErrorCode
from tests.onesim.dispatch import Ctx, method
from tests.onesim.documents import cluster_xml, pool_xml
from tests.onesim.model import Cluster
from tests.onesim.oned import Oned, OneError, no_exists

DEFAULT_CLUSTER_ID = 0


def _admin(ctx: Ctx, obj: str, oid: int) -> None:
    authorize(ctx.caller, Check(ADMIN, obj, oid, 0, 0, None))


def cluster_doc(core: Oned, cluster: Cluster) -> str:
    hosts = sorted(h.id for h in core.store.hosts.values() if h.cluster_id == cluster.id)
    datastores = sorted(d.id for d in core.store.datastores.values()
                        if cluster.id in d.cluster_ids)
    return cluster_xml(cluster, hosts, datastores)


@method("one.cluster.allocate", "s", obj="CLUSTER")
def cluster_allocate(core: Oned, ctx: Ctx, name: str) -> int:
    authorize(ctx.caller, Check(CREATE, "CLUSTER"))
    if not name:
        raise OneError(ErrorCode.ALLOCATE, "Invalid NAME, it cannot be empty")
    for other in core.store.clusters.values():
        if other.name == name:
            raise OneError(ErrorCode.ALLOCATE, f"NAME is already taken by CLUSTER {other.id}.")
    cid = core.store.next_id("clusters")
    core.store.clusters[cid] = Cluster(cid, name)
    ctx.extra_xml = cluster_doc(core, core.store.clusters[cid])
    return cid


@method("one.cluster.info", "ib", 1, obj="CLUSTER", info=True)
def cluster_info(core: Oned, ctx: Ctx, cid: int, decrypt: bool = False) -> str:
    return cluster_doc(core, core.cluster(cid))


@method("one.clusterpool.info", "", obj="CLUSTER", info=True)
def clusterpool_info(core: Oned, ctx: Ctx) -> str:
    clusters = sorted(core.store.clusters.values(), key=lambda c: c.id, reverse=True)
    return pool_xml("CLUSTER_POOL", [cluster_doc(core, c) for c in clusters])


@method("one.cluster.addhost", "ii", obj="CLUSTER")
def cluster_addhost(core: Oned, ctx: Ctx, cid: int, hid: int) -> int:
    """ClusterAPI::AddHost: the host leaves its old cluster; VMs running on
    it get the new cluster id in their last history record (vm->set_cid)."""
    cluster = core.cluster(cid)
    host = core.store.hosts.get(hid)
    if host is None:
        raise no_exists("HOST", hid)
    _admin(ctx, "CLUSTER", cid)
    if host.cluster_id == cid:
        return cid
    host.cluster_id, host.cluster = cid, cluster.name
    for vm in core.store.vms.values():
        if vm.history and vm.history[-1].hid == hid:
            vm.history[-1].cid = cid
    return cid


@method("one.cluster.delhost", "ii", obj="CLUSTER")
def cluster_delhost(core: Oned, ctx: Ctx, cid: int, hid: int) -> int:
    """ClusterAPI::DelHost: the cluster id is ignored; the host goes to cluster 0."""
    cluster_addhost(core, ctx, DEFAULT_CLUSTER_ID, hid)
    return cid


def _datastore_cluster(core: Oned, ctx: Ctx, cid: int, ds_id: int, add: bool) -> int:
    """ClusterAPI::action_generic for a datastore (Clusterable add/del_cluster:
    a no-op when it already is / is not in the cluster)."""
    core.cluster(cid)
    ds = core.datastore(ds_id)
    _admin(ctx, "CLUSTER", cid)
    if add and cid not in ds.cluster_ids:
        ds.cluster_ids = sorted([*ds.cluster_ids, cid])
    elif not add and cid in ds.cluster_ids:
        ds.cluster_ids = [c for c in ds.cluster_ids if c != cid]
    return cid


@method("one.cluster.adddatastore", "ii", obj="CLUSTER")
def cluster_adddatastore(core: Oned, ctx: Ctx, cid: int, ds_id: int) -> int:
    return _datastore_cluster(core, ctx, cid, ds_id, True)


@method("one.cluster.deldatastore", "ii", obj="CLUSTER")
def cluster_deldatastore(core: Oned, ctx: Ctx, cid: int, ds_id: int) -> int:
    return _datastore_cluster(core, ctx, cid, ds_id, False)


@method("one.host.allocate", "sssi", 3, obj="HOST")
def host_allocate(core: Oned, ctx: Ctx, name: str, im_mad: str, vm_mad: str,
                  cid: int = -1) -> int:
    """HostAllocateAPI::allocate: cluster -1 is the default cluster. The
    host is MONITORED at once (onesim has no monitor probe to wait for)."""
    authorize(ctx.caller, Check(CREATE, "HOST"))
    if cid == -1:
        cid = DEFAULT_CLUSTER_ID
    core.cluster(cid)
    if not name:
        raise OneError(ErrorCode.ALLOCATE, "Invalid NAME, it cannot be empty")
    for other in core.store.hosts.values():
        if other.name == name:
            raise OneError(ErrorCode.ALLOCATE, f"NAME is already taken by HOST {other.id}.")
    hid = core.store.next_id("hosts")
    core.store.hosts[hid] = core.new_host(hid, name, cid)
    return hid
