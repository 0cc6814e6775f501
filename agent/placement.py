"""Which VMs this proxy can serve: pure decisions from the cloud's documents.

Owns: the rule that a proxy VM can back up a VM only if it can attach what
a backup attaches: the image that `one.vm.disksaveas` makes of each disk
goes into the datastore of the disk's image (VirtualMachineAPI::disk_saveas,
src/rm/api/VirtualMachineAPI.cc: `ds_id = img->get_ds_id()`), and
`one.vm.attach` refuses an image whose datastore's CLUSTERS do not hold the
cluster the proxy VM runs in ("Image [N] is not part of cluster [C]",
VirtualMachineDisks::set_up_attach, src/vm/VirtualMachineDisk.cc). So every
datastore a VM's image disks live in must be in one of the proxy's
clusters: the cluster of its host (the CID of its last HISTORY record), or
the operator's explicit `agent.clusters`. A datastore in no cluster at all
is attachable from anywhere (oned checks an empty CLUSTER_ID against
nothing). Must not: call the cloud (the daemon passes the documents in), or
decide when to back up (policy).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent.model import DatastoreInfo, VmInfo


def proxy_clusters(proxy: VmInfo | None, configured: tuple[int, ...] | None) -> frozenset[int]:
    """The clusters whose datastores the proxy can attach: `agent.clusters`
    when set, else the cluster the proxy VM runs in (none if it never ran)."""
    if configured is not None:
        return frozenset(configured)
    if proxy is None or proxy.cluster_id < 0:
        return frozenset()
    return frozenset({proxy.cluster_id})


def datastores_of(vm: VmInfo) -> list[int]:
    """The datastores a backup of `vm` attaches images from: those of its
    image disks (volatile disks are not saved as images)."""
    return sorted({d.datastore_id for d in vm.disks
                   if not d.volatile and d.datastore_id is not None})


def not_served(vm: VmInfo, clusters: Iterable[int],
               datastores: Mapping[int, DatastoreInfo]) -> str | None:
    """Why this proxy cannot back `vm` up (one line), or None if it can."""
    mine = sorted(set(clusters))
    if not mine:
        return ("the proxy VM runs in no cluster (it was never deployed) and agent.clusters"
                " is not set")
    for ds_id in datastores_of(vm):
        ds = datastores.get(ds_id)
        if ds is None:
            return f"datastore {ds_id} of its disks is not visible to oneback's user"
        # a datastore in no cluster: the disk's CLUSTER_ID is "" and oned
        # checks nothing (`if (!disk_cluster_ids.empty())`, set_up_attach)
        if ds.clusters and not set(ds.clusters) & set(mine):
            where = ", ".join(map(str, ds.clusters)) or "none"
            return (f"datastore {ds_id} ({ds.name}) is in cluster(s) {where}, this proxy serves"
                    f" cluster(s) {', '.join(map(str, mine))}")
    return None
