"""install/: the proxy-VM installer lays out private files and is re-runnable;
the example configuration is one oneback accepts."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

from agent import config

REPO = Path(__file__).resolve().parents[1]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_install_into_a_root_then_again(tmp_path: Path) -> None:
    cmd = ["bash", str(REPO / "install" / "install.sh"), "--root", str(tmp_path),
           "--no-python", "--no-systemd"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    etc = tmp_path / "etc" / "oneback"
    for name in ("oneback.toml", "one_auth", "hook_secret"):
        assert mode(etc / name) == 0o600, name
    assert len((etc / "hook_secret").read_text().strip()) >= 32
    assert (tmp_path / "etc" / "systemd" / "system" / "oneback.service").exists()
    assert "global_filter" in (tmp_path / "etc" / "lvm" / "lvmlocal.conf").read_text()
    secret = (etc / "hook_secret").read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "kept" in second.stdout and "kept" not in first.stdout
    assert (etc / "hook_secret").read_text() == secret   # never overwritten


def test_scripts_parse() -> None:
    for script in ("install.sh", "register-hooks.sh"):
        subprocess.run(["bash", "-n", str(REPO / "install" / script)], check=True)


def test_example_config_is_accepted(tmp_path: Path) -> None:
    text = (REPO / "install" / "oneback.toml.example").read_text()
    ctx = tmp_path / "one_env"
    ctx.write_text('export VMID="17"\n')
    text = text.replace("FRONTEND", "10.0.0.1").replace(
        'dev_root = "/dev"', f'dev_root = "/dev"\ncontext_file = "{ctx}"')
    path = tmp_path / "oneback.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert cfg.proxy.vm_id == 17 and cfg.agent.listen_port == 2640
    assert cfg.agent.listen_host == "127.0.0.1"   # strangers are not invited by default
