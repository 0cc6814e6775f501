"""XML documents, in oned's element order and empty-element spelling.

Owns: the bodies one.*.info and one.*pool.info return (VM full and short,
image, datastore, host, VM template, user, group, hook with its log) as
oned's to_xml functions write them: no namespace, no whitespace, values of
templates in CDATA, empty collections as <X></X>, ...
Must not: change any object.
"""

from __future__ import annotations

from xml.sax.saxutils import escape as _esc

from tests.onesim.constants import VmState
from tests.onesim.model import (
    Cluster,
    Datastore,
    Group,
    History,
    Hook,
    Host,
    Image,
    Perms,
    Snapshots,
    Store,
    User,
    Vm,
    VmTemplate,
)
from tests.onesim.templates import Template, attr_xml, cdata


def esc(text: object) -> str:
    return _esc(str(text))


def perms_xml(perms: Perms) -> str:
    names = ["OWNER_U", "OWNER_M", "OWNER_A", "GROUP_U", "GROUP_M", "GROUP_A",
             "OTHER_U", "OTHER_M", "OTHER_A"]
    inner = "".join(f"<{n}>{b}</{n}>" for n, b in zip(names, perms.bits, strict=True))
    return f"<PERMISSIONS>{inner}</PERMISSIONS>"


def ids_xml(name: str, ids: list[int]) -> str:
    return f"<{name}>" + "".join(f"<ID>{i}</ID>" for i in ids) + f"</{name}>"


def snapshots_xml(snaps: Snapshots, with_disk: bool = True) -> str:
    tmpl = Template()
    tmpl.add("ALLOW_ORPHANS", snaps.allow_orphans)
    tmpl.add("CURRENT_BASE", str(snaps.current_base))
    if with_disk:
        tmpl.add("DISK_ID", str(snaps.disk_id))
    tmpl.add("NEXT_SNAPSHOT", str(snaps.next_snapshot))
    for snap in snaps.snaps:
        tmpl.add("SNAPSHOT", snap)
    return tmpl.to_xml("SNAPSHOTS")


# ---------------------------------------------------------------------------
# VMs
# ---------------------------------------------------------------------------

def history_xml(h: History) -> str:
    return ("<HISTORY>"
            f"<OID>{h.oid}</OID><SEQ>{h.seq}</SEQ><HOSTNAME>{esc(h.hostname)}</HOSTNAME>"
            f"<HID>{h.hid}</HID><CID>{h.cid}</CID><STIME>{h.stime}</STIME>"
            f"<ETIME>{h.etime}</ETIME><VM_MAD>{cdata(h.vm_mad)}</VM_MAD>"
            f"<TM_MAD>{cdata(h.tm_mad)}</TM_MAD><DS_ID>{h.ds_id}</DS_ID>"
            "<PLAN_ID>-1</PLAN_ID><ACTION_ID>0</ACTION_ID>"
            f"<PSTIME>{h.pstime}</PSTIME><PETIME>{h.petime}</PETIME>"
            f"<RSTIME>{h.rstime}</RSTIME><RETIME>{h.retime}</RETIME>"
            f"<ESTIME>{h.estime}</ESTIME><EETIME>{h.eetime}</EETIME>"
            f"<ACTION>{h.action}</ACTION><UID>{h.uid}</UID><GID>{h.gid}</GID>"
            f"<REQUEST_ID>{h.request_id}</REQUEST_ID>"
            "</HISTORY>")


def history_short_xml(h: History) -> str:
    return ("<HISTORY>"
            f"<OID>{h.oid}</OID><SEQ>{h.seq}</SEQ><HOSTNAME>{cdata(h.hostname)}</HOSTNAME>"
            f"<HID>{h.hid}</HID><CID>{h.cid}</CID><DS_ID>{h.ds_id}</DS_ID>"
            f"<VM_MAD>{cdata(h.vm_mad)}</VM_MAD><TM_MAD>{cdata(h.tm_mad)}</TM_MAD>"
            f"<ACTION>{cdata(str(h.action))}</ACTION>"
            "</HISTORY>")


