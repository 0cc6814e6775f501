"""The hook subsystem: one.hook* methods and the hook execution manager.

Owns: hook templates as Hook::insert / HookStateVM / HookAPI check and
normalise them (errors as oned words them), the hook log (HookLog:
HOOK_EXECUTION_RECORD, 20 records kept per hook, one.hooklog.info filters),
and a HEM that listens to every event in bus order and runs matching hooks
as src/hem/onehem-server.rb does: ARGUMENTS split on blanks with $API
(base64 of <CALL_INFO>, without the call's name) and $TEMPLATE (base64 of
the object's document) substituted, both re-serialised as Nokogiri does
(recovered from unescaped values, pretty-printed); API hooks run for
refused calls too (the key drops the success flag),
ARGUMENTS_STDIN=yes feeding them on stdin instead of argv, TIMEOUT killing
the process group, STDOUT/STDERR base64 (Ruby's encode64) in the record,
and one.hook.retry replaying the stored arguments.
Must not: publish state events or change other objects.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lxml import etree

from tests.onesim.auth import ADMIN, Check, authorize
from tests.onesim.constants import ErrorCode, ImageState, Lcm, VmState
from tests.onesim.dispatch import REGISTRY, UNPUBLISHED, Ctx, method
from tests.onesim.documents import hook_xml, pool_xml
from tests.onesim.events import b64
from tests.onesim.model import Hook, now
from tests.onesim.oned import Oned, OneError, no_exists
from tests.onesim.templates import TemplateError, parse_str_or_xml

LOG_RETENTION = 20
VM_SHORTCUTS = {"PROLOG": ("ACTIVE", "PROLOG"), "RUNNING": ("ACTIVE", "RUNNING"),
                "SHUTDOWN": ("ACTIVE", "EPILOG"), "STOP": ("STOPPED", "LCM_INIT"),
                "DONE": ("DONE", "LCM_INIT"), "UNKNOWN": ("ACTIVE", "UNKNOWN")}
HOST_STATES = ("INIT", "MONITORING_MONITORED", "MONITORED", "ERROR", "DISABLED",
               "MONITORING_ERROR", "MONITORING_INIT", "MONITORING_DISABLED", "OFFLINE")


def _admin(ctx: Ctx) -> None:
    authorize(ctx.caller, Check(ADMIN, "HOOK"))


def _internal(message: str) -> OneError:
    return OneError(ErrorCode.INTERNAL, message)


@method("one.hook.allocate", "s", obj="HOOK")
def hook_allocate(core: Oned, ctx: Ctx, text: str) -> int:
    try:
        tmpl = parse_str_or_xml(text)
    except TemplateError as exc:
        raise _internal(str(exc)) from exc
    _admin(ctx)
    kind = (tmpl.get("TYPE") or "").lower()
    if kind not in ("api", "state"):
        raise _internal(f"Invalid Hook type: {tmpl.get('TYPE') or ''}")
    name = tmpl.get("NAME") or ""
    tmpl.erase("NAME")
    if not name:
        raise _internal("No NAME in template for Hook.")
    command = tmpl.get("COMMAND") or ""
    tmpl.erase("COMMAND")
    if not command:
        raise _internal("No COMMAND in template for Hook.")
    tmpl.add("COMMAND", command)
    remote = (tmpl.get("REMOTE") or "").upper() in ("YES", "TRUE", "1")
    tmpl.erase("REMOTE")
    tmpl.add("REMOTE", "YES" if remote else "NO")
    tmpl.erase("TYPE")
    if kind == "state":
        _parse_state(tmpl)
    else:
        call = tmpl.get("CALL") or ""
        tmpl.erase("CALL")
        if not call.startswith("one.internal") and (call not in REGISTRY
                                                    or call in UNPUBLISHED):
            raise _internal(f"API call does not exist or is not supported: {call}")
        tmpl.add("CALL", call)
    hook = Hook(core.store.next_id("hooks"), name, kind, tmpl)
    core.store.hooks[hook.id] = hook
    ctx.extra_xml = hook_xml(hook, with_log=False)
    return hook.id


def _parse_state(tmpl: Any) -> None:
    resource = (tmpl.get("RESOURCE") or "").upper()
    if not resource:
        raise _internal("RESOURCE attribute is required for STATE hooks.")
    if resource == "VM":
        on = (tmpl.get("ON") or "").upper()
        tmpl.erase("ON")
        if on in VM_SHORTCUTS:
            state, lcm = VM_SHORTCUTS[on]
        elif on == "CUSTOM":
            state = tmpl.get("STATE") or ""
            lcm = tmpl.get("LCM_STATE") or ""
            if state not in VmState.__members__:
                raise _internal(f"Wrong STATE: {state}")
            if lcm not in Lcm.__members__:
                raise _internal(f"Wrong LCM_STATE: {lcm}")
        else:
            raise _internal(f"Unkown state condition: {on}")
        tmpl.replace("STATE", state)
        tmpl.replace("LCM_STATE", lcm)
    elif resource in ("IMAGE", "HOST", "NET"):
        state = (tmpl.get("STATE") or "").upper()
        valid = (ImageState.__members__ if resource == "IMAGE" else
                 HOST_STATES if resource == "HOST" else ("INIT", "READY", "LOCK", "ERROR",
                                                         "DONE"))
        if state not in valid:
            raise _internal("Hook STATE attribute not found or invalid")
    else:
        raise _internal(f"Invalid resource type: {tmpl.get('RESOURCE')}")


def _hook(core: Oned, hid: int) -> Hook:
    hook = core.store.hooks.get(hid)
    if hook is None:
        raise no_exists("HOOK", hid)
    return hook


@method("one.hook.info", "ib", 1, obj="HOOK", info=True)
def hook_info(core: Oned, ctx: Ctx, hid: int, decrypt: bool = False) -> str:
    hook = _hook(core, hid)
    _admin(ctx)
    return hook_xml(hook, with_log=True)


@method("one.hookpool.info", "iii", 0, obj="HOOK", info=True)
def hookpool_info(core: Oned, ctx: Ctx, *_ignored: int) -> str:
    _admin(ctx)
    hooks = sorted(core.store.hooks.values(), key=lambda h: h.id, reverse=True)
    return pool_xml("HOOK_POOL", [hook_xml(h, with_log=False) for h in hooks])


@method("one.hook.delete", "i", obj="HOOK")
def hook_delete(core: Oned, ctx: Ctx, hid: int) -> int:
    hook = _hook(core, hid)
    ctx.extra_xml = hook_xml(hook, with_log=False)
    _admin(ctx)
    del core.store.hooks[hid]
    return hid


@method("one.hook.update", "isi", 2, obj="HOOK")
def hook_update(core: Oned, ctx: Ctx, hid: int, text: str, mode: int = 0) -> int:
    """SharedAPI::update -> PoolObjectSQL::replace_template (0) or
    append_template (1), then Hook::post_update_template: COMMAND must be
    there, REMOTE is re-read as a boolean, and the type's own check
    (HookStateVM: STATE and LCM_STATE valid; HookAPI: CALL exists;
    HookStateImage/Host/VirtualNetwork: STATE). NAME and TYPE do not change;
    on any error the old template stays."""
    hook = _hook(core, hid)
    _admin(ctx)
    if mode not in (0, 1):
        raise OneError(ErrorCode.RPC_API, "Wrong update type")
    try:
        new = parse_str_or_xml(text)
    except TemplateError as exc:
        raise _internal(f"Cannot update template. {exc}") from exc
    if mode == 1:
        merged = hook.template.copy()
        merged.merge(new)
        new = merged
    error = _post_update(hook, new)
    if error:
        raise _internal(f"Cannot update template. {error}")
    hook.template = new
    return hid


def _post_update(hook: Hook, tmpl: Any) -> str:
    command = tmpl.get("COMMAND") or ""
    if not command:
        return "The COMMAND attribute is not defined."
    tmpl.replace("COMMAND", command)
    remote = tmpl.get("REMOTE")
    if remote is not None:
        tmpl.replace("REMOTE", "YES" if str(remote).upper() == "YES" else "NO")
    if hook.type == "api":
        call = tmpl.get("CALL") or ""
        if not call.startswith("one.internal") and (call not in REGISTRY
                                                    or call in UNPUBLISHED):
            return "The CALL attribute is not defined or it's invalid."
        tmpl.replace("CALL", call)
        return ""
    resource = (hook.template.get("RESOURCE") or "").upper()
    state = tmpl.get("STATE") or ""
    if resource == "VM":
        if state not in VmState.__members__:
            return "The STATE attribute is not defined or it's invalid."
        if (tmpl.get("LCM_STATE") or "") not in Lcm.__members__:
            return "The LCM_STATE attribute is not defined or it's invalid."
    elif not state:
        return "The STATE attribute is not defined or it's invalid."
    return ""


@method("one.hook.retry", "ii", obj="HOOK")
def hook_retry(core: Oned, ctx: Ctx, hid: int, exec_id: int) -> int:
    hook = _hook(core, hid)
    _admin(ctx)
    record = next((r for r in hook.log if f"<EXECUTION_ID>{exec_id}</EXECUTION_ID>" in r), None)
    if record is None:
        raise _internal("Invalid HookLog body. Arguments not found.")
    args = re.search(r"<ARGUMENTS>(.*?)</ARGUMENTS>", record, re.S)
    host = re.search(r"<REMOTE_HOST>(.*?)</REMOTE_HOST>", record, re.S)
    xml = (f"<HOOK_MESSAGE><ARGUMENTS>{b64(args.group(1) if args else '')}</ARGUMENTS>"
           f"<HOOK_ID>{hid}</HOOK_ID>"
           + (f"<REMOTE_HOST>{host.group(1)}</REMOTE_HOST>" if host else "")
           + "</HOOK_MESSAGE>")
    core.bus.submit_raw("RETRY", xml, b64(xml) + " ")
    return hid


@method("one.hooklog.info", "iiii", obj="HOOK", info=True)
def hooklog_info(core: Oned, ctx: Ctx, min_ts: int, max_ts: int, hid: int, rc: int) -> str:
    _admin(ctx)
    out = []
    for hook in sorted(core.store.hooks.values(), key=lambda h: h.id, reverse=True):
        if hid != -1 and hook.id != hid:
            continue
        for record in hook.log:
            ts = int(re.search(r"<TIMESTAMP>(\d+)</TIMESTAMP>", record).group(1))  # type: ignore
            code = int(re.search(r"<CODE>(-?\d+)</CODE>", record).group(1))  # type: ignore
            if (min_ts > 0 and ts < min_ts) or (max_ts > 0 and ts > max_ts):
                continue
            if (rc == -1 and code == 0) or (rc == 1 and code != 0):
                continue
            out.append(record)
    return "<HOOKLOG>" + "".join(out) + "</HOOKLOG>"


# ---------------------------------------------------------------------------
# The hook execution manager
# ---------------------------------------------------------------------------

_NOKOGIRI = threading.local()
_CDATA = re.compile(r"(<!\[CDATA\[.*?\]\]>)", re.S)


def nokogiri_parse(xml: str) -> Any:
    """Nokogiri::XML(content): libxml2 with RECOVER (oned does not escape
    API parameter values, so a '<' or '&' in one is repaired, not refused),
    CDATA kept. None if nothing could be recovered."""
    parser = getattr(_NOKOGIRI, "parser", None)
    if parser is None:
        parser = etree.XMLParser(recover=True, strip_cdata=False, resolve_entities=False,
                                 no_network=True, huge_tree=True)
        _NOKOGIRI.parser = parser
    try:
        return etree.fromstring(xml.encode(), parser)
    except etree.XMLSyntaxError:
        return None


def first(root: Any, name: str) -> Any:
    """event.xpath("//NAME")[0] (None when there is none)."""
    found = root.xpath(f"//{name}") if re.fullmatch(r"[A-Z_]+", name) else []
    return found[0] if found else None


def nokogiri_to_s(node: Any) -> str:
    """Node#to_s of a document parsed without an encoding: libxml2's
    formatted output (two-space indent, text-only elements on one line,
    empty ones as <X/>, no trailing newline) with xmlEscapeEntities turning
    every non-ASCII character outside CDATA into &#xHEX;. nil.to_s is ""."""
    if node is None:
        return ""
    text = etree.tostring(node, pretty_print=True, with_tail=False, encoding="unicode")
    parts = _CDATA.split(text.rstrip("\n"))
    for i in range(0, len(parts), 2):   # the even parts are outside CDATA
        parts[i] = re.sub(r"[^\x00-\x7f]", lambda m: f"&#x{ord(m.group(0)):X};", parts[i])
    return "".join(parts)


