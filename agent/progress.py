"""How the engine reports progress: the Protocol the CLI renders, and a quiet
default; and what the agent reports about its work (`Observer`, which the
metrics implement). The engine never prints; it calls these."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from agent.model import BackupRecord


class Progress(Protocol):
    """What a backup or restore reports while it works."""

    def phase(self, disk_id: int, phase: str) -> None: ...
    def disk_size(self, disk_id: int, size: int) -> None: ...
    def advanced(self, nbytes: int) -> None: ...


class Quiet:
    """Reports nothing (the agent, tests, --json)."""

    def phase(self, disk_id: int, phase: str) -> None:
        pass

    def disk_size(self, disk_id: int, size: int) -> None:
        pass

    def advanced(self, nbytes: int) -> None:
        pass


class Observer(Protocol):
    """What the agent reports about its work as it goes (`agent.metrics`
    counts it). Called from the agent's threads; must not raise or block."""

    def backup(self, vm_id: int) -> Progress:
        """A backup of `vm_id` starts: the Progress it reports its phases to."""
        ...

    def backup_done(self, vm_id: int, record: BackupRecord) -> None:
        """The backup of `vm_id` started last is committed as `record`."""
        ...

    def job_failed(self, vm_id: int, kind: str) -> None: ...

    def policy(self, vm_id: int, interval: int | None) -> None:
        """`vm_id` is opted in, to be backed up every `interval` seconds (None: it is not)."""
        ...

    def seen(self, vm_ids: Collection[int]) -> None:
        """Every VM the cloud has: the others are gone."""
        ...


class NoObserver:
    """Observes nothing (no metrics configured)."""

    def backup(self, vm_id: int) -> Progress:
        return Quiet()

    def backup_done(self, vm_id: int, record: BackupRecord) -> None:
        pass

    def job_failed(self, vm_id: int, kind: str) -> None:
        pass

    def policy(self, vm_id: int, interval: int | None) -> None:
        pass

    def seen(self, vm_ids: Collection[int]) -> None:
        pass