def vm_xml(vm: Vm) -> str:
    """VirtualMachine::to_xml_extended(xml, 2, true): what one.vm.info,
    one.vmpool.infoextended and state events carry."""
    out = [
        "<VM>", f"<ID>{vm.id}</ID><UID>{vm.uid}</UID><GID>{vm.gid}</GID>",
        f"<UNAME>{esc(vm.uname)}</UNAME><GNAME>{esc(vm.gname)}</GNAME><NAME>{esc(vm.name)}</NAME>",
        perms_xml(vm.perms),
        "<LAST_POLL>0</LAST_POLL>",
        f"<STATE>{vm.state}</STATE><LCM_STATE>{vm.lcm}</LCM_STATE>",
        f"<PREV_STATE>{vm.prev_state}</PREV_STATE><PREV_LCM_STATE>{vm.prev_lcm}</PREV_LCM_STATE>",
        f"<RESCHED>{vm.resched}</RESCHED><STIME>{vm.stime}</STIME><ETIME>{vm.etime}</ETIME>",
        f"<DEPLOY_ID>{esc(vm.deploy_id)}</DEPLOY_ID>",
        "<MONITORING></MONITORING>",
        "<SCHED_ACTIONS></SCHED_ACTIONS>",
        vm.template.to_xml("TEMPLATE"),
        vm.user_template.to_xml("USER_TEMPLATE"),
    ]
    if vm.history:
        out.append("<HISTORY_RECORDS>" + "".join(history_xml(h) for h in vm.history)
                   + "</HISTORY_RECORDS>")
    else:
        out.append("<HISTORY_RECORDS/>")
    for disk in vm.disks():
        snaps = vm.snapshots.get(int(disk.get("DISK_ID", "-1")))
        if snaps is not None:
            out.append(snapshots_xml(snaps))
    bconf = ("<BACKUP_CONFIG/>" if len(vm.backup_config) == 0
             else vm.backup_config.to_xml("BACKUP_CONFIG"))
    out.append(f"<BACKUPS>{bconf}<BACKUP_IDS></BACKUP_IDS></BACKUPS>")
    out.append("</VM>")
    return "".join(out)


_SHORT_DISK = ["DISK_ID", "DATASTORE", "DATASTORE_ID", "IMAGE", "IMAGE_ID", "SIZE", "TYPE",
               "CLONE", "CLONE_TARGET", "LN_TARGET", "DISK_SNAPSHOT_TOTAL_SIZE"]
_SHORT_USER = ["LABELS", "ERROR", "SCHED_MESSAGE", "SCHED_RANK", "SCHED_DS_RANK",
               "SCHED_REQUIREMENTS", "SCHED_DS_REQUIREMENTS", "USER_PRIORITY"]


def vm_short_xml(vm: Vm) -> str:
    """VirtualMachine::to_xml_short: the bodies of one.vmpool.info."""
    tmpl = vm.template
    disks = "".join(
        "<DISK>" + "".join(f"<{k}>{cdata(d.get(k, ''))}</{k}>" for k in _SHORT_DISK) + "</DISK>"
        for d in vm.disks())
    graphics = tmpl.vector("GRAPHICS")
    out = [
        "<VM>", f"<ID>{vm.id}</ID><UID>{vm.uid}</UID><GID>{vm.gid}</GID>",
        f"<UNAME>{esc(vm.uname)}</UNAME><GNAME>{esc(vm.gname)}</GNAME><NAME>{esc(vm.name)}</NAME>",
        "<LAST_POLL>0</LAST_POLL>",
        f"<STATE>{vm.state}</STATE><LCM_STATE>{vm.lcm}</LCM_STATE>",
        f"<RESCHED>{vm.resched}</RESCHED><STIME>{vm.stime}</STIME><ETIME>{vm.etime}</ETIME>",
        f"<DEPLOY_ID>{esc(vm.deploy_id)}</DEPLOY_ID>",
        "<TEMPLATE>",
        f"<CPU>{esc(tmpl.get('CPU', ''))}</CPU><MEMORY>{esc(tmpl.get('MEMORY', ''))}</MEMORY>",
        f"<VCPU>{esc(tmpl.get('VCPU', ''))}</VCPU>",
        disks,
        attr_xml("GRAPHICS", graphics) if graphics is not None else "",
        "</TEMPLATE>",
        "<MONITORING/>",
    ]
    utmpl = vm.user_template
    if len(utmpl) == 0:
        out.append("<USER_TEMPLATE/>")
    else:
        parts = []
        for key in _SHORT_USER:
            value = utmpl.get(key)
            if value is None or (not value and key in ("LABELS", "ERROR", "SCHED_MESSAGE")):
                continue
            parts.append(f"<{key}>{cdata(value)}</{key}>")
        for sa in utmpl.vectors("SCHED_ACTION"):
            parts.append(attr_xml("SCHED_ACTION", sa))
        out.append("<USER_TEMPLATE>" + "".join(parts) + "</USER_TEMPLATE>")
    last = vm.last
    if last is not None:
        out.append("<HISTORY_RECORDS>" + history_short_xml(last) + "</HISTORY_RECORDS>")
    else:
        out.append("<HISTORY_RECORDS/>")
    out.append("</VM>")
    return "".join(out)


