"""The rules every configuration obeys, whether built operation by operation or imported.

Each check raises a named error (InvalidArgument, AlreadyExists, Busy) with a sentence
that never contains a secret; ``validate_config`` applies all of them to a whole
configuration, so an import is held to exactly the rules of the operations.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Collection, Iterable
from pathlib import Path

from applianced import names
from applianced.constants import ISCSI_DEFAULT_PORT
from applianced.errors import AlreadyExists, InvalidArgument
from applianced.iscsi import bootprofile, devices, diskfile, firewall
from applianced.iscsi.kernel.model import DIGEST_OFFERS
from applianced.state import Chap, Config, Disk, Portal
from applianced.units import SECTOR_SIZE, format_size

MIN_DISK_SIZE = 1024 * 1024
# The file, trailer included, must stay below 2**63 bytes (off_t); larger files fail
# earlier anyway, with the file system's own limit (EFBIG), before anything is kept.
MAX_DISK_SIZE = 2**63 - diskfile.TRAILER_SIZE - SECTOR_SIZE
# Linux's NAME_MAX and PATH_MAX, in bytes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4095
# The longest T10 unit serial LIO stores (INQUIRY_VPD_SERIAL_LEN less its NUL).
MAX_SERIAL_BYTES = 253
MAX_LUN = 255
# Disk.backstore: how LIO reaches a disk (see applianced/state.py).
BACKSTORES = ("dm", "direct")
MAX_DESCRIPTION = 256
MAX_ALIAS_BYTES = 255
MAX_CHAP_USER_BYTES = 128
CHAP_SECRET_MIN = 12
CHAP_SECRET_MAX = 16


def check_path(path: str) -> Path:
    file_path = Path(path)
    if not file_path.is_absolute() or os.path.normpath(path) != path:
        raise InvalidArgument(f"path {path!r} must be absolute and normalised")
    # LIO's control string is comma-separated, and configfs values are one line.
    if any(ch in path for ch in ",\n\t") or not path.isprintable():
        raise InvalidArgument(f"path {path!r} contains a comma or a control character")
    if len(path.encode()) > MAX_PATH_BYTES or any(len(part.encode()) > MAX_NAME_BYTES for part in file_path.parts):
        raise InvalidArgument(
            f"path {path!r} is too long: at most {MAX_PATH_BYTES} bytes, {MAX_NAME_BYTES} bytes per component"
        )
    return file_path


def check_serial(serial: str) -> str:
    """A unit serial that LIO stores and VPD page 0x80 carries: printable ASCII."""
    if not 1 <= len(serial) <= MAX_SERIAL_BYTES or not _is_token(serial):
        raise InvalidArgument(f"serial {serial!r} must be 1 to {MAX_SERIAL_BYTES} printable ASCII characters")
    return serial


def check_marker(marker: diskfile.Marker) -> diskfile.Marker:
    """Refuse a trailer whose content no disk of applianced could have written."""
    names.validate_object_name("disk", marker.name)
    check_serial(marker.serial)
    check_size(marker.size)
    return marker


def marker_of(disk: Disk) -> diskfile.Marker:
    return diskfile.Marker(name=disk.name, serial=disk.serial, size=disk.size)


def check_size(size: int) -> None:
    if not MIN_DISK_SIZE <= size <= MAX_DISK_SIZE:
        raise InvalidArgument(
            f"size {size} is out of range: at least {format_size(MIN_DISK_SIZE)}, at most {format_size(MAX_DISK_SIZE)}"
        )
    if size % SECTOR_SIZE:
        raise InvalidArgument(f"size {size} is not a multiple of {SECTOR_SIZE} bytes")


def check_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION or not description.isprintable():
        raise InvalidArgument(f"description must be at most {MAX_DESCRIPTION} printable characters")
    return description


def validate_config(config: Config, local_addresses: set[str], unchecked: Collection[str] = ()) -> None:
    """Check a whole configuration with the same rules as the operations that build one.

    The backing of the disks named in ``unchecked`` is not looked at: files about to be
    adopted, and disks that are missing now and stay as they are.
    """
    names.generate_target_iqn(config.iqn_prefix, "check")
    paths: set[str] = set()
    serials: set[str] = set()
    for disk in config.disks.values():
        names.validate_object_name("disk", disk.name)
        check_size(disk.size)
        check_description(disk.description)
        path = check_path(disk.path)
        check_serial(disk.serial)
        if disk.path in paths or disk.serial in serials:
            raise AlreadyExists(f"disk {disk.name!r} shares its file or serial with another disk")
        paths.add(disk.path)
        serials.add(disk.serial)
        if disk.kind not in ("file", "block"):
            raise InvalidArgument(f"disk {disk.name!r} has an unknown kind {disk.kind!r}")
        if disk.backstore not in BACKSTORES:
            raise InvalidArgument(f"disk {disk.name!r} has an unknown backstore {disk.backstore!r} (dm or direct)")
        if disk.name in unchecked:
            continue
        if disk.kind == "block":
            devices.resolve(disk.path)
        elif diskfile.read_marker(path) != marker_of(disk):
            marker = diskfile.read_marker(path)
            raise InvalidArgument(
                f"disk {disk.name!r}: {path} holds disk {marker.name!r} (serial {marker.serial}, "
                f"{marker.size} bytes), not the one the configuration describes"
            )
    iqns: set[str] = set()
    exported: set[str] = set()
    for target in config.targets.values():
        in_target: set[str] = set()
        names.validate_object_name("target", target.name)
        if names.normalize_iscsi_name(target.iqn, "target IQN") != target.iqn or target.iqn in iqns:
            raise InvalidArgument(f"target {target.name!r} has a non-canonical or duplicate IQN {target.iqn}")
        iqns.add(target.iqn)
        check_description(target.description)
        check_alias(target.alias)
        check_chap(target.chap)
        check_digest(target.header_digest)
        check_digest(target.data_digest)
        numbers = [lun.number for lun in target.luns]
        if len(set(numbers)) != len(numbers) or not all(0 <= n <= MAX_LUN for n in numbers):
            raise InvalidArgument(f"target {target.name!r} has duplicate or out-of-range LUN numbers")
        for lun in target.luns:
            disk = config.disks.get(lun.disk)
            if disk is None or lun.disk in in_target or (lun.disk in exported and not disk.shared):
                raise InvalidArgument(
                    f"LUN {lun.number} of target {target.name!r}: disk {lun.disk!r} is unknown or exported twice"
                    " (only a shared disk may be exported by several targets)"
                )
            in_target.add(lun.disk)
            exported.add(lun.disk)
        initiators = [acl.initiator for acl in target.acls]
        if len(set(initiators)) != len(initiators):
            raise InvalidArgument(f"target {target.name!r} lists an initiator twice")
        for acl in target.acls:
            if names.normalize_iscsi_name(acl.initiator, "initiator name") != acl.initiator:
                raise InvalidArgument(f"initiator {acl.initiator} of target {target.name!r} is not canonical")
            check_chap(acl.chap)
        if firewall.normalize_sources(target.allowed_sources) != target.allowed_sources:
            raise InvalidArgument(f"target {target.name!r} has a malformed, unsorted or repeated allowed source")
    seen: list[Portal] = []
    for portal in config.portals:
        if not portal.targets == tuple(sorted(set(portal.targets))) or not set(portal.targets) <= set(config.targets):
            raise InvalidArgument(f"portal {portal.key} lists unknown or repeated targets")
        if canonical_address(portal.address) != portal.address or portal in seen:
            raise InvalidArgument(f"portal {portal.key} is not canonical or listed twice")
        check_port(portal.port)
        check_portal(portal, seen, local_addresses)
        seen.append(portal)
    firewall.check_portals(config)
    if config.discovery_chap is not None and not config.discovery_chap.user:
        raise InvalidArgument("discovery CHAP needs a user name")
    check_chap(config.discovery_chap)
    for client in config.boot_clients.values():
        target = config.targets.get(client.target)
        if target is None or target.acl(client.initiator) is None or target.lun(client.lun) is None:
            raise InvalidArgument(f"boot profile {client.name!r} refers to a target, ACL or LUN that is missing")
        bootprofile.render_all(bootprofile.profile_for(client, target))


def merge(config: Config, part: Config) -> Config:
    """``config`` with the entities of ``part`` added; a name used by both is refused."""
    for kind, mine, theirs in (("disk", config.disks, part.disks), ("target", config.targets, part.targets)):
        clash = sorted(set(mine) & set(theirs))
        if clash:
            raise AlreadyExists(f"{kind}(s) {', '.join(clash)} exist already")
    portals = config.portals + tuple(p for p in part.portals if p not in config.portals)
    return dataclasses.replace(
        config,
        disks={**config.disks, **part.disks},
        targets={**config.targets, **part.targets},
        portals=portals,
        discovery_chap=config.discovery_chap or part.discovery_chap,
    )


def check_portal(portal: Portal, others: Iterable[Portal], local_addresses: set[str]) -> None:
    version = ipaddress.ip_address(portal.address).version
    for other in others:
        same_family = ipaddress.ip_address(other.address).version == version
        either_wildcard = (
            ipaddress.ip_address(other.address).is_unspecified or ipaddress.ip_address(portal.address).is_unspecified
        )
        # Linux will not bind a listening socket beside a wildcard one on the same port.
        if same_family and either_wildcard and other.port == portal.port:
            raise InvalidArgument(f"portal {portal.key} overlaps portal {other.key} on the same port")
    if not ipaddress.ip_address(portal.address).is_unspecified and portal.address not in local_addresses:
        raise InvalidArgument(f"address {portal.address} is not configured on any interface of this node")


def parse_portal(text: str) -> tuple[str, int]:
    """``10.0.0.1``, ``10.0.0.1:3261``, ``fd00::1`` or ``[fd00::1]:3261`` to (address, port)."""
    address, port = text, ISCSI_DEFAULT_PORT
    if text.startswith("["):
        address, _, rest = text[1:].partition("]")
        if rest:
            port = _port_number(rest.removeprefix(":"), text)
    elif text.count(":") == 1:
        address, _, rest = text.partition(":")
        port = _port_number(rest, text)
    return canonical_address(address), check_port(port)


def _port_number(text: str, portal: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise InvalidArgument(f"portal {portal!r} has no valid port number")
    return int(text)


def check_chap(chap: Chap | None) -> Chap | None:
    """Refuse credentials that initiators or boot firmware would reject; never echo a secret."""
    if chap is None:
        return None
    if not chap.secret:
        # A reverse (mutual) secret alone would authenticate only the target.
        raise InvalidArgument("CHAP needs a secret; mutual CHAP alone is not allowed")
    for what, user in (("CHAP user", chap.user), ("mutual CHAP user", chap.mutual_user)):
        if len(user.encode()) > MAX_CHAP_USER_BYTES or not _is_token(user):
            raise InvalidArgument(f"{what} must be at most {MAX_CHAP_USER_BYTES} bytes without spaces")
    _check_secret("CHAP secret", chap.secret)
    if chap.mutual_user and not chap.mutual_secret:
        raise InvalidArgument("a mutual CHAP user needs a mutual secret")
    if chap.mutual_secret:
        _check_secret("mutual CHAP secret", chap.mutual_secret)
        if chap.mutual_secret == chap.secret:
            raise InvalidArgument("the mutual CHAP secret must differ from the CHAP secret")
    return chap


def _check_secret(what: str, secret: str) -> None:
    # 12 is the minimum of boot firmware and of the reference; 16 its maximum plus one.
    if not CHAP_SECRET_MIN <= len(secret) <= CHAP_SECRET_MAX or not _is_token(secret):
        raise InvalidArgument(
            f"{what} must be {CHAP_SECRET_MIN} to {CHAP_SECRET_MAX} printable ASCII characters without spaces"
        )


def _is_token(text: str) -> bool:
    return all(33 <= ord(ch) <= 126 for ch in text)


def check_digest(digest: str) -> str:
    if digest not in DIGEST_OFFERS:
        raise InvalidArgument(f"digest setting {digest!r} is not one of {', '.join(DIGEST_OFFERS)}")
    return digest


def check_alias(alias: str) -> str:
    # TargetAlias is UTF-8 text of at most 255 bytes (RFC 7143 §13.6).
    if len(alias.encode()) > MAX_ALIAS_BYTES or not alias.isprintable():
        raise InvalidArgument(f"alias must be at most {MAX_ALIAS_BYTES} bytes of printable text")
    return alias


def canonical_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        raise InvalidArgument(f"{address!r} is not an IPv4 or IPv6 address") from None


def check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise InvalidArgument(f"port {port} is out of range 1-65535")
    return port
