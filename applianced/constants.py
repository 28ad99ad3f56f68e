"""Every bus name, object path, interface name, error name and default path, in one place.

The daemon, the D-Bus layer and the CLI all import their names from here so that the
published API cannot drift between them.
"""

from __future__ import annotations

# Versioned names: a future incompatible API becomes Appliance2 and both can coexist.
BUS_NAME = "org.applianced.Appliance1"
ROOT_PATH = "/org/applianced/Appliance1"

MANAGER_INTERFACE = "org.applianced.Appliance1.Manager"
DISK_INTERFACE = "org.applianced.Appliance1.Disk"
TARGET_INTERFACE = "org.applianced.Appliance1.Target"
PORTAL_INTERFACE = "org.applianced.Appliance1.Portal"
LUN_INTERFACE = "org.applianced.Appliance1.Lun"
ACL_INTERFACE = "org.applianced.Appliance1.Acl"
BOOT_PROFILE_INTERFACE = "org.applianced.Appliance1.BootProfile"
PEER_INTERFACE = "org.applianced.Appliance1.Peer"
MIRROR_INTERFACE = "org.applianced.Appliance1.Mirror"
JOB_INTERFACE = "org.applianced.Appliance1.Job"
FAILOVER_INTERFACE = "org.applianced.Appliance1.Failover"

# Lowercase plural collections below the root, as udisks2 does.
DISKS_PATH = f"{ROOT_PATH}/disks"
TARGETS_PATH = f"{ROOT_PATH}/targets"
PORTALS_PATH = f"{ROOT_PATH}/portals"
BOOT_PROFILES_PATH = f"{ROOT_PATH}/boot_profiles"
MIRRORS_PATH = f"{ROOT_PATH}/mirrors"
JOBS_PATH = f"{ROOT_PATH}/jobs"
# A node has at most one pair: one object, present while paired.
PEER_PATH = f"{ROOT_PATH}/peer"
# The node's part in the cluster: one object, always there.
FAILOVER_PATH = f"{ROOT_PATH}/failover"

ERROR_PREFIX = "org.applianced.Appliance1.Error"

DEFAULT_STATE_DIR = "/var/lib/applianced"
STATE_FILE_NAME = "state.json"
DISKS_DIR_NAME = "disks"

ISCSI_DEFAULT_PORT = 3260
# UDP port of the peer link on the replication/heartbeat network (DRBD uses 7788 and up).
PEER_DEFAULT_PORT = 7790
# The reference requires agreeing clocks; status warns above this offset (seconds).
CLOCK_OFFSET_WARNING = 1.0
# Naming authority used to generate target IQNs; not the host name, because a target
# keeps its IQN when it fails over to the peer node.
DEFAULT_IQN_PREFIX = "iqn.2003-01.org.linux-iscsi.applianced"

# Named D-Bus errors: one per engine error class, plus Failed for what the engine did not
# foresee (the traceback stays in the daemon's log).
ERROR_KINDS = (
    "NotFound",
    "AlreadyExists",
    "InvalidArgument",
    "Busy",
    "NotSupported",
    "KernelError",
    "StateError",
    "Unreachable",
    "Failed",
)


def error_name(kind: str) -> str:
    """The D-Bus error name of one of ``ERROR_KINDS``."""
    return f"{ERROR_PREFIX}.{kind}"