# ---------------------------------------------------------------------------
# Images, datastores, hosts, templates, users, groups, hooks
# ---------------------------------------------------------------------------

def image_xml(img: Image) -> str:
    return "".join([
        "<IMAGE>", f"<ID>{img.id}</ID><UID>{img.uid}</UID><GID>{img.gid}</GID>",
        f"<UNAME>{esc(img.uname)}</UNAME><GNAME>{esc(img.gname)}</GNAME><NAME>{esc(img.name)}</NAME>",
        perms_xml(img.perms),
        f"<TYPE>{img.type}</TYPE><DISK_TYPE>{img.disk_type}</DISK_TYPE>",
        f"<PERSISTENT>{img.persistent}</PERSISTENT>",
        f"<REGTIME>{img.regtime}</REGTIME><MODTIME>{img.modtime}</MODTIME>",
        f"<SOURCE>{cdata(img.source)}</SOURCE><PATH>{cdata(img.path)}</PATH>",
        f"<FORMAT>{cdata(img.format)}</FORMAT><FS>{cdata(img.fs)}</FS>",
        f"<SIZE>{img.size}</SIZE><STATE>{img.state}</STATE><PREV_STATE>{img.prev_state}</PREV_STATE>",
        f"<RUNNING_VMS>{img.running_vms}</RUNNING_VMS><CLONING_OPS>{img.cloning_ops}</CLONING_OPS>",
        f"<CLONING_ID>{img.cloning_id}</CLONING_ID>",
        f"<TARGET_SNAPSHOT>{img.target_snapshot}</TARGET_SNAPSHOT>",
        f"<DATASTORE_ID>{img.datastore_id}</DATASTORE_ID><DATASTORE>{esc(img.datastore)}</DATASTORE>",
        ids_xml("VMS", img.vms), "<CLONES></CLONES><APP_CLONES></APP_CLONES>",
        img.template.to_xml("TEMPLATE"),
        snapshots_xml(img.snapshots, with_disk=False),
        "<BACKUP_INCREMENTS></BACKUP_INCREMENTS><BACKUP_DISK_IDS></BACKUP_DISK_IDS>",
        "</IMAGE>",
    ])


def datastore_xml(ds: Datastore, used_mb: int) -> str:
    free = max(ds.total_mb - used_mb, 0)
    return "".join([
        "<DATASTORE>", f"<ID>{ds.id}</ID><UID>{ds.uid}</UID><GID>{ds.gid}</GID>",
        f"<UNAME>{esc(ds.uname)}</UNAME><GNAME>{esc(ds.gname)}</GNAME><NAME>{esc(ds.name)}</NAME>",
        perms_xml(ds.perms),
        f"<DS_MAD>{cdata(ds.ds_mad)}</DS_MAD><TM_MAD>{cdata(ds.tm_mad)}</TM_MAD>",
        f"<BASE_PATH>{cdata(ds.base_path)}</BASE_PATH>",
        f"<TYPE>{ds.type}</TYPE><DISK_TYPE>{ds.disk_type}</DISK_TYPE><STATE>{ds.state}</STATE>",
        ids_xml("CLUSTERS", ds.cluster_ids),
        f"<TOTAL_MB>{ds.total_mb}</TOTAL_MB><FREE_MB>{free}</FREE_MB><USED_MB>{used_mb}</USED_MB>",
        ids_xml("IMAGES", ds.images),
        ds.template.to_xml("TEMPLATE"),
        "</DATASTORE>",
    ])


