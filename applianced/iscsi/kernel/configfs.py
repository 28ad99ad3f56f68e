"""Reads the part of LIO's configfs that applianced manages, with plain file reads.

rtslib-fb 2.2 builds a ``pathlib`` path and re-checks that each node exists before every
property it reads, so reading back a target through it took about 37 ms under emulation,
most of it Python overhead (bench/README.md). Here each managed value is one read of its
file, and directories are listed once: a target costs about 20 reads. The values are
interpreted as rtslib interprets them, so that the ``KernelConfig`` is the same. Changes
are made by ``configfs_actions.py`` (building) and ``rtslib_actions.py`` (removing).

A half-made object (a crash between ``mkdir`` and its configuration) reads as an object
with other settings, never as an error, so that the plan replaces it and a re-run converges.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from applianced.iscsi.kernel.model import KernelTarget, MappedLun, NodeAcl, StorageObject
from applianced.state import Chap

TARGET_ROOT = "/sys/kernel/config/target"
# Each target has a single TPG, tag 1.
TPG_TAG = 1
CORE = f"{TARGET_ROOT}/core"
ISCSI = f"{TARGET_ROOT}/iscsi"
# configfs directory prefixes of the backstores applianced uses, in rtslib's lookup order.
BACKSTORE_DIRS = {"fileio": "fileio", "iblock": "block"}
AUTH_FILES = ("userid", "password", "userid_mutual", "password_mutual")


def read(path: str) -> str:
    """One configfs attribute. ``os`` calls, not ``open()``: a text file object costs
    several more system calls (fstat, ioctl, lseek), which are slow under emulation."""
    fd = os.open(path, os.O_RDONLY)
    try:
        # configfs hands out an attribute (at most a page) in one read. Initiator names in
        # the login statistics come from the network: never fail on their bytes.
        return os.read(fd, 8192).decode(errors="replace").strip()
    finally:
        os.close(fd)


def reservations_dir() -> Path:
    """<dbroot>/pr, where LIO saves the persistent reservations (APTPL) of its backstores."""
    return Path(read(f"{TARGET_ROOT}/dbroot"), "pr")


def reservations_file(serial: str, directory: Path | None = None) -> Path:
    """The file (in ``directory``, by default ``reservations_dir()``) where LIO saves the
    persistent reservations of the backstore of unit serial ``serial``, rewritten whenever an
    initiator changes them."""
    return (directory or reservations_dir()) / f"aptpl_{serial}"


def write(path: str, value: str) -> None:
    """Set one configfs attribute: LIO takes a value in a single write."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def storage_objects(names: Iterable[str]) -> dict[str, StorageObject]:
    """The fileio and block backstores among ``names``."""
    wanted = set(names)
    return {name: storage_object(name, *where) for name, where in backstores().items() if name in wanted}


def backstores() -> dict[str, tuple[str, str]]:
    """Every fileio and block backstore: name -> (plugin, directory); fileio first, as
    rtslib looks a name up."""
    found: dict[str, tuple[str, str]] = {}
    for hba in sorted(os.listdir(CORE), key=_backstore_order):
        prefix = hba.rpartition("_")[0]
        if prefix not in BACKSTORE_DIRS:
            continue
        with os.scandir(f"{CORE}/{hba}") as entries:
            for entry in entries:
                if entry.name not in found and entry.is_dir():
                    found[entry.name] = (BACKSTORE_DIRS[prefix], entry.path)
    return found


def _backstore_order(hba: str) -> tuple[int, str]:
    prefix = hba.rpartition("_")[0]
    return (list(BACKSTORE_DIRS).index(prefix) if prefix in BACKSTORE_DIRS else len(BACKSTORE_DIRS), hba)


def storage_object(name: str, plugin: str, path: str) -> StorageObject:
    serial = read(f"{path}/wwn/vpd_unit_serial").partition(":")[2].strip()
    udev_path = read(f"{path}/udev_path")
    if plugin == "block":
        return StorageObject(name, udev_path, 0, serial, plugin="block")
    info = read(f"{path}/info")
    size = _info_field(info, "Size")
    return StorageObject(
        name,
        udev_path or _info_field(info, "File") or "",
        int(size) if size and size.isdigit() else 0,
        serial,
        read(f"{path}/attrib/emulate_write_cache") == "1",
    )


