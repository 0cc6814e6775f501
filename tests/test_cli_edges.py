"""Ids on the command line: out-of-range or non-numeric -> exit 2 with one
line naming the command and the argument, before any work; never
"internal error" (oned's ids are C ints, 0 .. 2^31-1; backup ids are SQLite
rowids, 1 .. 2^63-1)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from agent.cli import cli
from tests.agentkit import Cloud, offline_config

# Every command with an id, as (command words, argv with {} for the id under
# test, the name the error must show, what the id is).
CASES: list[tuple[str, list[str], str, str]] = [
    ("backup", ["backup", "{}"], "VM_ID", "one"),
    ("backup", ["backup", "1", "--exclude-disk", "{}"], "--exclude-disk", "one"),
    ("list", ["list", "{}"], "VM_ID", "one"),
    ("catalog sync", ["catalog", "sync", "{}"], "VM_ID", "one"),
    ("show", ["show", "{}"], "BACKUP_ID", "backup"),
    ("restore", ["restore", "{}"], "BACKUP_ID", "backup"),
    ("restore", ["restore", "1", "--image-ds", "{}"], "--image-ds", "one"),
    ("restore", ["restore", "1", "--system-ds", "{}"], "--system-ds", "one"),
    ("restore-disk", ["restore-disk", "{}", "0"], "BACKUP_ID", "backup"),
    ("restore-disk", ["restore-disk", "1", "{}"], "DISK_ID", "one"),
    ("restore-disk", ["restore-disk", "1", "0", "--image-ds", "{}"], "--image-ds", "one"),
    ("export", ["export", "{}", "0", "-o", "OUT"], "BACKUP_ID", "backup"),
    ("export", ["export", "1", "{}", "-o", "OUT"], "DISK_ID", "one"),
    ("mount", ["mount", "{}", "0", "OUT"], "BACKUP_ID", "backup"),
    ("mount", ["mount", "1", "{}", "OUT"], "DISK_ID", "one"),
    ("snapshot create", ["snapshot", "create", "{}"], "VM_ID", "one"),
    ("snapshot list", ["snapshot", "list", "{}"], "VM_ID", "one"),
    ("snapshot revert", ["snapshot", "revert", "{}", "s"], "VM_ID", "one"),
    ("snapshot delete", ["snapshot", "delete", "{}", "s"], "VM_ID", "one"),
]

BAD = {
    "one": ["2147483648", "4294967301", "abc", "1.5", "0x10", " ", "9" * 5000, "١٢"],
    "backup": ["0", "9223372036854775808", "abc", "1e3", "9" * 5000],
}


def id_params() -> set[tuple[str, str]]:
    """(command, parameter) of every id the CLI takes, found in the CLI itself."""
    found = set()

    def walk(cmd: click.Command, path: list[str]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, [*path, name])
            return
        for p in cmd.params:
            name = p.name or ""
            if name.endswith(("_id", "_ds")) or name == "exclude":
                found.add((" ".join(path), name))
    walk(cli, [])
    return found


def test_the_cases_cover_every_id_of_every_command() -> None:
    covered = {(cmd, shown.lstrip("-").replace("-", "_").lower()
                if shown.startswith("-") else shown.lower()) for cmd, _, shown, _ in CASES}
    covered = {(c, "exclude" if n == "exclude_disk" else n) for c, n in covered}
    assert id_params() == covered


@pytest.mark.parametrize("command, argv, shown, kind", CASES,
                         ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_a_bad_id_exits_2_with_one_line(cloud: Cloud, capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path, command: str, argv: list[str],
                                        shown: str, kind: str) -> None:
    calls_before = len(cloud.sim.published())
    for bad in BAD[kind]:
        args = [a.replace("{}", bad).replace("OUT", str(tmp_path / "out")) for a in argv]
        r = cloud.run(*args, capsys=capsys)
        assert r.code == 2, (bad, r.err)
        assert r.err.count("\n") == 1 and r.err.endswith("\n"), r.err
        assert r.err.startswith(f"oneback {command}: "), r.err
        assert shown in r.err and "internal error" not in r.err, r.err
        assert r.out == ""
        assert len(r.err) < 300
    assert not (tmp_path / "out").exists()
    # nothing reached the cloud (no API call is published)
    assert len(cloud.sim.published()) == calls_before


def test_the_largest_ids_are_accepted_and_looked_up(cloud: Cloud,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    r = cloud.run("snapshot", "list", "2147483647", capsys=capsys)
    assert r.code not in (0, 1, 2) and "2147483647" in r.err and "internal" not in r.err
    r = cloud.run("show", "9223372036854775807", capsys=capsys)
    assert r.code not in (0, 1, 2) and "internal" not in r.err
    r = cloud.run("list", "2147483647", "--json", capsys=capsys)
    assert r.code == 0 and r.json() == []


def test_other_usage_errors_are_one_line_too(cloud: Cloud,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    for args, words in ((["backup"], "Missing argument 'VM_ID'"),
                        (["backup", "1", "--bogus"], "--bogus"),
                        (["nosuch"], "nosuch")):
        r = cloud.run(*args, capsys=capsys)
        assert r.code == 2 and r.err.count("\n") == 1 and words in r.err, r.err


@pytest.mark.parametrize("value", ["1000", "4096", "65536", str(3 * 1024 * 1024),
                                   str(128 * 1024 * 1024), "0", "-1048576", '"4M"', "true",
                                   "1048576.0", str(2**70)])
def test_block_size_must_be_a_power_of_two_from_1_to_64_mib(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str) -> None:
    cfg = _config(tmp_path, value)
    r = _run(["list", "--config", str(cfg)], capsys)
    assert r[0] == 3, r
    assert r[2].count("\n") == 1 and "storage.block_size must be a power of two" in r[2], r
    assert "1 MiB" in r[2] and "64 MiB" in r[2]


@pytest.mark.parametrize("value", [1024 * 1024, 4 * 1024 * 1024, 64 * 1024 * 1024])
def test_block_sizes_in_range_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           value: int) -> None:
    cfg = _config(tmp_path, str(value))
    assert _run(["init", "--config", str(cfg)], capsys)[0] == 0
    r = _run(["list", "--config", str(cfg), "--json"], capsys)
    assert r[0] == 0, r
    assert r[1].strip() == "[]"


def _config(tmp: Path, block_size: str) -> Path:
    return offline_config(tmp, f"block_size = {block_size}")


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from agent.cli import main
    capsys.readouterr()
    try:
        main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_proxy_vm_id_beyond_oneds_range_is_a_config_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, str(4 * 1024 * 1024))
    cfg.write_text(cfg.read_text().replace("vm_id = 0", "vm_id = 2147483648"))
    r = _run(["snapshot", "list", "1", "--config", str(cfg)], capsys)
    assert r[0] == 3 and "proxy.vm_id" in r[2] and r[2].count("\n") == 1, r