def host_xml(host: Host, vms: list[Vm], disk: tuple[int, int, int], stamp: int) -> str:
    """A KVM host as its monitor reports it; usage is the sum of its VMs."""
    total_mem, total_cpu = 16777216, 800
    mem = sum(int(float(v.template.get("MEMORY", "0") or 0)) * 1024 for v in vms)
    cpu = sum(int(float(v.template.get("CPU", "0") or 0) * 100) for v in vms)
    max_disk, used_disk, free_disk = disk
    share = "".join([
        "<HOST_SHARE>", f"<MEM_USAGE>{mem}</MEM_USAGE><CPU_USAGE>{cpu}</CPU_USAGE>",
        f"<TOTAL_MEM>{total_mem}</TOTAL_MEM><TOTAL_CPU>{total_cpu}</TOTAL_CPU>",
        f"<MAX_MEM>{total_mem}</MAX_MEM><MAX_CPU>{total_cpu}</MAX_CPU>",
        f"<RUNNING_VMS>{len(vms)}</RUNNING_VMS><VMS_THREAD>1</VMS_THREAD>",
        "<DATASTORES>", f"<DISK_USAGE>{cdata('0')}</DISK_USAGE>",
        f"<FREE_DISK>{cdata(str(free_disk))}</FREE_DISK><MAX_DISK>{cdata(str(max_disk))}</MAX_DISK>",
        f"<USED_DISK>{cdata(str(used_disk))}</USED_DISK>", "</DATASTORES>",
        "<PCI_DEVICES></PCI_DEVICES><NUMA_NODES></NUMA_NODES>",
        "</HOST_SHARE>",
    ])
    monitoring = "".join([
        "<MONITORING>", f"<TIMESTAMP>{stamp}</TIMESTAMP><ID>{host.id}</ID>",
        "<CAPACITY>", f"<FREE_CPU>{cdata(str(total_cpu - cpu))}</FREE_CPU>",
        f"<FREE_MEMORY>{cdata(str(total_mem - mem))}</FREE_MEMORY>",
        f"<USED_CPU>{cdata(str(cpu))}</USED_CPU><USED_MEMORY>{cdata(str(mem))}</USED_MEMORY>",
        "</CAPACITY>",
        f"<SYSTEM><NETRX>{cdata('0')}</NETRX><NETTX>{cdata('0')}</NETTX></SYSTEM>",
        "</MONITORING>",
    ])
    return "".join([
        "<HOST>", f"<ID>{host.id}</ID><NAME>{esc(host.name)}</NAME>",
        f"<STATE>{host.state}</STATE><PREV_STATE>{host.prev_state}</PREV_STATE>",
        f"<IM_MAD>{cdata(host.im_mad)}</IM_MAD><VM_MAD>{cdata(host.vm_mad)}</VM_MAD>",
        f"<CLUSTER_ID>{host.cluster_id}</CLUSTER_ID><CLUSTER>{esc(host.cluster)}</CLUSTER>",
        share, ids_xml("VMS", [v.id for v in vms]),
        host.template.to_xml("TEMPLATE"), monitoring,
        "</HOST>",
    ])


def cluster_xml(cluster: Cluster, hosts: list[int], datastores: list[int]) -> str:
    """Cluster::to_xml: HOSTS, DATASTORES, VNETS (onesim has no networks)."""
    return "".join([
        "<CLUSTER>", f"<ID>{cluster.id}</ID><NAME>{esc(cluster.name)}</NAME>",
        ids_xml("HOSTS", hosts), ids_xml("DATASTORES", datastores), ids_xml("VNETS", []),
        cluster.template.to_xml("TEMPLATE"), "</CLUSTER>",
    ])


def vmtemplate_xml(t: VmTemplate) -> str:
    return "".join([
        "<VMTEMPLATE>", f"<ID>{t.id}</ID><UID>{t.uid}</UID><GID>{t.gid}</GID>",
        f"<UNAME>{esc(t.uname)}</UNAME><GNAME>{esc(t.gname)}</GNAME><NAME>{esc(t.name)}</NAME>",
        perms_xml(t.perms), f"<REGTIME>{t.regtime}</REGTIME>",
        t.template.to_xml("TEMPLATE"), "</VMTEMPLATE>",
    ])


