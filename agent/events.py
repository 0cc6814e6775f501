"""Pure parsing of what wakes the agent: ZeroMQ messages and hook requests.

Owns: the topics the agent subscribes to (each ending in its separator, since
ZeroMQ matches by byte prefix: `EVENT VM 4` would also match VM 40), and the
translation of a (topic, body) pair or a hook request into a `Trigger`.
Events are hints, never truth: a Trigger only names which VM to look at
again; every decision is taken from a fresh `one.vm.info`.

An API event counts only when the call succeeded: oned publishes refused
calls too (`EVENT API one.vm.resize 0`, CALL_INFO/RESULT 0), and a refused
call on somebody else's VM must not move the agent. The VM id is read from
the structured PARAMETERS of CALL_INFO (HookAPI::format_message), never by a
pattern over the text: oned writes parameter values unescaped, so a string
parameter can carry markup. Only parameters that come before any
user-written text are trusted: the first IN parameter at the call's VM
position (string parameters come after it), and for
one.template.instantiate the last OUT parameter 2 (the answer is written
after every IN value), each looked for in the whole message, since a value
can close PARAMETERS or CALL_INFO and open forged ones. Ids must be in oned's range (0 .. 2^31-1).
Anything unreadable becomes "look at every VM"; nothing here raises on a
message. Must not: do I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from lxml import etree

from agent import xmldoc
from agent.model import ONE_ID_MAX, is_one_id

# VM state changes (all VMs), and API calls that change what a backup covers.
TOPICS: tuple[str, ...] = (
    "EVENT VM ",
    "EVENT API one.vm.update ",
    "EVENT API one.vm.attach ",
    "EVENT API one.vm.detach ",
    "EVENT API one.vm.action ",
    "EVENT API one.template.instantiate ",
)

_VM_KEY = re.compile(r"^EVENT VM ([0-9]+)/([A-Z_]+)/([A-Z_]*) ?$")
_API_KEY = re.compile(r"^EVENT API (one\.[a-z.]+) ([01])$")
# Where an API call names its VM: the 2nd IN parameter, except for these.
VM_PARAM: dict[str, tuple[str, int]] = {"one.vm.action": ("IN", 3),
                                        "one.template.instantiate": ("OUT", 2)}
_ID = re.compile(r"[0-9]{1,10}")
SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MAX_TTL = 10 * 366 * 86400
"""The longest TTL a hook may ask for (ten years): beyond it is a typo."""


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


def _decode(body: bytes) -> bytes | None:
    try:
        return base64.b64decode(body.strip(), validate=False)
    except (binascii.Error, ValueError):
        return None


def one_id(text: str | None) -> int | None:
    """`text` as an oned object id, or None if it is not one."""
    if text is None or not _ID.fullmatch(text):
        return None
    value = int(text)
    return value if is_one_id(value) else None


def api_vm_id(method: str, message: etree._Element) -> int | None:
    """The VM an API call was about, from a parsed <HOOK_MESSAGE> (None: not
    found, not a number, or out of range). Every <PARAMETER> of the whole
    document counts, in document order, whatever element holds it: an
    unescaped value can close <PARAMETERS> or even <CALL_INFO> and open new
    ones, so "the first PARAMETERS" may hold only forged parameters. What
    oned wrote before the first user value (the IN id) is the first
    match, and what it wrote after the last one (the OUT answer) the last."""
    where, pos = VM_PARAM.get(method, ("IN", 2))
    found = [p.findtext("VALUE") for p in message.iter("PARAMETER")
             if p.findtext("TYPE") == where and p.findtext("POSITION") == str(pos)]
    if not found:
        return None
    return one_id(found[0] if where == "IN" else found[-1])


def _api_event(method: str, body: bytes) -> Trigger | None:
    data = _decode(body)
    if data is None:
        return everything(f"{method}: unreadable body")
    try:
        root = xmldoc.parse(data)
    except xmldoc.XmlError:
        # A value with a bare '&' or '<' (a URL in a template, say) breaks
        # the document only after the IN id, which precedes every user
        # value: recovered, that id is still as oned wrote it. An OUT id
        # comes after them, so it is never read from a recovered document.
        if VM_PARAM.get(method, ("IN", 2))[0] != "IN":
            return everything(f"{method}: unreadable body")
        try:
            root = xmldoc.parse(data, recover=True)
        except xmldoc.XmlError:
            return everything(f"{method}: unreadable body")
    info = root.find("CALL_INFO")
    if root.tag != "HOOK_MESSAGE" or info is None or root.findtext("CALL") != method:
        return everything(f"{method}: body does not match its topic")
    if info.findtext("RESULT") != "1":
        return everything(f"{method}: body does not say the call succeeded")
    vm_id = api_vm_id(method, root)
    if vm_id is None:
        return everything(f"{method}: no VM id (0 .. {ONE_ID_MAX}) in body")
    return Trigger(vm_id, method)


def parse_message(topic: bytes, body: bytes) -> Trigger | None:
    """A ZeroMQ message from oned's hook manager -> Trigger (None: nothing to do)."""
    try:
        key = topic.decode("ascii")
    except UnicodeDecodeError:
        return everything("unreadable event topic")
    m = _VM_KEY.match(key)
    if m:
        vm_id = one_id(m.group(1))
        if vm_id is None:
            return everything(f"event for a VM id out of range: {m.group(1)[:20]}")
        return Trigger(vm_id, f"state {m.group(2)}/{m.group(3) or '-'}",
                       f"{m.group(2)}/{m.group(3)}")
    m = _API_KEY.match(key.rstrip())
    if m:
        if m.group(2) != "1":
            return None  # a refused call changed nothing
        return _api_event(m.group(1), body)
    return everything(f"unexpected event {key.strip()[:80]!r}")


def parse_hook_request(doc: object) -> Trigger:
    """A request forwarded by a hook script (already authenticated) -> Trigger.
    Shape: {"vm_id": N, "event": "...", ["snapshot": NAME, "ttl": SECONDS]};
    anything else is refused with ValueError."""
    if not isinstance(doc, dict):
        raise ValueError("request must be a JSON object")
    vm_id = doc.get("vm_id")
    event = doc.get("event", "hook")
    if not isinstance(vm_id, int) or not is_one_id(vm_id):
        raise ValueError(f"vm_id must be an OpenNebula id (an integer 0 .. {ONE_ID_MAX})")
    if not isinstance(event, str) or len(event) > 200:
        raise ValueError("event must be a short string")
    snapshot = doc.get("snapshot")
    ttl = doc.get("ttl")
    if snapshot is not None and (not isinstance(snapshot, str)
                                 or not SET_NAME.fullmatch(snapshot)):
        raise ValueError("snapshot must be a set name (letters, digits, '.', '_', '-')")
    if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)
                            or not 0 < ttl <= MAX_TTL):
        raise ValueError(f"ttl must be a number of seconds from 1 to {MAX_TTL} (ten years)")
    return Trigger(vm_id, f"hook {event}", snapshot=snapshot, snapshot_ttl=ttl)
