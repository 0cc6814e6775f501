"""Who may do what: sessions, permission bits and the default ACLs.

Owns: session authentication ("user:password" against the user pool),
AuthManager's authorization of a request made of several (operation,
object) checks: oneadmin and the oneadmin group may do anything; others
need the owner/group/other bit of the operation (USE/MANAGE/ADMIN) or a
default ACL of a fresh OpenNebula (users group: CREATE VMs, images and
templates, USE datastores, MANAGE hosts); the refusal message is oned's
"Not authorized to perform OP TYPE [ID]".
Must not: look at object states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.onesim.constants import ErrorCode
from tests.onesim.model import Perms, Store
from tests.onesim.oned import Caller, OneError

USE, MANAGE, ADMIN, CREATE = "USE", "MANAGE", "ADMIN", "CREATE"
_BIT = {USE: 0, MANAGE: 1, ADMIN: 2}

# (group, object type) -> operations the default ACLs grant
DEFAULT_ACLS: dict[tuple[int, str], set[str]] = {
    (1, "VM"): {CREATE},
    (1, "IMAGE"): {CREATE},
    (1, "TEMPLATE"): {CREATE},
    (1, "DATASTORE"): {USE},
    (1, "HOST"): {MANAGE},
}


@dataclass(frozen=True)
class Check:
    op: str
    obj: str  # VM, IMAGE, TEMPLATE, DATASTORE, HOST, USER, GROUP, HOOK
    oid: int = -1
    uid: int = 0
    gid: int = 0
    perms: Perms | None = None


def authenticate(store: Store, session: str) -> Caller | None:
    user, _, password = session.partition(":")
    for u in store.users.values():
        if u.name == user and u.enabled and u.password == password:
            return Caller(u.id, u.gid, u.name, u.gname, list(u.groups))
    return None


def allowed(caller: Caller, check: Check) -> bool:
    if caller.is_admin:
        return True
    if check.op == CREATE or check.perms is None:
        return any(check.op in DEFAULT_ACLS.get((g, check.obj), set()) for g in caller.groups)
    bit = _BIT[check.op]
    bits = check.perms.bits
    if check.uid == caller.uid and bits[bit]:
        return True
    if check.gid in caller.groups and bits[3 + bit]:
        return True
    if bits[6 + bit]:
        return True
    return any(check.op in DEFAULT_ACLS.get((g, check.obj), set()) for g in caller.groups)


def authorize(caller: Caller, *checks: Check) -> None:
    """Raise AUTHORIZATION with oned's message if any check fails."""
    problems = []
    for check in checks:
        if not allowed(caller, check):
            text = f"Not authorized to perform {check.op} {check.obj}"
            if check.oid != -1:
                text += f" [{check.oid}]"
            problems.append(text)
    if problems:
        raise OneError(ErrorCode.AUTHORIZATION, "; ".join(problems))


def of(obj: Any, kind: str, op: str) -> Check:
    """A check on a pool object that has id/uid/gid/perms."""
    return Check(op, kind, obj.id, getattr(obj, "uid", 0), getattr(obj, "gid", 0),
                 getattr(obj, "perms", None))


def pool_filter(caller: Caller, objects: list[Any], kind: str, flag: int) -> list[Any]:
    """PoolSQL::usr_filter for -4 (my group), -3 (mine), -2 (all I may
    use), -1 (mine and my groups') and >= 0 (that user's)."""
    out = []
    for obj in objects:
        uid, gid = getattr(obj, "uid", 0), getattr(obj, "gid", 0)
        visible = allowed(caller, of(obj, kind, USE))
        if flag == -3:
            keep = uid == caller.uid
        elif flag == -4:
            keep = gid == caller.gid and visible
        elif flag == -1:
            keep = uid == caller.uid or (gid in caller.groups and visible)
        elif flag == -2:
            keep = visible
        else:
            keep = uid == flag and visible
        if keep:
            out.append(obj)
    return out


def id_range(objects: list[Any], start: int, end: int) -> list[Any]:
    """PoolSQL::oid_filter and paging, on oned's default DESC order."""
    ordered = sorted(objects, key=lambda o: o.id, reverse=True)
    if end < -1:
        return ordered[max(start, 0):max(start, 0) - end]
    if start >= 0 and end >= 0:
        return [o for o in ordered if start <= o.id <= end]
    if start >= 0:
        return [o for o in ordered if o.id >= start]
    return ordered
