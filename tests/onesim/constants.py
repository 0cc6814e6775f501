"""OpenNebula's enumerations, numbered exactly as oned numbers them.

Owns: VM STATE / LCM_STATE (include/VirtualMachine.h), image STATE / TYPE /
DISK_TYPE (include/Image.h), datastore and host states, history ACTION
numbers (include/VMActions.h), XML-RPC error codes (include/Request.h) and the
object names oned prints in its messages (src/rm/RequestLogger.cc).
Must not: hold behaviour; other modules decide what the numbers mean.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    SUCCESS = 0x0000
    AUTHENTICATION = 0x0100
    AUTHORIZATION = 0x0200
    NO_EXISTS = 0x0400
    ACTION = 0x0800
    RPC_API = 0x1000
    INTERNAL = 0x2000
    ALLOCATE = 0x4000
    LOCKED = 0x8000
    REPLICATION = 0x10000


class VmState(IntEnum):
    INIT = 0
    PENDING = 1
    HOLD = 2
    ACTIVE = 3
    STOPPED = 4
    SUSPENDED = 5
    DONE = 6
    POWEROFF = 8
    UNDEPLOYED = 9
    CLONING = 10
    CLONING_FAILURE = 11


class Lcm(IntEnum):
    LCM_INIT = 0
    PROLOG = 1
    BOOT = 2
    RUNNING = 3
    MIGRATE = 4
    SAVE_STOP = 5
    SAVE_SUSPEND = 6
    SAVE_MIGRATE = 7
    PROLOG_MIGRATE = 8
    PROLOG_RESUME = 9
    EPILOG_STOP = 10
    EPILOG = 11
    SHUTDOWN = 12
    CLEANUP_RESUBMIT = 15
    UNKNOWN = 16
    HOTPLUG = 17
    SHUTDOWN_POWEROFF = 18
    BOOT_UNKNOWN = 19
    BOOT_POWEROFF = 20
    BOOT_SUSPENDED = 21
    BOOT_STOPPED = 22
    CLEANUP_DELETE = 23
    HOTPLUG_SNAPSHOT = 24
    HOTPLUG_NIC = 25
    HOTPLUG_SAVEAS = 26
    HOTPLUG_SAVEAS_POWEROFF = 27
    HOTPLUG_SAVEAS_SUSPENDED = 28
    SHUTDOWN_UNDEPLOY = 29
    EPILOG_UNDEPLOY = 30
    PROLOG_UNDEPLOY = 31
    BOOT_UNDEPLOY = 32
    HOTPLUG_PROLOG_POWEROFF = 33
    HOTPLUG_EPILOG_POWEROFF = 34
    BOOT_MIGRATE = 35
    BOOT_FAILURE = 36
    BOOT_MIGRATE_FAILURE = 37
    PROLOG_MIGRATE_FAILURE = 38
    PROLOG_FAILURE = 39
    EPILOG_FAILURE = 40
    EPILOG_STOP_FAILURE = 41
    EPILOG_UNDEPLOY_FAILURE = 42
    PROLOG_MIGRATE_POWEROFF = 43
    PROLOG_MIGRATE_POWEROFF_FAILURE = 44
    PROLOG_MIGRATE_SUSPEND = 45
    PROLOG_MIGRATE_SUSPEND_FAILURE = 46
    BOOT_UNDEPLOY_FAILURE = 47
    BOOT_STOPPED_FAILURE = 48
    PROLOG_RESUME_FAILURE = 49
    PROLOG_UNDEPLOY_FAILURE = 50
    DISK_SNAPSHOT_POWEROFF = 51
    DISK_SNAPSHOT_REVERT_POWEROFF = 52
    DISK_SNAPSHOT_DELETE_POWEROFF = 53
    DISK_SNAPSHOT_SUSPENDED = 54
    DISK_SNAPSHOT_REVERT_SUSPENDED = 55
    DISK_SNAPSHOT_DELETE_SUSPENDED = 56
    DISK_SNAPSHOT = 57
    DISK_SNAPSHOT_DELETE = 59
    PROLOG_MIGRATE_UNKNOWN = 60
    PROLOG_MIGRATE_UNKNOWN_FAILURE = 61
    DISK_RESIZE = 62
    DISK_RESIZE_POWEROFF = 63
    DISK_RESIZE_UNDEPLOYED = 64
    HOTPLUG_NIC_POWEROFF = 65
    HOTPLUG_RESIZE = 66
    HOTPLUG_SAVEAS_UNDEPLOYED = 67
    HOTPLUG_SAVEAS_STOPPED = 68
    BACKUP = 69
    BACKUP_POWEROFF = 70
    RESTORE = 71


class ImageState(IntEnum):
    INIT = 0
    READY = 1
    USED = 2
    DISABLED = 3
    LOCKED = 4
    ERROR = 5
    CLONE = 6
    DELETE = 7
    USED_PERS = 8
    LOCKED_USED = 9
    LOCKED_USED_PERS = 10


class ImageType(IntEnum):
    OS = 0
    CDROM = 1
    DATABLOCK = 2
    KERNEL = 3
    RAMDISK = 4
    CONTEXT = 5
    BACKUP = 6
    FILESYSTEM = 7


class DiskType(IntEnum):
    FILE = 0
    CD_ROM = 1
    BLOCK = 2
    RBD = 3


class DatastoreType(IntEnum):
    IMAGE_DS = 0
    SYSTEM_DS = 1
    FILE_DS = 2
    BACKUP_DS = 3


class HostState(IntEnum):
    INIT = 0
    MONITORING_MONITORED = 1
    MONITORED = 2
    ERROR = 3
    DISABLED = 4
    MONITORING_ERROR = 5
    MONITORING_INIT = 6
    MONITORING_DISABLED = 7
    OFFLINE = 8


class Action(IntEnum):
    """History ACTION numbers (include/VMActions.h)."""

    NONE = 0
    UNDEPLOY = 5
    UNDEPLOY_HARD = 6
    HOLD = 7
    RELEASE = 8
    STOP = 9
    SUSPEND = 10
    RESUME = 11
    REBOOT = 15
    REBOOT_HARD = 16
    RESCHED = 17
    UNRESCHED = 18
    POWEROFF = 19
    POWEROFF_HARD = 20
    DISK_ATTACH = 21
    DISK_DETACH = 22
    DISK_SNAPSHOT_CREATE = 25
    DISK_SNAPSHOT_DELETE = 26
    TERMINATE = 27
    TERMINATE_HARD = 28
    DEPLOY = 30
    CHOWN = 31
    CHMOD = 32
    UPDATECONF = 33
    RENAME = 34
    UPDATE = 36
    DISK_SAVEAS = 40
    DISK_SNAPSHOT_REVERT = 41
    DISK_SNAPSHOT_RENAME = 45


# one.vm.action strings (src/vm/VMActions.cc) -> history action
VM_ACTION_STRINGS: dict[str, Action] = {
    "terminate": Action.TERMINATE,
    "terminate-hard": Action.TERMINATE_HARD,
    "undeploy": Action.UNDEPLOY,
    "undeploy-hard": Action.UNDEPLOY_HARD,
    "hold": Action.HOLD,
    "release": Action.RELEASE,
    "stop": Action.STOP,
    "suspend": Action.SUSPEND,
    "resume": Action.RESUME,
    "reboot": Action.REBOOT,
    "reboot-hard": Action.REBOOT_HARD,
    "resched": Action.RESCHED,
    "unresched": Action.UNRESCHED,
    "poweroff": Action.POWEROFF,
    "poweroff-hard": Action.POWEROFF_HARD,
}

# VM_ADMIN_OPERATIONS of the default oned.conf; everything else a VM method
# does needs MANAGE (VM_MANAGE_OPERATIONS), info needs USE.
VM_ADMIN_ACTIONS = {"resched", "unresched", "deploy", "migrate", "delete", "recover",
                    "retry", "backup", "restore"}

OBJECT_NAMES = {
    "VM": "virtual machine",
    "HOST": "host",
    "IMAGE": "image",
    "USER": "user",
    "TEMPLATE": "virtual machine template",
    "GROUP": "group",
    "DATASTORE": "datastore",
    "CLUSTER": "cluster",
    "HOOK": "hook",
}


def vm_state_name(state: int) -> str:
    return VmState(state).name


def lcm_state_name(lcm: int) -> str:
    return Lcm(lcm).name


def state_str(state: int, lcm: int) -> str:
    """VirtualMachine::state_str: the LCM name while ACTIVE, else the STATE name."""
    return lcm_state_name(lcm) if state == VmState.ACTIVE else vm_state_name(state)


# TM_MAD_CONF of the default oned.conf (share/etc/oned.conf), the attributes
# Datastore::set_tm_mad copies into a datastore's template. ALLOW_ORPHANS
# missing means "NO" (set_tm_mad's default); DRIVER, when set, is forced as
# the FORMAT of every new empty image (Image::insert) and the conversion target
# of the fs driver's cp (Datastore::get_ds_driver).
TM_MAD_CONF: dict[str, dict[str, str]] = {
    "dummy": {"LN_TARGET": "NONE", "CLONE_TARGET": "SYSTEM", "SHARED": "YES",
              "DS_MIGRATE": "YES", "DS_LIVE_MIGRATE": "YES", "DS_MIGRATE_SNAP": "YES"},
    "shared": {"LN_TARGET": "NONE", "CLONE_TARGET": "SYSTEM", "SHARED": "YES",
               "TM_MAD_SYSTEM": "ssh", "LN_TARGET_SSH": "SYSTEM", "CLONE_TARGET_SSH": "SYSTEM",
               "DISK_TYPE_SSH": "FILE", "ALLOW_ORPHANS": "FORMAT", "DS_MIGRATE": "YES",
               "DS_LIVE_MIGRATE": "YES", "DS_MIGRATE_SNAP": "YES"},
    "lvm": {"LN_TARGET": "NONE", "CLONE_TARGET": "SELF", "SHARED": "YES", "DRIVER": "raw",
            "DISK_TYPE": "BLOCK", "ALLOW_ORPHANS": "YES", "DS_MIGRATE": "YES",
            "DS_LIVE_MIGRATE": "NO", "DS_MIGRATE_SNAP": "NO"},
    "fs_lvm": {"LN_TARGET": "SYSTEM", "CLONE_TARGET": "SYSTEM", "SHARED": "YES",
               "DRIVER": "raw", "DISK_TYPE": "BLOCK", "DS_MIGRATE": "YES",
               "DS_LIVE_MIGRATE": "NO", "DS_MIGRATE_SNAP": "NO"},
    "fs_lvm_ssh": {"LN_TARGET": "SYSTEM", "CLONE_TARGET": "SYSTEM", "SHARED": "YES",
                   "DRIVER": "raw", "DISK_TYPE": "BLOCK", "PERSISTENT_SNAPSHOTS": "NO",
                   "ALLOW_ORPHANS": "YES", "DS_MIGRATE": "YES", "DS_LIVE_MIGRATE": "YES",
                   "DS_MIGRATE_SNAP": "NO"},
    "qcow2": {"LN_TARGET": "NONE", "CLONE_TARGET": "SYSTEM", "SHARED": "YES",
              "TM_MAD_SYSTEM": "ssh", "LN_TARGET_SSH": "SYSTEM", "CLONE_TARGET_SSH": "SYSTEM",
              "DISK_TYPE_SSH": "FILE", "DRIVER": "qcow2", "ALLOW_ORPHANS": "FORMAT",
              "DS_MIGRATE": "YES", "DS_LIVE_MIGRATE": "YES", "DS_MIGRATE_SNAP": "YES"},
    "ssh": {"LN_TARGET": "SYSTEM", "CLONE_TARGET": "SYSTEM", "SHARED": "NO",
            "ALLOW_ORPHANS": "YES", "DS_MIGRATE": "YES", "DS_LIVE_MIGRATE": "YES",
            "DS_MIGRATE_SNAP": "YES"},
    "local": {"LN_TARGET": "SYSTEM", "CLONE_TARGET": "SYSTEM", "SHARED": "NO",
              "ALLOW_ORPHANS": "FORMAT", "DS_MIGRATE": "YES", "DS_LIVE_MIGRATE": "YES",
              "DS_MIGRATE_SNAP": "YES"},
    "ceph": {"LN_TARGET": "NONE", "CLONE_TARGET": "SELF", "SHARED": "YES", "DRIVER": "raw",
             "ALLOW_ORPHANS": "mixed", "TM_MAD_SYSTEM": "ssh", "LN_TARGET_SSH": "SYSTEM",
             "CLONE_TARGET_SSH": "SYSTEM", "DISK_TYPE_SSH": "FILE", "DS_MIGRATE": "NO",
             "DS_LIVE_MIGRATE": "NO", "DS_MIGRATE_SNAP": "NO"},
    "iscsi_libvirt": {"LN_TARGET": "NONE", "CLONE_TARGET": "SELF", "SHARED": "YES",
                      "DRIVER": "raw", "DS_MIGRATE": "NO", "DS_LIVE_MIGRATE": "NO",
                      "DS_MIGRATE_SNAP": "NO"},
    "dev": {"LN_TARGET": "NONE", "CLONE_TARGET": "NONE", "SHARED": "YES", "DRIVER": "raw",
            "DS_MIGRATE": "NO", "DS_LIVE_MIGRATE": "NO", "DS_MIGRATE_SNAP": "NO"},
    "netapp": {"LN_TARGET": "NONE", "CLONE_TARGET": "SELF", "SHARED": "YES", "DRIVER": "raw",
               "DISK_TYPE": "BLOCK", "ALLOW_ORPHANS": "LINEAR", "DS_MIGRATE": "NO",
               "DS_LIVE_MIGRATE": "NO", "DS_MIGRATE_SNAP": "NO"},
    "purefa": {"LN_TARGET": "NONE", "CLONE_TARGET": "SELF", "SHARED": "YES", "DRIVER": "raw",
               "DISK_TYPE": "BLOCK", "ALLOW_ORPHANS": "YES", "DS_MIGRATE": "NO",
               "DS_LIVE_MIGRATE": "NO", "DS_MIGRATE_SNAP": "NO"},
    "virtiofs": {"LN_TARGET": "NONE", "CLONE_TARGET": "NONE", "SHARED": "YES",
                 "DRIVER": "virtiofs", "DISK_TYPE": "filesystem", "DS_MIGRATE": "NO",
                 "DS_LIVE_MIGRATE": "NO", "DS_MIGRATE_SNAP": "NO"},
}