def _info_field(info: str, key: str) -> str | None:
    # The last "key: value" of the info text, as rtslib parses it.
    match = re.search(f".*{key}: ([^: ]+).*", " ".join(info.split()))
    return match.group(1) if match else None


def tpg_path(iqn: str, tag: int) -> str:
    return f"{ISCSI}/{iqn}/tpgt_{tag}"


def tpg_values(path: str, kind: str, names: Iterable[str]) -> dict[str, str]:
    """TPG attributes (``kind`` "attrib") or login parameters ("param") by name."""
    return {name: read(f"{path}/{kind}/{name}") for name in names}


def target(iqn: str, tag: int, attributes: Iterable[str], parameters: Iterable[str]) -> KernelTarget | None:
    """The target's TPG ``tag`` with the named attributes and parameters, or None if missing."""
    path = tpg_path(iqn, tag)
    try:
        enabled = read(f"{path}/enable") == "1"
    except FileNotFoundError:
        return None
    return KernelTarget(
        iqn=iqn,
        enabled=enabled,
        attributes=tpg_values(path, "attrib", attributes),
        parameters=tpg_values(path, "param", parameters),
        portals=frozenset(portal(name) for name in os.listdir(f"{path}/np")),
        luns=luns(path),
        acls={name: _acl(f"{path}/acls/{name}", name) for name in os.listdir(f"{path}/acls")},
    )


def portal(name: str) -> tuple[str, int]:
    """A portal's np/ directory name, ``10.0.0.1:3260`` or ``[fd00::1]:3260``, as (address, port)."""
    address, _, port = name.rpartition(":")
    return (address[1:-1] if address.startswith("[") else address, int(port))


def portal_name(address: str, port: int) -> str:
    """The np/ directory name of a portal: IPv6 addresses in brackets."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def luns(tpg: str) -> dict[int, str]:
    """TPG LUN number -> backstore name."""
    return {int(name[4:]): lun(f"{tpg}/lun/{name}") for name in os.listdir(f"{tpg}/lun") if name.startswith("lun_")}


def lun(path: str) -> str:
    """The backstore name of one TPG LUN; "" for a LUN left without its link."""
    target = link(path)
    return os.path.basename(target) if target else ""


def link(directory: str) -> str | None:
    """Where the one symbolic link in a LUN or mapped-LUN directory points."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_symlink():
                return os.readlink(entry.path)
    return None


def mapped_luns(acl: str) -> frozenset[MappedLun]:
    return frozenset(mapped_lun(acl, int(name[4:])) for name in os.listdir(acl) if name.startswith("lun_"))


def mapped_lun(acl: str, number: int) -> MappedLun:
    path = f"{acl}/lun_{number}"
    target = link(path)
    # -1 for a mapping left without its link: no wanted mapping matches it.
    tpg_lun = int(os.path.basename(target)[4:]) if target else -1
    return MappedLun(number, tpg_lun, read(f"{path}/write_protect") == "1")


def _acl(path: str, initiator: str) -> NodeAcl:
    auth = _chap(f"{path}/auth") if read(f"{path}/attrib/authentication") == "1" else None
    return NodeAcl(initiator, mapped_luns(path), auth)


def _chap(directory: str) -> Chap:
    # configfs shows an unset credential as "NULL".
    values = ["" if v == "NULL" else v for v in (read(f"{directory}/{name}") for name in AUTH_FILES)]
    return Chap(*values)


def discovery_auth() -> Chap | None:
    path = f"{ISCSI}/discovery_auth"
    try:
        enforced = read(f"{path}/enforce_discovery_auth") == "1"
    except FileNotFoundError:
        return None  # the iSCSI fabric is not registered yet: the first target or discovery setting does it
    return _chap(path) if enforced else None
