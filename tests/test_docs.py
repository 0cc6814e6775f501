"""The README and hooks/ stay true to the code (sqlite-utils' test_docs)."""

from __future__ import annotations

from pathlib import Path

import click

from agent.cli import cli
from agent.errors import EXIT_CODES
from agent.hookdefs import HOOKS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def commands(group: click.Group, prefix: str = "oneback") -> list[str]:
    found = []
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            found += commands(cmd, f"{prefix} {name}")
        else:
            found.append(f"{prefix} {name}")
    return found


def test_every_command_is_in_the_readme() -> None:
    for command in commands(cli):
        assert f"`{command}" in README, f"README does not document {command}"


def test_every_exit_code_is_in_the_readme() -> None:
    for code, _, _ in EXIT_CODES:
        assert f"| {code} |" in README, f"README lacks exit code {code}"


def test_readme_opens_with_the_two_commands() -> None:
    head = README[:600]
    assert "make demo" in head and "make test" in head


def test_hook_files_match_what_hooks_install_registers() -> None:
    for h in HOOKS:
        assert (REPO / "hooks" / f"{h.name}.hook").read_text() == h.template()


def test_every_module_is_in_the_architecture_section() -> None:
    section = README[README.index("## Architecture"):]
    for path in sorted((REPO / "agent").glob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        assert f"`agent/{path.name}`" in section, f"README's architecture lacks {path.name}"
    for package in ("store", "catalog", "commands"):
        assert f"`agent/{package}/`" in section
