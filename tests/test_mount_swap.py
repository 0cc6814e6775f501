"""`oneback mount` checks its mountpoint, then mounts it: a directory on the
way that another user can change would let them swap the mountpoint for a
link in between (and have the backup's disk appear where they chose). Such
mountpoints are refused; a sticky world-writable parent (/tmp) is fine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import mount
from agent.errors import UsageError


def test_a_mountpoint_under_a_directory_others_can_change_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)                   # anyone may rename entries here
    target = shared / "mnt"
    target.mkdir()
    with pytest.raises(UsageError, match="can be changed by another user"):
        mount.check_mountpoint(target)
    shared.chmod(0o1777)                  # sticky, as /tmp: others cannot rename ours
    assert mount.check_mountpoint(target) == Path(os.path.realpath(target))
    shared.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(shared, 12345, 12345)    # another user's directory
        with pytest.raises(UsageError, match="owner uid 12345"):
            mount.check_mountpoint(target)


def test_the_checked_mountpoint_is_the_real_path(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert mount.check_mountpoint(link) == real
