"""The `oneback` command line: validate flags, call one engine function, render.

Owns: the entry point, the registration of every command (from the
`agent.commands` modules, one per task) and the single mapping of errors to
exit codes. Commands validate flags, call one engine function and render,
for people or as one JSON document (`--json`).
Must not: contain engine logic.
"""

from __future__ import annotations

import os
from typing import NoReturn

import click

# Registering the commands: each module adds its commands to the `cli` group.
# One line per module, so that adding a command module touches one line.
import agent.commands.backups  # noqa: F401
import agent.commands.copy  # noqa: F401
import agent.commands.doctor  # noqa: F401
import agent.commands.key  # noqa: F401
import agent.commands.mount  # noqa: F401
import agent.commands.repository  # noqa: F401
import agent.commands.service  # noqa: F401
import agent.commands.snapshots  # noqa: F401
from agent.commands import cli, json_option, runtime
from agent.errors import (
    EXIT_CODES,
    OnebackError,
    UsageError,
)
from agent.render import (
    emit_json,
)

__all__ = ["cli", "main", "runtime"]


@cli.command("exit-codes")
@json_option
def exit_codes(as_json: bool) -> None:
    """Print the table of exit codes."""
    table = [(0, "Success", "the command did what it was asked")]
    table += sorted(set(EXIT_CODES))
    if as_json:
        emit_json([{"code": c, "name": n, "meaning": d} for c, n, d in table])
        return
    for code, name, doc in table:
        click.echo(f"{code:>3}  {name}: {doc}")


def main(argv: list[str] | None = None) -> NoReturn:
    """Entry point: run the CLI; map OnebackError to its exit code and a one-line message."""
    # Backups hold disk data, VM documents (with their context) and secrets:
    # everything oneback creates is private to its user.
    old_umask = os.umask(0o077)
    try:
        _main(argv)
    finally:
        os.umask(old_umask)


def _main(argv: list[str] | None) -> NoReturn:
    try:
        cli.main(args=argv, prog_name="oneback", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("oneback: aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as e:
        # one line that names the command and the argument, never click's usage block
        where = e.ctx.command_path if isinstance(e, click.UsageError) and e.ctx else "oneback"
        message = " ".join(e.format_message().split())
        click.echo(f"{where}: {message}", err=True)
        raise SystemExit(UsageError.exit_code) from None
    except OnebackError as e:
        prefix = "oneback: internal error (please report): " if e.is_bug else "oneback: "
        click.echo(f"{prefix}{e.message}", err=True)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        click.echo("oneback: interrupted", err=True)
        raise SystemExit(130) from None
    except Exception as e:  # a bug: one line, never a traceback
        click.echo(f"oneback: internal error (please report): {type(e).__name__}: {e}", err=True)
        raise SystemExit(1) from None
    raise SystemExit(0)
