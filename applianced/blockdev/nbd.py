"""The kernel's NBD client, configured by ``nbd-client`` (which negotiates, then hands the
socket to the kernel over netlink).

The I/O timeout is what keeps a dead peer from hanging I/O: an unanswered request fails
after ``timeout`` seconds, md fails the peer's leg, and writers carry on with the local
one. A dead device cannot be revived; the next connection takes a new one.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from applianced.blockdev import tools
from applianced.errors import KernelError

SYS_BLOCK = Path("/sys/block")
# ioctls of linux/nbd.h: _IO(0xab, 4) and _IO(0xab, 8); the kernel takes both on devices
# that nbd-client configured over netlink too.
NBD_CLEAR_SOCK = 0xAB04
NBD_DISCONNECT = 0xAB08
# Devices the module makes when it is loaded (its default is 16): one per mirror is in
# use at a time, and a reconnection briefly takes a second.
DEVICES = 256


def load_module() -> None:
    """Load nbd with room for many mirrors (a module loaded earlier keeps its own count)."""
    if (Path("/sys/module/nbd")).exists():
        return
    tools.run(["modprobe", "nbd", f"nbds_max={DEVICES}"])


def connect(address: str, port: int, export: str, timeout: int, connections: int = 1) -> str:
    """A new NBD device (``/dev/nbdN``) connected to ``export`` at ``address:port``."""
    load_module()
    device = free_device()
    tools.run(
        [
            "nbd-client",
            address,
            str(port),
            device,
            "-N",
            export,
            "-b",
            "4096",
            "-t",
            str(timeout),
            "-C",
            str(connections),
        ]
    )
    return device


def disconnect(device: str) -> None:
    """What ``nbd-client -d`` does (the kernel sends the server NBD_CMD_DISC and drops the
    sockets; the device is free once closed), without starting a process per device: a
    switchover takes every mirror's peer leg out in the clients' stall."""
    try:
        fd = os.open(device, os.O_RDWR)
    except OSError as exc:
        raise KernelError(f"cannot open {device}: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, NBD_DISCONNECT)
        fcntl.ioctl(fd, NBD_CLEAR_SOCK)
    except OSError as exc:
        raise KernelError(f"{device} did not disconnect: {exc.strerror}") from None
    finally:
        os.close(fd)


def connected(device: str) -> bool:
    """Whether ``device`` is connected (has a size and a client task)."""
    block = SYS_BLOCK / os.path.basename(device)
    try:
        return (block / "size").read_text().strip() != "0"
    except OSError:
        return False


def free_device() -> str:
    """An NBD device with nothing connected."""
    for block in sorted(SYS_BLOCK.glob("nbd*"), key=lambda p: int(p.name[3:])):
        if (block / "size").read_text().strip() == "0" and not (block / "pid").exists():
            return f"/dev/{block.name}"
    raise KernelError("no free NBD device: the nbd module was loaded with too few (nbds_max)")


def answers(address: str, port: int, timeout: float) -> bool:
    """Whether a server accepts a TCP connection at ``address:port`` within ``timeout``.

    Asked before connecting: nbd-client towards an address that does not answer would
    wait for the kernel's SYN retries, about two minutes.
    """
    try:
        socket.create_connection((address, port), timeout=timeout).close()
    except OSError:
        return False
    return True
