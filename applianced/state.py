"""The desired configuration of a node and the file that keeps it.

The configuration is an immutable value: every change builds a new ``Config`` and the engine
swaps it in only after the kernel accepted it. The state file is versioned JSON written
atomically (temporary file, fsync, rename, fsync of the directory) with mode 0600, because
later versions keep CHAP secrets and heartbeat keys in it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from applianced.constants import DEFAULT_IQN_PREFIX
from applianced.errors import StateError

STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Disk:
    """A virtual disk. ``serial`` is the T10 unit serial, fixed at creation."""

    name: str
    path: str
    size: int
    serial: str
    description: str = ""
    # Write-back caching in the node's page cache: faster, but a power cut loses acknowledged
    # writes. Off (write-through) unless asked for.
    write_back: bool = False
    # "file": a sparse file with applianced's trailer; "block": a block device named by its
    # stable path, whose size is read at creation (LIO follows the device's own size).
    kind: str = "file"
    # Exported by several targets at once: only for initiators that coordinate their
    # access themselves (cluster file systems, SCSI reservations). Off unless asked for.
    shared: bool = False


@dataclass(frozen=True)
class Lun:
    """Disk ``disk`` exported as LUN ``number`` of a target."""

    number: int
    disk: str
    read_only: bool = False


@dataclass(frozen=True)
class Chap:
    """CHAP credentials; the secrets never appear in repr() and so never in a log line.

    On a target or ACL an empty ``user`` stands for the initiator's IQN and an empty
    ``mutual_user`` for the target's IQN, the defaults initiators expect. Mutual CHAP is
    on when ``mutual_secret`` is set.
    """

    user: str = ""
    secret: str = field(default="", repr=False)
    mutual_user: str = ""
    mutual_secret: str = field(default="", repr=False)

    @property
    def mutual(self) -> bool:
        return bool(self.mutual_secret)


@dataclass(frozen=True)
class Acl:
    """An initiator allowed to log in to a target, with its own CHAP credentials if any."""

    initiator: str
    chap: Chap | None = None


@dataclass(frozen=True)
class Target:
    """An iSCSI target with its LUNs and allowed initiators."""

    name: str
    iqn: str
    description: str = ""
    # The TargetAlias initiators are shown; empty means the target's name.
    alias: str = ""
    enabled: bool = True
    luns: tuple[Lun, ...] = ()
    acls: tuple[Acl, ...] = ()
    # CHAP for every initiator of the target that has no credentials of its own.
    chap: Chap | None = None
    # CRC32C digests: "allowed" (the initiator chooses), "required" or "off".
    header_digest: str = "allowed"
    data_digest: str = "allowed"
    # Sources that may reach the target's portals (see applianced/firewall.py): IP
    # networks or addresses, MAC addresses, DNS names; empty: any source.
    allowed_sources: tuple[str, ...] = ()

    def lun(self, number: int) -> Lun | None:
        return next((lun for lun in self.luns if lun.number == number), None)

    def acl(self, initiator: str) -> Acl | None:
        return next((acl for acl in self.acls if acl.initiator == initiator), None)


@dataclass(frozen=True)
class Portal:
    """An address and TCP port on which targets listen: all of them, or only ``targets``."""

    address: str
    port: int
    targets: tuple[str, ...] = ()

    def serves(self, target: str) -> bool:
        return not self.targets or target in self.targets

    @property
    def key(self) -> str:
        return portal_key(self.address, self.port)


def portal_key(address: str, port: int) -> str:
    """The name of a portal as people write it: ``10.0.0.1:3260`` or ``[fd00::1]:3260``."""
    if ipaddress.ip_address(address).version == 6:
        return f"[{address}]:{port}"
    return f"{address}:{port}"


@dataclass(frozen=True)
class BootClient:
    """A client that boots from a LUN: what its DHCP server must tell its firmware.

    ``address``/``port`` is the portal the firmware connects to first; ``secondary_address``
    (optional) the second one, e.g. the standby node's.
    """

    name: str
    target: str
    initiator: str
    lun: int
    address: str
    port: int
    mac: str = ""
    secondary_address: str = ""
    secondary_port: int = 0


@dataclass(frozen=True)
class Config:
    """Everything this node should have configured in its kernel."""

    node_id: str
    iqn_prefix: str = DEFAULT_IQN_PREFIX
    disks: Mapping[str, Disk] = field(default_factory=dict)
    targets: Mapping[str, Target] = field(default_factory=dict)
    portals: tuple[Portal, ...] = ()
    # CHAP required for SendTargets discovery (None: discovery is open).
    discovery_chap: Chap | None = None
    boot_clients: Mapping[str, BootClient] = field(default_factory=dict)

    @classmethod
    def new(cls) -> Config:
        return cls(node_id=str(uuid.uuid4()))

    def with_disk(self, disk: Disk) -> Config:
        return dataclasses.replace(self, disks={**self.disks, disk.name: disk})

    def without_disk(self, name: str) -> Config:
        return dataclasses.replace(self, disks={k: v for k, v in self.disks.items() if k != name})

    def with_target(self, target: Target) -> Config:
        return dataclasses.replace(self, targets={**self.targets, target.name: target})

    def without_target(self, name: str) -> Config:
        return dataclasses.replace(self, targets={k: v for k, v in self.targets.items() if k != name})

    def portal(self, key: str) -> Portal | None:
        return next((portal for portal in self.portals if portal.key == key), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_FORMAT_VERSION,
            "node": {"id": self.node_id},
            "settings": {"iqn_prefix": self.iqn_prefix},
            "disks": [dataclasses.asdict(disk) for disk in self.disks.values()],
            "targets": [dataclasses.asdict(target) for target in self.targets.values()],
            "portals": [dataclasses.asdict(portal) for portal in self.portals],
            "discovery_chap": _chap_to_json(self.discovery_chap),
            "boot_clients": [dataclasses.asdict(client) for client in self.boot_clients.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Config:
        version = data.get("version")
        if version != STATE_FORMAT_VERSION:
            raise StateError(f"state format version {version!r} is not supported (expected {STATE_FORMAT_VERSION})")
        try:
            disks = [Disk(**item) for item in data.get("disks", [])]
            targets = [
                Target(
                    **{
                        **item,
                        "luns": tuple(Lun(**lun) for lun in item.get("luns", [])),
                        "acls": tuple(
                            Acl(**{**acl, "chap": _chap_from_json(acl.get("chap"))}) for acl in item.get("acls", [])
                        ),
                        "chap": _chap_from_json(item.get("chap")),
                        "allowed_sources": tuple(item.get("allowed_sources", ())),
                    }
                )
                for item in data.get("targets", [])
            ]
            return cls(
                node_id=data["node"]["id"],
                iqn_prefix=data.get("settings", {}).get("iqn_prefix", DEFAULT_IQN_PREFIX),
                disks={disk.name: disk for disk in disks},
                targets={target.name: target for target in targets},
                portals=tuple(
                    Portal(**{**item, "targets": tuple(item.get("targets", ()))}) for item in data.get("portals", [])
                ),
                discovery_chap=_chap_from_json(data.get("discovery_chap")),
                boot_clients={item["name"]: BootClient(**item) for item in data.get("boot_clients", [])},
            )
        except (KeyError, TypeError) as exc:
            raise StateError(f"state file is malformed: {exc}") from exc


def _chap_to_json(chap: Chap | None) -> dict[str, str] | None:
    return dataclasses.asdict(chap) if chap else None


def _chap_from_json(data: Mapping[str, str] | None) -> Chap | None:
    return Chap(**data) if data else None


class StateStore:
    """Reads and atomically replaces the state file."""

    def __init__(self, directory: Path, file_name: str) -> None:
        self.directory = directory
        self.path = directory / file_name

    def load(self) -> Config | None:
        """Return the stored configuration, or None when the node was never configured."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StateError(f"{self.path} is not valid JSON: {exc}") from exc
        return Config.from_json(data)

    def save(self, config: Config) -> None:
        payload = json.dumps(config.to_json(), indent=2, sort_keys=True).encode() + b"\n"
        try:
            write_private_file(self.path, payload)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc.strerror}") from exc


def write_private_file(path: Path, payload: bytes) -> None:
    """Replace ``path`` atomically with a file of mode 0600 (temporary file, fsync, rename, fsync)."""
    directory = path.parent
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # mkstemp creates the file 0600 from the start, so no secret is ever readable.
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.rename(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
