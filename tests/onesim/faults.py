"""Faults on demand: what a test can make the simulated cloud do wrong.

Owns: the registry of injected faults and the questions the other modules
ask it: should this call fail or wait (`take_call`, `call_delay`), should
this driver operation fail or be slow (`take_driver`, `driver_delay`), should
this image be held LOCKED (`image_held`), should this event be dropped or
garbled (`filter_event`). Counters are consumed as faults fire.
Must not: change objects itself (the simulator applies image faults).

Driver operations: deploy, shutdown, poweroff, suspend, resume, attach,
detach, snapshot_create, snapshot_revert, snapshot_delete, saveas, image
(allocate: copy or mkfs) and image_delete; and plug/unplug, the guest seeing
a disk come or go (slow: that long after oned finished the attach/detach).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from tests.onesim.constants import ErrorCode

DRIVER_OPS = ("deploy", "shutdown", "poweroff", "suspend", "resume", "attach", "detach",
              "snapshot_create", "snapshot_revert", "snapshot_delete", "saveas", "image",
              "image_delete", "plug", "unplug")


@dataclass
class _Rule:
    key: str
    remaining: int | None  # None: until cleared
    vm_id: int | None = None
    disk_id: int | None = None
    code: int = ErrorCode.INTERNAL
    message: str = ""
    seconds: float = 0.0

    def matches(self, key: str, vm_id: int | None, disk_id: int | None) -> bool:
        return (self.key == key and (self.vm_id is None or self.vm_id == vm_id)
                and (self.disk_id is None or self.disk_id == disk_id)
                and (self.remaining is None or self.remaining > 0))

    def consume(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1


class Faults:
    """Thread-safe; `sim.faults` of a running Simulator."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._call_fail: list[_Rule] = []
        self._call_delay: list[_Rule] = []
        self._driver_fail: list[_Rule] = []
        self._driver_slow: list[_Rule] = []
        self._events: list[_Rule] = []
        self._held_images: set[int] = set()
        self._delayed: dict[str, int] = {}

    # -- what tests call --------------------------------------------------
    def fail_call(self, method: str, message: str = "Injected failure",
                  code: int = ErrorCode.INTERNAL, count: int | None = 1) -> None:
        """The next `count` calls of `method` (e.g. "one.vm.attach") answer
        [false, "[method] message", code, -1, -1] without doing anything."""
        with self._lock:
            self._call_fail.append(_Rule(method, count, code=int(code), message=message))

    def delay_call(self, method: str, seconds: float, count: int | None = None) -> None:
        """Calls of `method` wait `seconds` before they are processed."""
        with self._lock:
            self._call_delay.append(_Rule(method, count, seconds=seconds))

    def delayed(self, method: str) -> int:
        """How many calls of `method` have arrived and begun a `delay_call`
        wait: a test can act while such a call is in flight in oned."""
        with self._lock:
            return self._delayed.get(method, 0)

    def fail_driver(self, op: str, count: int | None = 1, vm_id: int | None = None,
                    disk_id: int | None = None,
                    message: str = "onesim: injected driver failure") -> None:
        """The driver phase of the next `count` `op` operations (optionally only
        for one VM / disk) fails as oned shows it; message "" or "-" leaves
        no USER_TEMPLATE/ERROR (like the dummy drivers)."""
        self._check_op(op)
        with self._lock:
            self._driver_fail.append(_Rule(op, count, vm_id, disk_id, message=message))

    def slow_driver(self, op: str, seconds: float, count: int | None = 1,
                    vm_id: int | None = None, disk_id: int | None = None) -> None:
        """The driver phase of the next `count` `op` operations takes `seconds` more."""
        self._check_op(op)
        with self._lock:
            self._driver_slow.append(_Rule(op, count, vm_id, disk_id, seconds=seconds))

    def hold_image(self, image_id: int) -> None:
        """The image stays LOCKED after its driver operation until released."""
        with self._lock:
            self._held_images.add(image_id)

    def release_image(self, image_id: int) -> None:
        with self._lock:
            self._held_images.discard(image_id)

    def drop_events(self, count: int | None = 1, prefix: str = "") -> None:
        """The next `count` published messages whose key starts with `prefix`
        are not sent (in-process listeners such as hooks still see them)."""
        with self._lock:
            self._events.append(_Rule("drop:" + prefix, count))

    def garble_events(self, count: int | None = 1, prefix: str = "") -> None:
        """The next `count` matching messages are sent with a body that is
        not valid base64 of a HOOK_MESSAGE."""
        with self._lock:
            self._events.append(_Rule("garble:" + prefix, count))

    def clear(self) -> None:
        with self._lock:
            for rules in (self._call_fail, self._call_delay, self._driver_fail,
                          self._driver_slow, self._events):
                rules.clear()
            self._held_images.clear()

    # -- what the simulator asks -----------------------------------------
    def take_call(self, method: str) -> tuple[int, str] | None:
        with self._lock:
            for rule in self._call_fail:
                if rule.matches(method, None, None):
                    rule.consume()
                    return rule.code, rule.message
        return None

    def call_delay(self, method: str) -> float:
        with self._lock:
            for rule in self._call_delay:
                if rule.matches(method, None, None):
                    rule.consume()
                    self._delayed[method] = self._delayed.get(method, 0) + 1
                    return rule.seconds
        return 0.0

    def take_driver(self, op: str, vm_id: int | None, disk_id: int | None) -> str | None:
        with self._lock:
            for rule in self._driver_fail:
                if rule.matches(op, vm_id, disk_id):
                    rule.consume()
                    return rule.message
        return None

    def driver_delay(self, op: str, vm_id: int | None, disk_id: int | None) -> float:
        with self._lock:
            for rule in self._driver_slow:
                if rule.matches(op, vm_id, disk_id):
                    rule.consume()
                    return rule.seconds
        return 0.0

    def image_held(self, image_id: int) -> bool:
        with self._lock:
            return image_id in self._held_images

    def filter_event(self, key: str, body: str) -> str | None:
        with self._lock:
            for rule in self._events:
                kind, _, prefix = rule.key.partition(":")
                if key.startswith(prefix) and (rule.remaining is None or rule.remaining > 0):
                    rule.consume()
                    return None if kind == "drop" else "!!" + body[::-1] + "%%"
        return body

    @staticmethod
    def _check_op(op: str) -> None:
        if op not in DRIVER_OPS:
            raise ValueError(f"unknown driver operation {op!r}; one of {DRIVER_OPS}")
