"""The OpenNebula hooks oneback registers, as `onehook create` templates.

Owns: which VM state changes and API calls wake the agent through
`hooks/oneback-hook`, and the template text for each. `oneback hooks install`
registers them with `one.hook.allocate`, and decides (`plan`) which of them
are missing, differ from what oned holds (then replaced with
`one.hook.update`) or are unchanged; `hooks/*.hook` holds the same text
for operators who prefer `onehook create` (a test keeps both identical).
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.errors import StateError
from agent.model import HookInfo

DEFAULT_COMMAND = "/var/lib/one/remotes/hooks/oneback/oneback-hook"
TIMEOUT = "30"   # seconds oned's hook manager gives the script


@dataclass(frozen=True)
class HookDef:
    name: str
    attributes: tuple[tuple[str, str], ...]

    def template(self, command: str = DEFAULT_COMMAND) -> str:
        lines = [f'NAME = "{self.name}"', *(f'{k} = "{v}"' for k, v in self.attributes),
                 f'COMMAND = "{command}"', f'TIMEOUT = "{TIMEOUT}"']
        return "\n".join(lines) + "\n"

    @property
    def type(self) -> str:
        return dict(self.attributes)["TYPE"]

    def stored(self, command: str = DEFAULT_COMMAND) -> dict[str, str]:
        """The TEMPLATE oned keeps for `template(command)`: Hook::insert takes
        NAME and TYPE out and adds REMOTE (NO); HookStateVM::parse_template
        turns ON into STATE and LCM_STATE (ours are CUSTOM: already explicit)."""
        kept = {k: v for k, v in self.attributes if k not in ("TYPE", "ON")}
        return {**kept, "COMMAND": command, "TIMEOUT": TIMEOUT, "REMOTE": "NO"}

    def update_template(self, command: str = DEFAULT_COMMAND) -> str:
        """The text for one.hook.update (replace): the stored template."""
        return "".join(f'{k} = "{v}"\n' for k, v in sorted(self.stored(command).items()))


@dataclass(frozen=True)
class Step:
    """What `hooks install` does about one hook: "create" (absent), "update"
    (oned's template differs: `changed` names the attributes), "unchanged"."""
    hook: HookDef
    action: str
    id: int | None
    changed: tuple[str, ...] = ()


def plan(registered: Iterable[HookInfo], command: str = DEFAULT_COMMAND,
         hooks: Iterable[HookDef] | None = None) -> list[Step]:
    """Compare oneback's hooks with those registered in oned, by name."""
    by_name: dict[str, HookInfo] = {}
    for old in sorted(registered, key=lambda i: i.id):
        by_name.setdefault(old.name, old)   # the oldest of a duplicated name
    steps = []
    for h in HOOKS if hooks is None else hooks:
        info = by_name.get(h.name)
        if info is None:
            steps.append(Step(h, "create", None))
            continue
        if info.type.lower() != h.type:
            raise StateError(f"hook {info.id} {h.name} is a {info.type} hook, oneback's is"
                             f" {h.type}: delete it (onehook delete {info.id}) and run"
                             f" oneback hooks install again")
        want, have = h.stored(command), dict(info.template)
        changed = tuple(sorted(k for k in want.keys() | have.keys()
                               if want.get(k) != have.get(k)))
        steps.append(Step(h, "update" if changed else "unchanged", info.id, changed))
    return steps


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
