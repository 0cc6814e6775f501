"""The command line's shared parts: the `cli` group, the wiring of concrete
objects (`runtime`: config -> cloud, catalog, store, lease), signal handling,
and the parameter types and options every command uses.

Owns: what several commands share. The commands themselves live beside it,
one module per task (`repository`, `backups`, `snapshots`, `service`, `key`);
`agent.cli` imports them all and maps errors to exit codes.
Must not: contain engine logic.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from agent import __version__
from agent import config as config_mod
from agent.errors import (
    InternalError,
    Interrupted,
)
from agent.model import ONE_ID_MAX

# Commands that never talk to the cloud (--version, --help, list, show,
# exit-codes, export) must start at once: the modules that need the cloud,
# the agent's daemon or ZeroMQ are imported inside the commands that use
# them (tests/test_speed.py holds this).
if TYPE_CHECKING:
    from agent.attach import Workspace
    from agent.backup import Settings
    from agent.catalog import Catalog
    from agent.cloud import Cloud
    from agent.lease import Lease
    from agent.store import Backend


F = TypeVar("F", bound=Callable[..., Any])

# A restore that succeeded but left temporary objects behind (a failed detach,
# say) exits with this code, as `cleanup` does when it cannot remove something.
RESTORE_LEFTOVERS_EXIT = 4


@dataclass
class Runtime:
    cfg: config_mod.Config
    connection: Cloud | None   # None for commands that work from the catalog alone
    catalog: Catalog
    store: Backend
    lease: Lease

    @property
    def cloud(self) -> Cloud:
        if self.connection is None:
            raise InternalError("this command was wired without an OpenNebula connection")
        return self.connection

    def settings(self) -> Settings:
        from agent.backup import Settings
        return Settings.from_config(self.cfg)

    def workspace(self) -> Workspace:
        from agent.attach import Workspace
        return Workspace(self.cloud, self.catalog, self.lease.owner, self.cfg.proxy.vm_id,
                         attach_slots=threading.Semaphore(self.cfg.agent.max_attached))


@contextmanager
def runtime(config_file: str | None, *, cloud: bool = True) -> Iterator[Runtime]:
    from agent import repository
    from agent.lease import Lease
    cfg = config_mod.load(config_file)
    one = None
    if cloud:
        from agent.cloud import Cloud
        one = Cloud(cfg.opennebula.endpoint, cfg.opennebula.read_credentials(),
                    timeout=cfg.opennebula.timeout,
                    operation_timeout=cfg.opennebula.operation_timeout,
                    poll_interval=cfg.opennebula.poll_interval)
    catalog, store = repository.open_checked(cfg.storage, cfg.storage.catalog)
    try:
        lease = Lease.acquire(cfg.storage.catalog)
        try:
            yield Runtime(cfg, one, catalog, store, lease)
        finally:
            lease.release()
    finally:
        catalog.close()


# -- signals -----------------------------------------------------------------


@contextmanager
def interruptible(cancel: threading.Event) -> Iterator[None]:
    """First SIGTERM/SIGINT: stop cleanly (the engine undoes its work).
    Second: exit at once."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if cancel.is_set():
            raise SystemExit(130)
        cancel.set()
        raise Interrupted(f"stopped by {signal.Signals(signum).name}; cleaning up")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# -- ids ---------------------------------------------------------------------------


class IdType(click.ParamType[int]):
    """A whole number in [minimum, maximum]: OpenNebula ids (VMs, disks,
    datastores) are C ints, 0 .. 2^31-1; backup ids are the catalog's SQLite
    rowids, 1 .. 2^63-1. Anything else is refused before any work (exit 2)."""

    name = "id"

    def __init__(self, what: str, minimum: int, maximum: int) -> None:
        self.what, self.minimum, self.maximum = what, minimum, maximum

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number: int | None = value
        else:
            text = str(value).strip()
            number = int(text) if text.isascii() and text.isdigit() and len(text) <= 20 else None
        if number is None or not self.minimum <= number <= self.maximum:
            shown = str(value) if len(str(value)) <= 24 else str(value)[:21] + "..."
            self.fail(f"{shown!r} is not {self.what}: use a whole number from {self.minimum}"
                      f" to {self.maximum}", param, ctx)
        return number