_QUOTAS = ("<DATASTORE_QUOTA></DATASTORE_QUOTA><NETWORK_QUOTA></NETWORK_QUOTA>"
           "<VM_QUOTA></VM_QUOTA><IMAGE_QUOTA></IMAGE_QUOTA>")


def user_xml(user: User, extended: bool = True) -> str:
    out = [
        "<USER>", f"<ID>{user.id}</ID><GID>{user.gid}</GID>", ids_xml("GROUPS", user.groups),
        f"<GNAME>{esc(user.gname)}</GNAME><NAME>{esc(user.name)}</NAME>",
        f"<PASSWORD>{cdata(user.password)}</PASSWORD>",
        f"<AUTH_DRIVER>{cdata(user.auth_driver)}</AUTH_DRIVER>",
        f"<ENABLED>{int(user.enabled)}</ENABLED>",
        user.template.to_xml("TEMPLATE"),
    ]
    if extended:
        out.append(_QUOTAS)
        out.append("<DEFAULT_USER_QUOTAS>" + _QUOTAS + "</DEFAULT_USER_QUOTAS>")
    out.append("</USER>")
    return "".join(out)


def user_pool_xml(users: list[User]) -> str:
    """UserPool::dump: each body with its QUOTAS row, then the defaults."""
    rows = "".join(user_xml(u, extended=False) + f"<QUOTAS><ID>{u.id}</ID>{_QUOTAS}</QUOTAS>"
                   for u in users)
    return f"<USER_POOL>{rows}<DEFAULT_USER_QUOTAS>{_QUOTAS}</DEFAULT_USER_QUOTAS></USER_POOL>"


def group_xml(group: Group, extended: bool = True) -> str:
    out = ["<GROUP>", f"<ID>{group.id}</ID><NAME>{esc(group.name)}</NAME>",
           group.template.to_xml("TEMPLATE"), ids_xml("USERS", sorted(group.users)),
           ids_xml("ADMINS", [])]
    if extended:
        out.append(_QUOTAS)
        out.append(f"<VLAN_RULES><ID>{group.id}</ID></VLAN_RULES>")
        out.append("<DEFAULT_GROUP_QUOTAS>" + _QUOTAS + "</DEFAULT_GROUP_QUOTAS>")
    out.append("</GROUP>")
    return "".join(out)


def group_pool_xml(groups: list[Group]) -> str:
    rows = "".join(group_xml(g, extended=False) + f"<QUOTAS><ID>{g.id}</ID>{_QUOTAS}</QUOTAS>"
                   for g in groups)
    return (f"<GROUP_POOL>{rows}<DEFAULT_GROUP_QUOTAS>{_QUOTAS}</DEFAULT_GROUP_QUOTAS>"
            "</GROUP_POOL>")


def hook_xml(hook: Hook, with_log: bool) -> str:
    log = "<HOOKLOG>" + "".join(hook.log) + "</HOOKLOG>" if with_log else ""
    return (f"<HOOK><ID>{hook.id}</ID><NAME>{esc(hook.name)}</NAME><TYPE>{hook.type}</TYPE>"
            + hook.template.to_xml("TEMPLATE") + log + "</HOOK>")


def pool_xml(root: str, bodies: list[str]) -> str:
    return f"<{root}>" + "".join(bodies) + f"</{root}>"


# ---------------------------------------------------------------------------
# Derived figures shared by several documents
# ---------------------------------------------------------------------------

def vms_on_host(store: Store, host_id: int) -> list[Vm]:
    """VMs holding capacity on the host: deployed and not yet ended."""
    gone = {VmState.PENDING, VmState.HOLD, VmState.DONE, VmState.STOPPED,
            VmState.UNDEPLOYED, VmState.INIT, VmState.CLONING, VmState.CLONING_FAILURE}
    return [vm for vm in sorted(store.vms.values(), key=lambda v: v.id)
            if vm.last is not None and vm.last.hid == host_id and vm.state not in gone]
