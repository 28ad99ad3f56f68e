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
from typing import Any, Protocol, TypeVar

from applianced import decoding
from applianced.constants import DEFAULT_IQN_PREFIX
from applianced.errors import InvalidArgument, StateError

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
    # How LIO reaches the data. "dm" (every disk made now): LIO's block backstore on the
    # disk's own device-mapper device, over the file's loop device or the block device,
    # so that replication can put a mirror under a live LUN. "direct": LIO's fileio on the
    # file or its block backstore on the device itself, as applianced made disks before and
    # as targetcli makes them (kept as they are by a migration, live sessions included).
    backstore: str = "direct"


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
    # Sources that may reach the target's portals (see applianced/iscsi/firewall.py): IP
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
    # The firmware families served (applianced/iscsi/bootprofile.py): "all", "ipxe", "uefi" or
    # "broadcom". Profiles made before there was a choice served Broadcom's firmware, which
    # "all" still includes.
    firmware: str = "all"


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
    def from_json(cls, data: Mapping[str, Any], what: str = "state file") -> Config:
        """A configuration from parsed JSON (the state file's or an export's content)."""
        _check_version(decoding.convert(data, _Versioned, what), what)
        return decoding.convert(data, ConfigDocument, what).to_config(what)

    @classmethod
    def decode(cls, document: str | bytes, what: str = "state file") -> Config:
        """A configuration from JSON text, every value's type checked before it is used."""
        _check_version(decoding.decode(document, _Versioned, what), what)
        return decoding.decode(document, ConfigDocument, what).to_config(what)


@dataclass(frozen=True)
class _Versioned:
    """The one field read before the rest: a document of another version has other fields."""

    version: object = None


def _check_version(header: _Versioned, what: str) -> None:
    version = header.version
    if type(version) is not int:
        raise InvalidArgument(f"{what} has no format version (a whole number, {STATE_FORMAT_VERSION} here)")
    if version != STATE_FORMAT_VERSION:
        raise InvalidArgument(f"{what}: format version {version} is not supported (expected {STATE_FORMAT_VERSION})")


@dataclass(frozen=True)
class NodeIdentity:
    id: str


@dataclass(frozen=True)
class Settings:
    iqn_prefix: str = DEFAULT_IQN_PREFIX


@dataclass(frozen=True)
class ConfigDocument:
    """The JSON shape of a ``Config``: what ``to_json`` writes and the decoder checks."""

    version: int
    node: NodeIdentity
    settings: Settings = Settings()
    disks: tuple[Disk, ...] = ()
    targets: tuple[Target, ...] = ()
    portals: tuple[Portal, ...] = ()
    discovery_chap: Chap | None = None
    boot_clients: tuple[BootClient, ...] = ()

    def to_config(self, what: str) -> Config:
        return Config(
            node_id=self.node.id,
            iqn_prefix=self.settings.iqn_prefix,
            disks=_by_name(self.disks, "disk", what),
            targets=_by_name(self.targets, "target", what),
            portals=self.portals,
            discovery_chap=self.discovery_chap,
            boot_clients=_by_name(self.boot_clients, "boot profile", what),
        )


def _by_name(items: tuple[Any, ...], kind: str, what: str) -> dict[str, Any]:
    by_name = {item.name: item for item in items}
    if len(by_name) != len(items):
        repeated = sorted({item.name for item in items if sum(other.name == item.name for other in items) > 1})
        raise InvalidArgument(f"{what} lists {kind} {', '.join(map(repr, repeated))} more than once")
    return by_name


def _chap_to_json(chap: Chap | None) -> dict[str, str] | None:
    return dataclasses.asdict(chap) if chap else None


class StateStore:
    """Reads and atomically replaces the state file."""

    def __init__(self, directory: Path, file_name: str) -> None:
        self.directory = directory
        self.path = directory / file_name

    def load(self) -> Config | None:
        """Return the stored configuration, or None when the node was never configured."""
        text = read_state_file(self.path)
        if text is None:
            return None
        try:
            return Config.decode(text, str(self.path))
        except InvalidArgument as exc:
            raise StateError(str(exc)) from None

    def save(self, config: Config) -> None:
        write_state_file(self.path, json.dumps(config.to_json(), indent=2, sort_keys=True).encode() + b"\n")


class Versioned(Protocol):
    """What every versioned file of the state directory starts with (besides state.json)."""

    version: int


V = TypeVar("V", bound=Versioned)


def load_versioned(path: Path, schema: type[V], version: int) -> V | None:
    """A versioned file of the state directory as ``schema``, None if absent; StateError if
    unreadable, malformed or of another format version."""
    text = read_state_file(path)
    if text is None:
        return None
    try:
        document = decoding.decode(text, schema, str(path))
        if document.version != version:
            raise InvalidArgument(f"{path}: format version {document.version} is not supported")
    except InvalidArgument as exc:
        raise StateError(f"{path} is unusable: {exc}") from None
    return document


def save_versioned(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` (with its "version") as the file's JSON, atomically, mode 0600."""
    write_state_file(path, json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")


def read_state_file(path: Path) -> bytes | None:
    """The content of a file of the state directory, None if absent; StateError if unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror}") from exc


def write_state_file(path: Path, payload: bytes) -> None:
    """``write_private_file``, failing with StateError."""
    try:
        write_private_file(path, payload)
    except OSError as exc:
        raise StateError(f"cannot write {path}: {exc.strerror}") from exc


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
