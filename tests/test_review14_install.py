"""Hostile review of issue 14's install: root's `oneback mount` through the
installed wrapper. The wrapper runs root's commands as the oneback user, but
a FUSE mount without allow_other is readable by its mounting user only, and
single-file restore needs root's losetup to read MOUNTPOINT/disk.raw (README,
"Single-file restore": run `mount` as root); fusermount also refuses a
root-owned mountpoint to that user. So mount and umount keep root.

The wrapper's decision is observed with `id` and `setpriv` stand-ins on PATH
(the machine running the tests need not have a oneback user)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_install_root import run_install

ID = """#!/bin/sh
case "$1" in -u) echo 0 ;; *) exit 0 ;; esac
"""
SETPRIV = """#!/bin/sh
echo "$*" >>"$SETPRIV_LOG"
exit 0
"""


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    run_install(root)
    return root / "usr" / "local" / "bin" / "oneback"


def _through_setpriv(wrapper: Path, tmp: Path, *args: str) -> bool:
    stubs = tmp / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, text in (("id", ID), ("setpriv", SETPRIV)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp / "setpriv.log"
    log.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ONEBACK", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=f"{stubs}:{env.get('PATH', '/usr/bin:/bin')}", SETPRIV_LOG=str(log),
               ONEBACK_CONFIG=str(tmp / "absent.toml"))
    subprocess.run(["sh", str(wrapper), *args], capture_output=True, text=True, env=env,
                   timeout=60, cwd=tmp)
    return log.exists()


def test_roots_mount_and_umount_stay_root_other_commands_drop_to_oneback(
        wrapper: Path, tmp_path: Path) -> None:
    assert _through_setpriv(wrapper, tmp_path, "backup", "7")
    assert _through_setpriv(wrapper, tmp_path, "--json", "list")
    assert _through_setpriv(wrapper, tmp_path, "--config", "mount", "list")   # a file named mount
    assert not _through_setpriv(wrapper, tmp_path, "mount", "17", "0", "/mnt/b17"), (
        "root's `oneback mount` runs as user oneback: root's losetup cannot read the"
        " FUSE file it serves (no allow_other)")
    assert not _through_setpriv(wrapper, tmp_path, "--config", "/etc/x.toml", "mount", "17",
                                "0", "/mnt/b17")
    assert not _through_setpriv(wrapper, tmp_path, "--json", "umount", "/mnt/b17")


def test_a_repository_path_with_a_space_or_percent_is_one_readwritepath(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """ReadWritePaths= is a whitespace-separated list whose words may be
    quoted, and `%` starts a systemd specifier: a repository at
    "/srv/back up/repo" written bare made two paths, neither of which
    exists, and the unit failed to start (226/NAMESPACE)."""
    root = tmp_path_factory.mktemp("root")
    run_install(root)
    cfg = root / "etc" / "oneback" / "oneback.toml"
    cfg.write_text(cfg.read_text().replace('repository = "/var/lib/oneback/repo"',
                                           'repository = "/srv/back up/100%/repo"'))
    run_install(root)
    dropin = root / "etc" / "systemd" / "system" / "oneback.service.d" / "paths.conf"
    assert 'ReadWritePaths="/srv/back up/100%%/repo"\n' in dropin.read_text()
