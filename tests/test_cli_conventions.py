"""CLI conventions: `--config` and `--json` work before the subcommand as well
as after it (restic's global flags); when both are given the subcommand's own
(the later) one wins; `oneback --help` lists every command by task; a bad flag
stays one line, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from agent.cli import cli, main
from agent.commands import OTHER, SECTIONS, config_option, json_option
from tests.agentkit import REPO, env_without_oneback, init_repository, offline_config


def oneback(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, cwd=REPO, env=env_without_oneback(), timeout=60)


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = offline_config(tmp_path)
    init_repository(path)
    return path


def test_global_flags_before_and_after_the_command_mean_the_same(cfg: Path) -> None:
    forms = [
        ["list", "--config", str(cfg), "--json"],
        ["--config", str(cfg), "--json", "list"],
        ["--json", "list", "--config", str(cfg)],
        ["--config", str(cfg), "list", "--json"],
    ]
    outs = []
    for argv in forms:
        r = oneback(*argv)
        assert r.returncode == 0, (argv, r.stderr)
        outs.append(json.loads(r.stdout))
    assert all(o == outs[0] for o in outs) and outs[0] == []
    # without --json anywhere: text, not JSON
    text = oneback("--config", str(cfg), "status")
    assert text.returncode == 0 and text.stdout.startswith("running: 0"), text
    flags_first = oneback("--json", "--config", str(cfg), "status")
    assert set(json.loads(flags_first.stdout)) >= {"queued", "running", "recent"}
    # a command inside a group (`catalog rebuild`) sees the global flags too
    nested = oneback("--json", "--config", str(cfg), "catalog", "rebuild", "--force")
    assert nested.returncode == 0, nested.stderr
    assert isinstance(json.loads(nested.stdout), dict)


def test_the_subcommands_config_wins_over_the_global_one(cfg: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    ok = oneback("--config", str(missing), "list", "--json", "--config", str(cfg))
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr
    bad = oneback("--config", str(cfg), "list", "--config", str(missing))
    assert bad.returncode != 0
    assert str(missing) in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    # the global one alone is used (not $ONEBACK_CONFIG, not /etc)
    alone = oneback("--config", str(missing), "list")
    assert str(missing) in alone.stderr, alone.stderr


def test_every_command_takes_the_global_flags_through_the_shared_options() -> None:
    """Each command's --config/--json comes from config_option/json_option
    (which fall back to the group's), so none ignores a global flag."""
    reference = {
        "config_file": click.Command("x", params=[]),
        "as_json": click.Command("x", params=[]),
    }
    config_option(reference["config_file"])
    json_option(reference["as_json"])
    callbacks = {name: next(p.callback for p in c.params if p.name == name)
                 for name, c in reference.items()}
    seen = 0

    def walk(cmd: click.Command, path: str) -> None:
        nonlocal seen
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, f"{path} {name}")
            return
        for p in cmd.params:
            if p.name in callbacks:
                seen += 1
                assert p.callback is not None and (
                    p.callback.__qualname__ == callbacks[p.name].__qualname__), (
                    f"{path}: --{'json' if p.name == 'as_json' else 'config'} is not"
                    " the shared option, so it ignores the global flag")
    walk(cli, "oneback")
    assert seen >= 20


def command_names(group: click.Group = cli) -> set[str]:
    return {name for name, c in group.commands.items() if not c.hidden}


def help_sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
            sections[current] = []
        elif current and line.startswith("  ") and line.strip():
            if not line.startswith("   "):
                sections[current].append(line.split()[0])
    return sections


def test_help_lists_every_command_once_under_its_task() -> None:
    r = oneback("--help")
    assert r.returncode == 0
    sections = help_sections(r.stdout)
    listed = [n for title, names in sections.items() if title not in ("Options",)
              for n in names]
    assert sorted(listed) == sorted(command_names()), sections
    assert len(listed) == len(set(listed))
    for title in ("Backup & restore", "Snapshots", "Repository", "Agent & operations"):
        assert title in sections and title in SECTIONS
    assert "backup" in sections["Backup & restore"]
    assert "snapshot" in sections["Snapshots"]
    assert "init" in sections["Repository"]
    assert "agent" in sections["Agent & operations"]
    assert "Commands" not in sections     # click's flat list is gone
    # grouped in the order of SECTIONS
    order = [t for t in sections if t != "Options"]
    assert order == [t for t in SECTIONS if t in order] + [t for t in order if t not in SECTIONS]


@pytest.fixture
def stray() -> Iterator[str]:
    @cli.command("zz-stray")
    def zz_stray() -> None:
        """A command no section names."""
    try:
        yield "zz-stray"
    finally:
        cli.commands.pop("zz-stray")


def test_a_command_in_no_section_is_listed_under_other(
        stray: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    sections = help_sections(capsys.readouterr().out)
    assert sections[OTHER] == [stray]
    assert list(sections)[-1] == OTHER


@pytest.mark.parametrize("argv", [
    ["--config"],                        # a global flag without its value
    ["--bogus", "list"],                 # an unknown global flag
    ["--json", "backup", "abc"],         # a bad id after global flags
    ["--config", "x.toml", "nosuchcommand"],
    ["list", "--config"],
])
def test_bad_flags_are_one_line_and_exit_2(argv: list[str]) -> None:
    r = oneback(*argv)
    assert r.returncode == 2, (argv, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oneback"), r.stderr
    assert "Usage:" not in r.stderr and "Traceback" not in r.stderr and r.stdout == ""
