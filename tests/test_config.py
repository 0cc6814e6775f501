"""Configuration: every key validated, one-line errors naming key and file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError

GOOD = """
[opennebula]
endpoint = "http://127.0.0.1:2633/RPC2"
credentials_file = "{auth}"
events = "tcp://127.0.0.1:2101"
[proxy]
vm_id = 17
dev_root = "/dev"
[storage]
repository = "{tmp}/repo"
catalog = "{tmp}/catalog.sqlite"
"""


def write(tmp_path: Path, text: str) -> Path:
    auth = tmp_path / "one_auth"
    auth.write_text("oneadmin:secret\n")
    auth.chmod(0o600)
    p = tmp_path / "oneback.toml"
    p.write_text(text.format(auth=auth, tmp=tmp_path))
    return p


def test_good_file_loads_with_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.proxy.vm_id == 17
    assert cfg.storage.block_size == 4 * 1024 * 1024
    assert cfg.opennebula.read_credentials() == "oneadmin:secret"
    assert cfg.storage.catalog == tmp_path / "catalog.sqlite"


def test_path_precedence(tmp_path: Path) -> None:
    assert config.config_path("a.toml", {"ONEBACK_CONFIG": "b.toml"}) == Path("a.toml")
    assert config.config_path(None, {"ONEBACK_CONFIG": "b.toml"}) == Path("b.toml")
    assert config.config_path(None, {}) == config.DEFAULT_PATH


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('endpoint = "http://127.0.0.1:2633/RPC2"', 'endpoint = "127.0.0.1:2633"',
         "opennebula.endpoint must be an http(s) URL"),
        ("vm_id = 17", 'vm_id = "seventeen"', "proxy.vm_id must be"),
        ("vm_id = 17", "", "missing key proxy.vm_id"),
        ('dev_root = "/dev"', 'dev_root = "/dev"\ncolour = 1', "unknown key proxy.colour"),
        ('repository = "{tmp}/repo"', "repository = 3", "storage.repository must be"),
        ("[storage]", "[storage]\nblock_size = 1000", "storage.block_size must be"),
    ],
)
def test_bad_keys_are_named(tmp_path: Path, old: str, new: str, message: str) -> None:
    p = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert message in str(e.value)
    assert str(p) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config FILE or set ONEBACK_CONFIG"):
        config.load(tmp_path / "nope.toml")


def test_credentials_must_be_private(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, GOOD))
    os.chmod(cfg.opennebula.credentials_file, 0o644)
    with pytest.raises(ConfigError, match="chmod 600") as e:
        cfg.opennebula.read_credentials()
    assert "secret" not in str(e.value)


def test_vm_id_auto_reads_context(tmp_path: Path) -> None:
    ctx = tmp_path / "one_env"
    ctx.write_text('export VMID="42"\nexport ETH0_IP="10.0.0.5"\n')
    text = GOOD.replace("vm_id = 17", f'vm_id = "auto"\ncontext_file = "{ctx}"')
    assert config.load(write(tmp_path, text)).proxy.vm_id == 42
    ctx.write_text("export ETH0_IP=1\n")
    with pytest.raises(ConfigError, match="has no VMID"):
        config.load(write(tmp_path, text))