ONE_ID = IdType("an OpenNebula id", 0, ONE_ID_MAX)
BACKUP_ID = IdType("a backup id", 1, 2**63 - 1)


# -- commands --------------------------------------------------------------------

# Global flags, as restic's: `--config` and `--json` may come before the
# subcommand (`oneback --config F backup 7`, `oneback --json list`) or after
# it. Both decorators below read the group's value when the subcommand was not
# given its own, so every command that uses them honours the global ones; when
# both are given, the subcommand's own `--config` wins (it is the later one).


def _global(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if ctx.get_parameter_source(param.name or name) not in (
                click.core.ParameterSource.DEFAULT, None):
            return value
        root = ctx.find_root()
        given = root.params.get(name) if root is not ctx else None
        return value if given is None else given
    return callback


_JSON_HELP = "Print exactly one JSON document on stdout."
_CONFIG_HELP = "Configuration file (else $ONEBACK_CONFIG, else /etc/oneback/oneback.toml)."
json_option = click.option("--json", "as_json", is_flag=True, callback=_global("as_json"),
                           help=_JSON_HELP)
config_option = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                             default=None, callback=_global("config_file"), help=_CONFIG_HELP)


# `oneback --help` lists the commands by task. A command's section is its
# name's entry here (commands other modules add go into SECTIONS, or set a
# `section` attribute on the command); a command in none is listed under
# "Other", so no command is ever hidden.
SECTIONS: dict[str, tuple[str, ...]] = {
    "Backup & restore": ("backup", "restore", "restore-disk", "export", "mount", "umount",
                         "copy", "cleanup"),
    "Browsing backups": ("list", "show"),
    "Snapshots": ("snapshot",),
    "Repository": ("init", "verify", "forget", "prune", "catalog", "key"),
    "Agent & operations": ("agent", "status", "doctor", "hooks", "exit-codes"),
}
OTHER = "Other"


def section_of(name: str, command: click.Command) -> str:
    explicit = getattr(command, "section", None)
    if isinstance(explicit, str) and explicit:
        return explicit
    return next((title for title, names in SECTIONS.items() if name in names), OTHER)


class TaskGroup(click.Group):
    """The `oneback` group: its help lists the commands grouped by task."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        longest = max((len(n) for n in self.list_commands(ctx)), default=0)
        width = formatter.width - 6 - longest
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is None or command.hidden:
                continue
            sections.setdefault(section_of(name, command), []).append(
                (name.ljust(longest), command.get_short_help_str(limit=max(width, 20))))
        order = [*SECTIONS, *sorted(t for t in sections if t not in SECTIONS and t != OTHER),
                 OTHER]
        for title in order:
            if sections.get(title):
                with formatter.section(title):
                    formatter.write_dl(sections[title])


@click.group(cls=TaskGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oneback")  # no importlib.metadata scan
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help=_CONFIG_HELP + " A command's own --config wins.")
@click.option("--json", "as_json", is_flag=True,
              help=_JSON_HELP[:-1] + " (every command that has --json).")
def cli(config_file: str | None, as_json: bool) -> None:
    """oneback: backup and recovery for OpenNebula KVM clouds.

    --config and --json may be given before the command or after it."""


class Percent(click.ParamType[float]):
    """A share in percent: more than 0, at most 100."""

    name = "percent"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        text = str(value).strip().removesuffix("%")
        try:
            number = float(text)
        except ValueError:
            number = -1.0
        if not 0 < number <= 100:
            self.fail(f"{str(value)[:24]!r} is not a percentage: use a number above 0 and up"
                      " to 100, e.g. 10", param, ctx)
        return number
