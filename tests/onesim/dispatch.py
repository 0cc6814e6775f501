"""One XML-RPC call, from body to response, as RequestXRPC::execute runs it.

Owns: the method registry (`@method`: name, parameter signature, required
count, the object named in messages, info or not), parameter checks
(xmlrpc-c faults), authentication, call faults and delays, running the
handler under the store lock, oned's failure messages
(Request::failure_message), the API event of every non-info call, the
work the LCM does after the call, and persisting the database.
Must not: implement methods (api_* modules register them).
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from tests.onesim import auth, wire
from tests.onesim.constants import OBJECT_NAMES, ErrorCode
from tests.onesim.events import api_event
from tests.onesim.oned import Caller, Oned, OneError


@dataclass
class Ctx:
    """RequestAttributes: who calls, and what the API event carries."""

    caller: Caller
    method: str
    extra_xml: str = ""
    sim: Any = None  # the Simulator's services (lifecycle, hotplug, imaging, hooks)


@dataclass
class Method:
    name: str
    signature: str
    required: int
    handler: Callable[..., Any]
    obj: str
    info: bool = False
    published: bool = True


REGISTRY: dict[str, Method] = {}

# src/hm/HookAPI.cc unsupported_calls: never published on the bus
UNPUBLISHED = {
    "one.vm.info", "one.vmpool.info", "one.vmpool.infoextended", "one.template.info",
    "one.templatepool.info", "one.host.info", "one.hostpool.info", "one.group.info",
    "one.grouppool.info", "one.groupquota.info", "one.vn.info", "one.vnpool.info",
    "one.user.info", "one.userpool.info", "one.userquota.info", "one.datastore.info",
    "one.datastorepool.info", "one.image.info", "one.imagepool.info", "one.acl.info",
    "one.vntemplate.info", "one.vntemplatepool.info", "one.cluster.info",
    "one.clusterpool.info", "one.document.info", "one.documentpool.info", "one.zone.info",
    "one.zonepool.info", "one.secgroup.info", "one.secgrouppool.info", "one.vmgroup.info",
    "one.vmgrouppool.info", "one.vdc.info", "one.vdcpool.info", "one.vrouter.info",
    "one.vrouterpool.info", "one.market.info", "one.marketpool.info", "one.marketapp.info",
    "one.marketapppool.info", "one.hook.info", "one.hookpool.info", "one.hooklog.info",
}


DriverHandler = Callable[[Oned, Any, dict[str, Any]], None]
DRIVERS: dict[str, DriverHandler] = {}
"""Driver answers an api_* module owns (engine operations), by name."""


def driver(name: str) -> Callable[[DriverHandler], DriverHandler]:
    """Register `fn(core, sim, op)` as the engine operation `name`; every
    Dispatcher binds them to its engine (before the engine resumes)."""
    def wrap(fn: DriverHandler) -> DriverHandler:
        DRIVERS[name] = fn
        return fn
    return wrap


def method(name: str, signature: str, required: int | None = None, obj: str = "VM",
           info: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler `fn(core, ctx, *params)` for `name`; `signature`
    lists the types after the session (i int, s string, b boolean)."""
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY[name] = Method(name, signature, len(signature) if required is None
                                else required, fn, obj, info,
                                published=name not in UNPUBLISHED)
        return fn
    return wrap


def failure_message(method_name: str, err: OneError, obj: str, uid: int) -> str:
    obname = OBJECT_NAMES.get(err.obj or obj, (err.obj or obj).lower())
    head = f"[{method_name}] "
    code = err.code
    if code == ErrorCode.AUTHORIZATION:
        if err.message:
            return head + f"User [{uid}] : {err.message}."
        return head + f"User [{uid}] not authorized to perform action on {obname}."
    if code == ErrorCode.AUTHENTICATION:
        return head + "User couldn't be authenticated, aborting call."
    if code == ErrorCode.NO_EXISTS:
        return head + (f"Error getting {obname} [{err.resp_id}]." if err.resp_id != -1
                       else f"Error getting {obname} Pool.")
    if code == ErrorCode.ALLOCATE:
        return head + f"Error allocating a new {obname}." + (f" {err.message}" if err.message
                                                             else "")
    if code == ErrorCode.LOCKED:
        return head + f"The resource {obname} is locked." + (
            f" [{err.resp_id}]." if err.resp_id != -1 else "")
    return head + err.message


@dataclass
class Dispatcher:
    core: Oned
    sim: Any = None

    def __post_init__(self) -> None:
        if self.core.engine is not None:
            for name, fn in DRIVERS.items():
                self.core.engine.register(name, partial(fn, self.core, self.sim))

    def handle(self, body: bytes) -> bytes:
        try:
            name, params = wire.decode_call(body)
            spec = REGISTRY.get(name)
            if spec is None:
                raise wire.Fault(-506, f"Method '{name}' not defined")
            wire.check_params("s" + spec.signature, params, 1 + spec.required)
        except wire.Fault as fault:
            return wire.encode_fault(fault)
        return wire.encode_result(self.call(spec, list(params)))

    def call(self, spec: Method, params: list[Any]) -> list[Any]:
        core = self.core
        with core.store.lock:
            caller = auth.authenticate(core.store, params[0])
        if caller is None:
            msg = failure_message(spec.name, OneError(ErrorCode.AUTHENTICATION), spec.obj, -1)
            return [False, msg, int(ErrorCode.AUTHENTICATION), -1, wire.I8(-1)]
        delay = core.faults.call_delay(spec.name)
        if delay:
            time.sleep(delay)
        with core.store.lock:
            caller.req_id = core.store.next_request()
            ctx = Ctx(caller, spec.name, sim=self.sim)
            core.begin_request()
            core.bus.hold()
            try:
                injected = core.faults.take_call(spec.name)
                if injected is not None:
                    raise OneError(injected[0], injected[1])
                value = spec.handler(core, ctx, *params[1:])
                result: list[Any] = [True, value, 0]
                out: list[Any] = [value, 0]
            except OneError as err:
                msg = failure_message(spec.name, err, spec.obj, caller.uid)
                result = [False, msg, err.code, err.resp_id, wire.I8(-1)]
                out = [msg, err.code, err.resp_id]
            except Exception as exc:  # a simulator bug: answer, and say so on stderr
                traceback.print_exc(file=sys.stderr)
                msg = f"[{spec.name}] onesim internal error: {exc!r}"
                result = [False, msg, int(ErrorCode.INTERNAL), -1, wire.I8(-1)]
                out = [msg, int(ErrorCode.INTERNAL), -1]
            deferred = core.end_request()
            core.bus.release(spec.name, api_event(spec.name, params, bool(result[0]), out,
                                                  ctx.extra_xml) if spec.published else None)
            core.run_deferred(deferred)
            if not spec.info:
                core.save()
        return result

