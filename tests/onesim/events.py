"""The hook manager's event bus: a ZeroMQ PUB socket, fed in oned's order.

Owns: the HOOK_MESSAGE bodies oned builds (HookStateVM/Image/Host and
HookAPI::format_message), the keys one_hm.rb derives from them
(`EVENT VM 4/ACTIVE/RUNNING `, `EVENT STATE VM/ACTIVE/RUNNING/4 `,
`EVENT API one.vm.attach 1`, ...), the publisher thread that owns the socket,
and the in-process listeners (the hook execution manager) that see every
message in the same order. Faults can drop or garble published messages.
Must not: decide when an object changes state.
"""

from __future__ import annotations

import base64
import os
import queue
import random
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from tests.onesim.constants import HostState, ImageState, lcm_state_name, vm_state_name
from tests.onesim.documents import image_xml, vm_xml
from tests.onesim.model import Host, Image, Vm

Listener = Callable[[str, str], None]  # (key, xml body)

API_ORDERS = ("after", "before", "random")
"""Where a call's API event goes relative to the state events the call made
(ONESIM_API_EVENT_ORDER, or Bus.api_order[method]): oned triggers the state
event first (ImagePool::update in ImageManager::delete_image, then
RequestXRPC::execute), but one_hm.rb publishes each message from its own
thread (:concurrency => 15, :threaded => true), so subscribers see either
order (EVENT IMAGE n/DELETE/ and EVENT API one.image.delete 1, say)."""


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def vm_state_message(vm: Vm) -> str:
    state, lcm = vm_state_name(vm.state), lcm_state_name(vm.lcm)
    service = vm.user_template.get("SERVICE_ID")
    remote = (f"<REMOTE_HOST>{vm.last.hostname}</REMOTE_HOST>" if vm.last is not None
              else "<REMOTE_HOST/>")
    return ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>VM</HOOK_OBJECT>"
            f"<STATE>{state}</STATE><LCM_STATE>{lcm}</LCM_STATE><RESOURCE_ID>{vm.id}</RESOURCE_ID>"
            + (f"<SERVICE_ID>{service}</SERVICE_ID>" if service else "")
            + remote + vm_xml(vm) + "</HOOK_MESSAGE>")


def image_state_message(img: Image) -> str:
    return ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>IMAGE</HOOK_OBJECT>"
            f"<STATE>{ImageState(img.state).name}</STATE><RESOURCE_ID>{img.id}</RESOURCE_ID>"
            + image_xml(img) + "</HOOK_MESSAGE>")


def host_state_message(host: Host, host_doc: str) -> str:
    return ("<HOOK_MESSAGE><HOOK_TYPE>STATE</HOOK_TYPE><HOOK_OBJECT>HOST</HOOK_OBJECT>"
            f"<STATE>{HostState(host.state).name}</STATE>"
            f"<REMOTE_HOST>{host.name}</REMOTE_HOST><RESOURCE_ID>{host.id}</RESOURCE_ID>"
            + host_doc + "</HOOK_MESSAGE>")


def api_message(method: str, params: list[str], success: bool, out: list[str],
                extra: str) -> str:
    """HookAPI::format_message: IN parameters from 1 (the session masked),
    then the OUT values of the response; values are not escaped (as oned)."""
    parts = ["<HOOK_MESSAGE><HOOK_TYPE>API</HOOK_TYPE>", f"<CALL>{method}</CALL>",
             f"<CALL_INFO><RESULT>{int(success)}</RESULT><PARAMETERS>"]
    for pos, value in enumerate(params, start=1):
        parts.append(f"<PARAMETER><POSITION>{pos}</POSITION><TYPE>IN</TYPE>"
                     f"<VALUE>{value}</VALUE></PARAMETER>")
    for pos, value in enumerate(out, start=1):
        parts.append(f"<PARAMETER><POSITION>{pos}</POSITION><TYPE>OUT</TYPE>"
                     f"<VALUE>{value}</VALUE></PARAMETER>")
    parts.append(f"</PARAMETERS><EXTRA>{extra}</EXTRA></CALL_INFO></HOOK_MESSAGE>")
    return "".join(parts)


def state_keys(obj: str, oid: int, state: str, lcm: str = "",
               service: str | None = None) -> list[str]:
    keys = [f"EVENT {obj} {oid}/{state}/{lcm} ", f"EVENT STATE {obj}/{state}/{lcm}/{oid} "]
    if service:
        keys.append(f"EVENT SERVICE {service} ")
    return keys


