"""Commands that look after an encrypted repository's keys: `key passwd`,
`key export`, `key import` (the engine is `agent.keys`)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from agent import config as config_mod
from agent.commands import cli, config_option, json_option
from agent.errors import ConfigError, UsageError
from agent.render import emit_json


@cli.group("key")
def key_() -> None:
    """An encrypted repository's keys: change the passphrase, export and import the key."""


@key_.command("passwd")
@click.option("--new-passphrase-file", "new_file", required=True, metavar="FILE",
              type=click.Path(dir_okay=False),
              help="A file (mode 0600) holding the new passphrase.")
@config_option
@json_option
def key_passwd(new_file: str, config_file: str | None, as_json: bool) -> None:
    """Change the passphrase: the key is re-wrapped, no data is rewritten.
    Then put the new passphrase into storage.passphrase_file."""
    from agent import keys, repository
    cfg = config_mod.load(config_file)
    new = config_mod.read_passphrase_file(Path(new_file), "--new-passphrase-file")
    store = repository.open_store(cfg.storage)
    added, removed = keys.passwd(store, cfg.storage, new)
    if as_json:
        emit_json({"repository": str(cfg.storage.repository), "key": added,
                   "removed": removed[0], "removed_keys": removed})
        return
    click.echo(f"changed the passphrase of repository {cfg.storage.repository} (key {added}"
               f" replaces {', '.join(removed)}); now copy {new_file} over"
               f" {cfg.storage.passphrase_file}: the old passphrase no longer opens it")


@key_.command("export")
@click.option("--output", "-o", metavar="FILE", type=click.Path(dir_okay=False), default=None,
              help="Write the key to FILE (created with mode 0600; never overwritten)."
                   " Default: standard output.")
@config_option
@json_option
def key_export(output: str | None, config_file: str | None, as_json: bool) -> None:
    """Print (or write) the repository's master key, to keep somewhere safe: it
    opens the repository without the passphrase (storage.key_file). On
    standard output the key is one JSON document, with or without --json."""
    from agent import keys, repository
    cfg = config_mod.load(config_file)
    store = repository.open_store(cfg.storage)
    opened = keys.unlock(store, cfg.storage)
    if opened is None:
        raise UsageError(f"repository {cfg.storage.repository} is not encrypted; it has no"
                         " key to export")
    document = keys.export_document(opened.master)
    if output is None:
        click.echo(document.decode(), nl=False)
        return
    _write_private(Path(output), document)
    if as_json:
        emit_json({"repository": str(cfg.storage.repository), "output": output})
        return
    click.echo(f"wrote the key of repository {cfg.storage.repository} to {output} (mode"
               " 0600): keep it off this machine; with it, anyone can read the backups")


@key_.command("import")
@click.argument("key_file", metavar="FILE", type=click.Path(dir_okay=False))
@config_option
@json_option
def key_import(key_file: str, config_file: str | None, as_json: bool) -> None:
    """Make the passphrase in storage.passphrase_file open the repository again,
    from its exported key FILE (a forgotten passphrase, lost key files)."""
    from agent import keys, repository
    cfg = config_mod.load(config_file)
    document = config_mod.read_private_file(Path(key_file), "key file")
    store = repository.open_store(cfg.storage)
    added = keys.import_key(store, document, f"key file {key_file}", cfg.storage)
    if as_json:
        emit_json({"repository": str(cfg.storage.repository), "key": added})
        return
    click.echo(f"imported the key of repository {cfg.storage.repository} as key {added}: the"
               f" passphrase in {cfg.storage.passphrase_file} opens it")


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 (never over an existing file), durably."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError(f"{path} exists; choose another --output (a key is never written"
                         " over a file)") from None
    except OSError as e:
        raise ConfigError(f"cannot create {path}: {e.strerror}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]   # a short count: write the rest (or fail)
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        path.unlink(missing_ok=True)   # never leave a truncated key to be filed away
        raise ConfigError(f"cannot write the key to {path}: {e.strerror or e}; nothing was"
                          " written, check free space") from None
