"""`oneback doctor`: check this proxy VM's setup, one line per check with the fix."""

from __future__ import annotations

import click

from agent.commands import cli, config_option, json_option
from agent.errors import CheckFailed
from agent.render import emit_json

_MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}


@cli.command("doctor")
@config_option
@json_option
def doctor(config_file: str | None, as_json: bool) -> None:
    """Check the configuration, oned, the proxy VM, the event bus, the hooks
    and the repository; exit 20 if any check fails."""
    from agent import doctor as engine
    report = engine.run(config_file)
    if as_json:
        emit_json({"ok": not report.failed,
                   "checks": [{"name": c.name, "status": c.status, "message": c.message}
                              for c in report.checks]})
    else:
        for c in report.checks:
            click.echo(f"{_MARK[c.status]}  {c.name}: {c.message}")
    if report.failed:
        names = ", ".join(c.name for c in report.failed)
        raise CheckFailed(f"doctor: {len(report.failed)} check(s) failed ({names}); each"
                          f" names its fix")
