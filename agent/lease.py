"""Ownership of in-flight work: which process still holds its journal entries.

Owns: a lock file per running oneback process (an flock held for the
process's lifetime) beside the catalog, and the question "is the owner of
this journal entry still alive?", and the locks all those processes share:
one backup per VM (`vm_lock`), one hot-plug at a time on the proxy VM
(`hotplug_lock`). A sweep removes the cloud objects of dead
owners only, so a `oneback backup` run by hand never tears down what the
agent is doing at the same moment. Must not: know about the cloud or SQL.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Lease:
    """This process's ownership token; `owner` is written into the journal."""

    def __init__(self, directory: Path, owner: str, fd: int) -> None:
        self.directory, self.owner, self._fd = directory, owner, fd

    @classmethod
    def acquire(cls, catalog_path: Path) -> Lease:
        directory = owners_dir(catalog_path)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = secrets.token_hex(4)
        fd = os.open(directory / f"{owner}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return cls(directory, owner, fd)

    def release(self) -> None:
        if self._fd >= 0:
            try:
                (self.directory / f"{self.owner}.lock").unlink(missing_ok=True)
            finally:
                os.close(self._fd)
                self._fd = -1


def owners_dir(catalog_path: Path) -> Path:
    return catalog_path.parent / (catalog_path.name + ".owners")


def is_alive(catalog_path: Path, owner: str) -> bool:
    """True while the process that took lease `owner` is running (its flock is held)."""
    if not owner or not all(c in "0123456789abcdef" for c in owner):
        return False
    path = owners_dir(catalog_path) / f"{owner}.lock"
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        path.unlink(missing_ok=True)  # a dead owner's file: tidy it
        return False
    finally:
        os.close(fd)


class VmBusy(Exception):
    """Another oneback process holds the VM's lock."""


@contextmanager
def vm_lock(catalog_path: Path, vm_id: int) -> Iterator[None]:
    """Exclusive, non-blocking: one backup of a VM at a time across every
    oneback process sharing this catalog (the CLI and the agent alike)."""
    directory = owners_dir(catalog_path)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / f"vm-{int(vm_id)}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VmBusy(vm_id) from None
        yield
    finally:
        os.close(fd)


class HotplugBusy(Exception):
    """Another oneback process (or thread) held the VM's hot-plug lock too long."""


@contextmanager
def hotplug_lock(catalog_path: Path, vm_id: int, timeout: float,
                 interval: float = 0.02) -> Iterator[None]:
    """Exclusive, waiting up to `timeout` seconds: one hot-plug operation
    (an attach or a detach, with its wait until oned is done) on VM `vm_id`
    at a time across every oneback process sharing this catalog, and across
    the threads of one process (each call opens its own file description,
    and flocks on two descriptions exclude each other). Raises HotplugBusy."""
    directory = owners_dir(catalog_path)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / f"hotplug-{int(vm_id)}.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise HotplugBusy(vm_id) from None
                time.sleep(interval)
        yield
    finally:
        os.close(fd)
