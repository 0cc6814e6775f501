"""The one error hierarchy of oneback.

Owns: every error the engine raises on purpose, its one-line message (which
names the thing and the fix), its stable exit code, and whether it is a bug.
Must not: print, log, or import anything else from the package. `cli.main()`
is the one place that maps these to exit codes; README publishes the table.
"""

from __future__ import annotations


class OnebackError(Exception):
    """Base class. `exit_code` is stable and documented; `is_bug` marks errors
    that mean oneback itself is wrong (report them), not the input or the cloud."""

    exit_code = 1
    is_bug = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InternalError(OnebackError):
    """An invariant of oneback broke: a bug."""

    exit_code = 1
    is_bug = True


class UsageError(OnebackError):
    """A command-line argument is wrong."""

    exit_code = 2


class ConfigError(OnebackError):
    """The configuration file or a credential file is missing or wrong."""

    exit_code = 3


class CloudError(OnebackError):
    """OpenNebula refused a call, failed an operation, or cannot be reached."""

    exit_code = 4

    def __init__(self, message: str, *, transient: bool = False, code: int = 0) -> None:
        super().__init__(message)
        self.transient = transient
        self.code = code  # oned's error code (0x100 ... 0x2000), 0 when not from oned


class CloudTimeout(CloudError):
    """OpenNebula did not answer, or an operation did not settle, in time."""

    exit_code = 5

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


class NotFound(OnebackError):
    """A VM, disk, image, datastore or backup that was named does not exist."""

    exit_code = 6


class StateError(OnebackError):
    """An object is in a state that does not allow the operation (e.g. a VM
    that is not RUNNING/POWEROFF, or a proxy VM that cannot take disks)."""

    exit_code = 7


class RepositoryError(OnebackError):
    """The repository or catalog cannot be used (missing, unwritable, newer schema)."""

    exit_code = 8


class IntegrityError(RepositoryError):
    """Stored data does not match its recorded checksum: the repository is damaged."""

    exit_code = 9


class DeviceError(OnebackError):
    """An attached disk did not appear in the proxy VM, or could not be read/written."""

    exit_code = 10


class CheckFailed(OnebackError):
    """`oneback doctor` found something wrong: each failing check names it and the fix."""

    exit_code = 20


class Interrupted(OnebackError):
    """The work was stopped by a signal; what it created was cleaned up."""

    exit_code = 130


class LeaseBusy(StateError):
    """Another agent holds the VM's lease in the repository (it is backing the VM up)."""


class LeaseLost(Interrupted):
    """The VM's lease passed to another agent while this one worked: it stopped and cleaned up."""


EXIT_CODES: tuple[tuple[int, str, str], ...] = tuple(
    (cls.exit_code, cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for cls in (
        InternalError,
        UsageError,
        ConfigError,
        CloudError,
        CloudTimeout,
        NotFound,
        StateError,
        RepositoryError,
        IntegrityError,
        DeviceError,
        CheckFailed,
        Interrupted,
    )
)
