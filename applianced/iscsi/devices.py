"""Block devices that back disks: their stable names, sizes and current users.

udev (through pyudev) gives the stable /dev/disk/by-id name that survives reboots and
device renumbering; the mount table (through psutil), swap and sysfs holders tell whether
the node itself is using the device, in which case exporting it would corrupt data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from applianced.blockdev import dm, loop
from applianced.errors import Busy, InvalidArgument


@dataclass(frozen=True)
class BlockDevice:
    node: str
    stable_path: str
    size: int


def resolve(path: str) -> BlockDevice:
    """The block device at ``path`` (any of its names), or InvalidArgument."""
    # Imported here, as psutil below: the daemon starts without them (about a second of
    # its start-up under emulation), and only block disks need them.
    import pyudev

    context = pyudev.Context()
    try:
        device = pyudev.Devices.from_device_file(context, path)
    except (pyudev.DeviceNotFoundError, ValueError, OSError):
        raise InvalidArgument(f"{path} is not a block device") from None
    if device.subsystem != "block" or device.device_type not in ("disk", "partition"):
        raise InvalidArgument(f"{path} is not a disk or a partition")
    size = device.attributes.asint("size") * 512
    if size == 0:
        raise InvalidArgument(f"{path} has no medium (size 0)")
    # by-id names follow the device itself, not its discovery order.
    by_id = sorted(link for link in device.device_links if link.startswith("/dev/disk/by-id/"))
    return BlockDevice(node=device.device_node, stable_path=by_id[0] if by_id else device.device_node, size=size)


def refuse_file_if_in_use(path: str) -> None:
    """Busy if a loop device of this node is backed by the disk file (a local mount).

    The loop device applianced stacks the disk on itself, held only by its own
    device-mapper devices, is not a use.
    """
    users = []
    for node in loop.backed_by(Path(path)):
        ours, others = dm.applianced_holders(os.path.basename(node))
        if others or not ours:
            users.append(node)
    if users:
        raise Busy(f"{path} is attached to {', '.join(users)} on this node; it cannot be exported while in local use")


def refuse_if_in_use(device: BlockDevice) -> None:
    """Busy if this node mounts, swaps on or stacks something on the device or its parts."""
    import psutil

    name = Path(device.node).name
    sys_dir = Path("/sys/class/block") / name
    parts = {name} | {child.name for child in sys_dir.iterdir() if (child / "partition").exists()}
    nodes = {f"/dev/{part}" for part in parts}
    users = [
        f"mounted at {mount.mountpoint}"
        for mount in psutil.disk_partitions(all=True)
        if os.path.realpath(mount.device) in nodes
    ]
    swaps = Path("/proc/swaps").read_text().splitlines()[1:]
    users += [f"used as swap ({line.split()[0]})" for line in swaps if os.path.realpath(line.split()[0]) in nodes]
    for part in sorted(parts):
        # The device-mapper device applianced stacks a disk on is not a use.
        users += [f"held by {holder}" for holder in dm.applianced_holders(part)[1]]
    if users:
        raise Busy(f"{device.node} is in use on this node ({'; '.join(users)}); it cannot be exported")
