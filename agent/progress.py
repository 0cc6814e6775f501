"""How the engine reports progress: the Protocol the CLI renders, and a quiet
default. The engine never prints; it calls these."""

from __future__ import annotations

from typing import Protocol


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
