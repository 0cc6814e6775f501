"""The OpenNebula hooks oneback registers, as `onehook create` templates.

Owns: which VM state changes and API calls wake the agent through
`hooks/oneback-hook`, and the template text for each. `oneback hooks install`
registers them with `one.hook.allocate`; `hooks/*.hook` holds the same text
for operators who prefer `onehook create` (a test keeps both identical).
Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_COMMAND = "/var/lib/one/remotes/hooks/oneback/oneback-hook"


@dataclass(frozen=True)
class HookDef:
    name: str
    attributes: tuple[tuple[str, str], ...]

    def template(self, command: str = DEFAULT_COMMAND) -> str:
        lines = [f'NAME = "{self.name}"', *(f'{k} = "{v}"' for k, v in self.attributes),
                 f'COMMAND = "{command}"', 'TIMEOUT = "30"']
        return "\n".join(lines) + "\n"


def _state(name: str, state: str, lcm: str) -> HookDef:
    return HookDef(name, (("TYPE", "state"), ("RESOURCE", "VM"), ("ON", "CUSTOM"),
                          ("STATE", state), ("LCM_STATE", lcm), ("ARGUMENTS", "state $TEMPLATE")))


def _api(name: str, call: str) -> HookDef:
    # oned's $API (CALL_INFO) does not name the call: the hook's arguments do.
    return HookDef(name, (("TYPE", "api"), ("CALL", call), ("ARGUMENTS", f"api {call} $API")))


HOOKS: tuple[HookDef, ...] = (
    _state("oneback-vm-running", "ACTIVE", "RUNNING"),
    _state("oneback-vm-poweroff", "POWEROFF", "LCM_INIT"),
    _state("oneback-vm-done", "DONE", "LCM_INIT"),
    _api("oneback-vm-update", "one.vm.update"),
    _api("oneback-vm-attach", "one.vm.attach"),
    _api("oneback-vm-detach", "one.vm.detach"),
)


def snapshot_hook(name: str, call: str, set_name: str, ttl: str = "48h",
                  command: str = DEFAULT_COMMAND) -> str:
    """A template an operator binds to any API call about a VM: when the
    call succeeded, the agent takes a snapshot set named `set_name` of the
    VM the call was about."""
    return HookDef(name, (("TYPE", "api"), ("CALL", call),
                          ("ARGUMENTS", f"snapshot {set_name} {ttl} {call} $API"))
                   ).template(command)
