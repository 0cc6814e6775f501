"""Pure parsing of what wakes the agent: ZeroMQ messages and hook requests.

Owns: the topics the agent subscribes to (each ending in its separator, since
ZeroMQ matches by byte prefix: `EVENT VM 4` would also match VM 40), and the
translation of a (topic, body) pair or a hook request into a `Trigger`.
Events are hints, never truth: a Trigger only names which VM to look at
again; every decision is taken from a fresh `one.vm.info`. Bodies are parsed
defensively (oned does not XML-escape API parameters), and anything
unreadable becomes "look at every VM". Must not: do I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

# VM state changes (all VMs), and API calls that change what a backup covers.
TOPICS: tuple[str, ...] = (
    "EVENT VM ",
    "EVENT API one.vm.update ",
    "EVENT API one.vm.attach ",
    "EVENT API one.vm.detach ",
    "EVENT API one.vm.action ",
    "EVENT API one.template.instantiate ",
)

_VM_KEY = re.compile(r"^EVENT VM (\d+)/([A-Z_]+)/([A-Z_]*) ?$")
_API_KEY = re.compile(r"^EVENT API (one\.[a-z.]+) ([01])$")
# Where an API call names its VM: the 2nd IN parameter, except for these.
_VM_PARAM = {"one.vm.action": ("IN", 3), "one.template.instantiate": ("OUT", 2)}
_IN_PARAM = r"<PARAMETER><POSITION>{pos}</POSITION><TYPE>{type}</TYPE><VALUE>(-?\d+)</VALUE>"


@dataclass(frozen=True)
class Trigger:
    """Something happened; look again. `vm_id` None means every VM."""

    vm_id: int | None
    reason: str
    state: str = ""   # "STATE/LCM" for state events
    snapshot: str | None = None   # a hook asking for a pre-change snapshot set
    snapshot_ttl: int | None = None


def everything(reason: str) -> Trigger:
    return Trigger(None, reason)


def _decode(body: bytes) -> str | None:
    try:
        return base64.b64decode(body.strip(), validate=False).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return None


def parse_message(topic: bytes, body: bytes) -> Trigger | None:
    """A ZeroMQ message from oned's hook manager -> Trigger (None: nothing to do)."""
    try:
        key = topic.decode("ascii")
    except UnicodeDecodeError:
        return everything("unreadable event topic")
    m = _VM_KEY.match(key)
    if m:
        return Trigger(int(m.group(1)), f"state {m.group(2)}/{m.group(3) or '-'}",
                       f"{m.group(2)}/{m.group(3)}")
    m = _API_KEY.match(key.rstrip())
    if m:
        method, ok = m.group(1), m.group(2) == "1"
        if not ok:
            return None  # a refused call changed nothing
        text = _decode(body)
        if text is None:
            return everything(f"{method}: unreadable body")
        where, pos = _VM_PARAM.get(method, ("IN", 2))
        found = re.search(_IN_PARAM.format(pos=pos, type=where), text)
        if found is None:
            return everything(f"{method}: no VM id in body")
        return Trigger(int(found.group(1)), method)
    return everything(f"unexpected event {key.strip()!r}")


def parse_hook_request(doc: object) -> Trigger:
    """A request forwarded by a hook script (already authenticated) -> Trigger.
    Shape: {"vm_id": N, "event": "...", ["snapshot": NAME, "ttl": SECONDS]};
    anything else is refused with ValueError."""
    if not isinstance(doc, dict):
        raise ValueError("request must be a JSON object")
    vm_id = doc.get("vm_id")
    event = doc.get("event", "hook")
    if not isinstance(vm_id, int) or isinstance(vm_id, bool) or vm_id < 0:
        raise ValueError("vm_id must be a non-negative integer")
    if not isinstance(event, str) or len(event) > 200:
        raise ValueError("event must be a short string")
    snapshot = doc.get("snapshot")
    ttl = doc.get("ttl")
    if snapshot is not None and (not isinstance(snapshot, str)
                                 or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", snapshot)):
        raise ValueError("snapshot must be a set name (letters, digits, '.', '_', '-')")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool) or ttl <= 0):
        raise ValueError("ttl must be a positive number of seconds")
    return Trigger(vm_id, f"hook {event}", snapshot=snapshot, snapshot_ttl=ttl)