def encode64(data: bytes) -> str:
    """Ruby's Base64.encode64: 60 characters a line, each line ends in \\n."""
    text = base64.b64encode(data).decode()
    return "".join(text[i:i + 60] + "\n" for i in range(0, len(text), 60))


class HookExecutionManager:
    def __init__(self, core: Oned) -> None:
        self.core = core
        self.base_path = core.root / "remotes" / "hooks"
        self._pool = ThreadPoolExecutor(max_workers=10, thread_name_prefix="onesim-hem")
        self._active = 0
        self._cond = threading.Condition()
        self._procs: set[subprocess.Popen[bytes]] = set()
        core.bus.add_listener(self.on_event)

    def on_event(self, key: str, xml: str) -> None:
        parts = key.split(" ")
        if parts[0] == "RETRY":
            self._retry(xml)
            return
        if parts[0] != "EVENT" or len(parts) < 3 or parts[1] not in ("API", "STATE"):
            return
        kind, hkey = parts[1], parts[2]
        if kind == "STATE":
            hkey = re.sub(r"(?:.(?!/))+$", "", hkey)
        with self.core.store.lock:
            hooks = [h for h in self.core.store.hooks.values() if self._key(h) == hkey
                     and h.type == kind.lower()]
        for hook in hooks:
            self._submit(hook, self._arguments(hook, xml), self._remote_host(xml), False)

    @staticmethod
    def _key(hook: Hook) -> str:
        t = hook.template
        if hook.type == "api":
            return t.get("CALL") or ""
        return f"{t.get('RESOURCE') or ''}/{t.get('STATE') or ''}/{t.get('LCM_STATE') or ''}"

    @staticmethod
    def _arguments(hook: Hook, xml: str) -> str:
        """Hook#arguments: $API is the message's first <CALL_INFO> and
        $TEMPLATE the first element named after HOOK_OBJECT, each as
        Nokogiri re-serialises it (`to_s`), then Base64.strict_encode64."""
        args = hook.template.get("ARGUMENTS")
        if not args:
            return ""
        api = template = ""
        root = nokogiri_parse(xml)
        if root is None:
            return ""
        kind = (root.findtext("HOOK_TYPE") or "").upper()
        if kind == "API":
            api = b64(nokogiri_to_s(first(root, "CALL_INFO")))
        elif kind == "STATE":
            name = (root.findtext("HOOK_OBJECT") or "").upper()
            name = "VNET" if name == "NET" else name
            template = b64(nokogiri_to_s(first(root, name)))
        out = []
        for arg in args.split(" "):
            out.append(api if arg == "$API" else template if arg == "$TEMPLATE" else arg)
        return " ".join(out).strip()

    @staticmethod
    def _remote_host(xml: str) -> str:
        if "<HOOK_TYPE>API</HOOK_TYPE>" in xml:
            return ""
        m = re.search(r"<REMOTE_HOST>([^<]*)</REMOTE_HOST>", xml)
        return m.group(1) if m else ""

    def _retry(self, xml: str) -> None:
        root = etree.fromstring(xml.encode())
        hid = int(root.findtext("HOOK_ID") or "-1")
        args = base64.b64decode(root.findtext("ARGUMENTS") or "").decode()
        with self.core.store.lock:
            hook = self.core.store.hooks.get(hid)
        if hook is not None:
            self._submit(hook, args, root.findtext("REMOTE_HOST") or "", True)

    def _submit(self, hook: Hook, params: str, host: str, retry: bool) -> None:
        with self._cond:
            self._active += 1
        self._pool.submit(self._execute, hook, params, host, retry)

    def _execute(self, hook: Hook, params: str, host: str, retry: bool) -> None:
        try:
            t = hook.template
            command = t.get("COMMAND") or ""
            if not command.startswith("/"):
                command = f"{self.base_path}/{command}"
            stdin = None
            if (t.get("ARGUMENTS_STDIN") or "").lower() == "yes":
                stdin = params
            elif params:
                command = f"{command} {params}"
            timeout = t.get("TIMEOUT")
            code, out, err = self._run(command, stdin, int(timeout) if timeout else None)
            result = (f"<ARGUMENTS>{params}</ARGUMENTS><EXECUTION_RESULT>"
                      f"<COMMAND>{command}</COMMAND><STDOUT>{encode64(out)}</STDOUT>"
                      f"<STDERR>{encode64(err)}</STDERR><CODE>{code}</CODE></EXECUTION_RESULT>")
            if host and (t.get("REMOTE") == "YES" or retry):
                result += f"<REMOTE_HOST>{host}</REMOTE_HOST>"
            if retry:
                result += "<RETRY>yes</RETRY>"
            self._record(hook.id, result)
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _run(self, command: str, stdin: str | None,
             timeout: int | None) -> tuple[int, bytes, bytes]:
        """LocalCommand.run: a shell in its own process group, killed with
        TERM when TIMEOUT expires (code 255, "Timeout executing ...")."""
        proc = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        with self._cond:
            self._procs.add(proc)
        try:
            out, err = proc.communicate((stdin or "").encode(), timeout=timeout or None)
            return proc.returncode if proc.returncode >= 0 else 255, out, err
        except subprocess.TimeoutExpired:
            self._kill(proc)
            proc.communicate()
            return 255, b"", f"Timeout executing {command}".encode()
        finally:
            with self._cond:
                self._procs.discard(proc)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass

    def _record(self, hid: int, result: str) -> None:
        """HookLog::add."""
        with self.core.store.lock:
            hook = self.core.store.hooks.get(hid)
            if hook is None:
                return
            exec_id = hook.next_execution
            record = (f"<HOOK_EXECUTION_RECORD><HOOK_ID>{hid}</HOOK_ID>"
                      f"<EXECUTION_ID>{exec_id}</EXECUTION_ID><TIMESTAMP>{now()}</TIMESTAMP>"
                      f"{result}</HOOK_EXECUTION_RECORD>")
            try:
                etree.fromstring(record.encode())
            except etree.XMLSyntaxError:
                return  # oned refuses to store a body that is not XML
            hook.next_execution = exec_id + 1
            hook.log.append(record)
            hook.log = hook.log[-LOG_RETENTION:]
            self.core.save()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._active == 0, timeout)

    def close(self) -> None:
        """Stop: hooks still running are killed (their records are not kept)."""
        with self._cond:
            running = list(self._procs)
        for proc in running:
            self._kill(proc)
        self._pool.shutdown(wait=True, cancel_futures=True)
