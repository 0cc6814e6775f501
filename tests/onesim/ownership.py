"""Names and owners of pool objects: what SharedAPI::rename and
SharedAPI::chown check before they change an object (src/rm/api/SharedAPI.cc).

Owns: PoolObjectSQL::name_is_valid (INVALID_NAME_CHARS of
src/pool/PoolObjectSQL.cc), the new user and group of a chown looked up
before the object (NO_EXISTS names the user or group), a chown to the
current user or group ignored, and the MANAGE object / MANAGE user / USE
group authorization. Must not: know which object kinds need unique names
(the api_* modules decide, as each *API class overrides exist()).
"""

from __future__ import annotations

from typing import Any

from tests.onesim.auth import MANAGE, USE, Check, authorize, of
from tests.onesim.constants import ErrorCode
from tests.onesim.model import Group, User
from tests.onesim.oned import Caller, Oned, OneError, no_exists

INVALID_NAME_CHARS = "&|:\\\";/'#{}$<>\t\n\v\f\r"
NAME_MAX = 128   # bytes: obj_name.length() of a std::string


def name_error(name: str) -> str | None:
    """PoolObjectSQL::name_is_valid's message, or None for a valid name."""
    if not name:
        return "Invalid NAME, it cannot be empty"
    bad = next((c for c in name if c in INVALID_NAME_CHARS), None)
    if bad is not None:
        return f"Invalid NAME, char '{bad}' is not allowed"
    if len(name.encode()) > NAME_MAX:
        return f"Invalid NAME, max length is {NAME_MAX} chars"
    return None


def check_name(name: str) -> None:
    """set_name in SharedAPI::rename: an invalid name is an ACTION error."""
    message = name_error(name)
    if message is not None:
        raise OneError(ErrorCode.ACTION, message)


def chown_targets(core: Oned, uid: int, gid: int) -> tuple[User | None, Group | None]:
    """The new user and group (None for -1), each checked to exist first."""
    user = group = None
    if uid > -1:
        user = core.store.users.get(uid)
        if user is None:
            raise no_exists("USER", uid)
    if gid > -1:
        group = core.store.groups.get(gid)
        if group is None:
            raise no_exists("GROUP", gid)
    return user, group


def chown_object(caller: Caller, obj: Any, kind: str, user: User | None,
                 group: Group | None) -> tuple[User | None, Group | None]:
    """Authorize and apply a chown of `obj`; a new user or group equal to the
    current one is dropped (as oned ignores it). Returns what changes."""
    if user is not None and user.id == obj.uid:
        user = None
    if group is not None and group.id == obj.gid:
        group = None
    checks = [of(obj, kind, MANAGE)]
    if user is not None:
        checks.append(Check(MANAGE, "USER", user.id, user.id, user.gid, None))
    if group is not None:
        checks.append(Check(USE, "GROUP", group.id, 0, group.id, None))
    authorize(caller, *checks)
    return user, group


def apply_chown(obj: Any, user: User | None, group: Group | None) -> None:
    if user is not None:
        obj.uid, obj.uname = user.id, user.name
    if group is not None:
        obj.gid, obj.gname = group.id, group.name