class Bus:
    """Publishes (key, base64 body) pairs from one thread, in submit order."""

    def __init__(self, host: str, port: int) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        if port:
            self._sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{self.port}"
        self._queue: queue.Queue[tuple[str, str, str | None] | threading.Event | None] = \
            queue.Queue()
        self._listeners: list[Listener] = []
        self.fault_filter: Callable[[str, str], str | None] | None = None
        self._published: deque[tuple[str, str]] = deque(maxlen=20000)  # (key, xml)
        self._published_lock = threading.Lock()
        self._held = threading.local()
        default = os.environ.get("ONESIM_API_EVENT_ORDER", "after")
        self.default_api_order = default if default in API_ORDERS else "after"
        self.api_order: dict[str, str] = {}   # method -> one of API_ORDERS
        self._random = random.Random()
        self._thread = threading.Thread(target=self._run, name="onesim-bus", daemon=True)
        self._thread.start()

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def submit(self, keys: list[str], xml: str) -> None:
        """Publish `xml` (base64-encoded) under each key."""
        held: list[tuple[str, str, str | None]] | None = getattr(self._held, "items", None)
        for key in keys:
            if held is not None:
                held.append((key, xml, None))
            else:
                self._queue.put((key, xml, None))

    def hold(self) -> None:
        """Keep what this thread submits until `release` (one request)."""
        self._held.items = []

    def release(self, method: str, api: tuple[list[str], str] | None) -> None:
        """Publish what this thread held and the request's API event
        (`api`: keys and body), in the order API_ORDERS says for `method`."""
        held: list[tuple[str, str, str | None]] = getattr(self._held, "items", None) or []
        self._held.items = None
        order = self.api_order.get(method, self.default_api_order)
        first = order == "before" or (order == "random" and self._random.random() < 0.5)
        api_items = [(k, api[1], None) for k in api[0]] if api is not None else []
        for item in (api_items + held if first else held + api_items):
            self._queue.put(item)

    def submit_raw(self, key: str, xml: str, body: str) -> None:
        """Publish a message whose body is not plain base64 of `xml` (RETRY)."""
        self._queue.put((key, xml, body))

    def inject(self, key: str, body: str) -> None:
        """Publish a message oned would never send (a forged or garbled
        event, for tests): `body` is the raw second frame; listeners (the
        HEM) see no document."""
        self._queue.put((key, "", body))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if isinstance(item, threading.Event):
                item.set()
                continue
            key, xml, raw = item
            with self._published_lock:
                self._published.append((key, xml))
            for listener in self._listeners:
                try:
                    listener(key, xml)
                except Exception:  # a listener must never stop the bus
                    pass
            body: str | None = b64(xml) if raw is None else raw
            if self.fault_filter is not None and body is not None:
                body = self.fault_filter(key, body)
            if body is not None:
                self._sock.send_multipart([key.encode(), body.encode()])

    def published(self) -> list[tuple[str, str]]:
        """(key, xml) of everything published so far (the last 20000)."""
        with self._published_lock:
            return list(self._published)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything submitted so far has been published."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)
        self._sock.close(linger=0)
        self._ctx.term()


def api_event(method: str, params: list[Any], success: bool, out: list[Any],
              extra: str) -> tuple[list[str], str]:
    """RequestXRPC::execute: the session hidden, values written as
    ParamListXRPC::api_value does (no escaping), the answer as
    Request::make_xml_response writes it -> (keys, body)."""
    shown = ["****"] + [_param_text(p) for p in params[1:]]
    outs = [("true" if success else "false")] + [_param_text(v, out=True) for v in out]
    return [f"EVENT API {method} {int(success)}"], api_message(method, shown, success, outs,
                                                                extra)


def publish_api(bus: Bus, method: str, params: list[Any], success: bool, out: list[Any],
                extra: str) -> None:
    bus.submit(*api_event(method, params, success, out, extra))


def _param_text(value: Any, out: bool = False) -> str:
    """`oss << value`: an IN boolean is 1/0 (no boolalpha), an OUT one
    true/false (make_xml_response); a double as %g with 6 digits."""
    if isinstance(value, bool):
        return ("true" if value else "false") if out else str(int(value))
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)
