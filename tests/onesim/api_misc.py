"""one.system.*, users, groups and hosts.

Owns: one.system.version (the --version the simulator reports), user
allocation and info (users join the users group and get a TOKEN_PASSWORD),
groups, and the host documents of the single KVM host.
Must not: touch VMs or images.
"""

from __future__ import annotations

import secrets

from tests.onesim.auth import ADMIN, Check, authorize
from tests.onesim.constants import ErrorCode
from tests.onesim.dispatch import Ctx, method
from tests.onesim.documents import group_pool_xml, group_xml, pool_xml, user_pool_xml, user_xml
from tests.onesim.model import User
from tests.onesim.oned import Oned, OneError, no_exists


@method("one.system.version", "", obj="USER")
def system_version(core: Oned, ctx: Ctx) -> str:
    return core.config.version


@method("one.system.config", "", obj="USER", info=True)
def system_config(core: Oned, ctx: Ctx) -> str:
    authorize(ctx.caller, Check(ADMIN, "USER"))
    return ("<OPENNEBULA_CONFIGURATION><DATASTORE_CAPACITY_CHECK><![CDATA[yes]]>"
            "</DATASTORE_CAPACITY_CHECK><DEFAULT_DEVICE_PREFIX><![CDATA[sd]]>"
            "</DEFAULT_DEVICE_PREFIX><DEFAULT_UMASK><![CDATA[177]]></DEFAULT_UMASK>"
            + (f"<ONEGATE_ENDPOINT><![CDATA[{core.config.onegate_endpoint}]]></ONEGATE_ENDPOINT>"
               if core.config.onegate_endpoint else "")
            + f"<VERSION><![CDATA[{core.config.version}]]></VERSION></OPENNEBULA_CONFIGURATION>")


@method("one.user.allocate", "sss", 3, obj="USER")
def user_allocate(core: Oned, ctx: Ctx, name: str, password: str, driver: str,
                  group_ids: list[int] | None = None) -> int:
    authorize(ctx.caller, Check("CREATE", "USER"))
    if not name:
        raise OneError(ErrorCode.ALLOCATE, "Invalid NAME, it cannot be empty")
    for user in core.store.users.values():
        if user.name == name:
            raise OneError(ErrorCode.ALLOCATE, f"NAME is already taken by USER {user.id}.")
    if not password and (driver or "core") == "core":
        raise OneError(ErrorCode.ALLOCATE, "Invalid password, it cannot be empty")
    groups = [g for g in (group_ids or []) if isinstance(g, int)] or [1]
    for gid in groups:
        if gid not in core.store.groups:
            raise no_exists("GROUP", gid)
    main = core.store.groups[groups[0]]
    uid = core.store.next_id("users")
    user = User(uid, name, password, main.id, main.name, sorted(set(groups)),
                auth_driver=driver or "core")
    user.template.add("TOKEN_PASSWORD", secrets.token_hex(20))
    core.store.users[uid] = user
    for gid in groups:
        core.store.groups[gid].users.append(uid)
    ctx.extra_xml = user_xml(user, extended=False)
    return uid


@method("one.user.info", "ib", 0, obj="USER", info=True)
def user_info(core: Oned, ctx: Ctx, uid: int = -1, decrypt: bool = False) -> str:
    if uid == -1:
        uid = ctx.caller.uid
    user = core.store.users.get(uid)
    if user is None:
        raise no_exists("USER", uid)
    if uid != ctx.caller.uid:
        authorize(ctx.caller, Check("USE", "USER", uid, 0, 0, None))
    return user_xml(user)


@method("one.user.delete", "i", obj="USER")
def user_delete(core: Oned, ctx: Ctx, uid: int) -> int:
    """SharedAPI::delete_object + UserAPI::drop: ADMIN on the user; oneadmin
    stays; the user leaves its groups. What the user owns keeps its UID."""
    user = core.store.users.get(uid)
    if user is None:
        raise no_exists("USER", uid)
    authorize(ctx.caller, Check(ADMIN, "USER", uid, uid, user.gid, None))
    if uid == 0:
        raise OneError(ErrorCode.ACTION, "Cannot delete user. oneadmin cannot be deleted.")
    del core.store.users[uid]
    for gid in user.groups:
        group = core.store.groups.get(gid)
        if group is not None and uid in group.users:
            group.users.remove(uid)
    return uid


@method("one.userpool.info", "", obj="USER", info=True)
def userpool_info(core: Oned, ctx: Ctx) -> str:
    users = sorted(core.store.users.values(), key=lambda u: u.id, reverse=True)
    if not ctx.caller.is_admin:
        users = [u for u in users if u.id == ctx.caller.uid]
    return user_pool_xml(users)


@method("one.user.passwd", "is", obj="USER")
def user_passwd(core: Oned, ctx: Ctx, uid: int, password: str) -> int:
    user = core.store.users.get(uid)
    if user is None:
        raise no_exists("USER", uid)
    if uid != ctx.caller.uid:
        authorize(ctx.caller, Check("MANAGE", "USER", uid, 0, 0, None))
    if not password:
        raise OneError(ErrorCode.ACTION, "Invalid password, it cannot be empty")
    user.password = password
    return uid


@method("one.group.info", "ib", 0, obj="GROUP", info=True)
def group_info(core: Oned, ctx: Ctx, gid: int = -1, decrypt: bool = False) -> str:
    if gid == -1:
        gid = ctx.caller.gid
    group = core.store.groups.get(gid)
    if group is None:
        raise no_exists("GROUP", gid)
    if gid not in ctx.caller.groups:
        authorize(ctx.caller, Check("USE", "GROUP", gid, 0, 0, None))
    return group_xml(group)


@method("one.grouppool.info", "", obj="GROUP", info=True)
def grouppool_info(core: Oned, ctx: Ctx) -> str:
    groups = sorted(core.store.groups.values(), key=lambda g: g.id, reverse=True)
    if not ctx.caller.is_admin:
        groups = [g for g in groups if g.id in ctx.caller.groups]
    return group_pool_xml(groups)


@method("one.host.info", "ib", 1, obj="HOST", info=True)
def host_info(core: Oned, ctx: Ctx, hid: int, decrypt: bool = False) -> str:
    host = core.store.hosts.get(hid)
    if host is None:
        raise no_exists("HOST", hid)
    return core.host_doc(host)


@method("one.hostpool.info", "", obj="HOST", info=True)
def hostpool_info(core: Oned, ctx: Ctx) -> str:
    hosts = sorted(core.store.hosts.values(), key=lambda h: h.id, reverse=True)
    return pool_xml("HOST_POOL", [core.host_doc(h) for h in hosts])
