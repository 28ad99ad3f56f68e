"""iSCSI boot profiles: the DHCP strings that let a client's boot firmware find its boot LUN.

A profile names one client (its initiator IQN and, optionally, its MAC) and one or two target
portals: the active node and, in a two-node cluster, the standby node. From it this module
writes the RFC 4173 root path (DHCP option 17) and the option 43 sub-options of the Broadcom /
QLogic iSCSI boot firmware (201 first target, 202 second target, 203 initiator IQN, sent to
clients whose option 60 is the firmware's "DHCP Vendor ID", ``BRCM ISAN`` by default), as
ready-to-paste snippets for ISC dhcpd, Kea (DHCPv4) and dnsmasq. Nothing here touches the
system; the snippets are text for the administrator's DHCP server.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

from applianced.errors import InvalidArgument
from applianced.names import normalize_iscsi_name
from applianced.state import BootClient, Target

ROOT_PATH_OPTION = 17
VENDOR_SPECIFIC_OPTION = 43
VENDOR_CLASS_OPTION = 60
FIRST_TARGET_SUBOPTION = 201
SECOND_TARGET_SUBOPTION = 202
INITIATOR_NAME_SUBOPTION = 203

DEFAULT_VENDOR_ID = "BRCM ISAN"
ISCSI_PORT = 3260
# RFC 4173 <protocol>: the IP protocol number of TCP, the only transport iSCSI boot uses.
ROOT_PATH_PROTOCOL = 6
# The firmware accepts LUN 0-255, but the Microsoft initiator crashes when it boots from
# LUN 255, so 255 is never offered as a boot LUN.
MAX_BOOT_LUN = 254
# A DHCPv4 option carries at most 255 bytes; longer values need RFC 3396 splitting, which
# boot ROMs cannot be relied on to reassemble.
MAX_OPTION_BYTES = 255

# The name ends up in ISC class names, Kea class names and dnsmasq tags; a DNS label is
# safe in all three and is what people already call their hosts.
_PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(?:([:-])[0-9A-Fa-f]{2})(?:\1[0-9A-Fa-f]{2}){4}$")
# The vendor ID is written unescaped into a Kea expression ('...'), a dnsmasq argument list
# (',' separates, '#' starts a comment, quotes are stripped) and an ISC string.
_VENDOR_ID_FORBIDDEN = set("\"'\\,#")

_ISC_SPACE = "iscsi-boot"
_ISC_SUBOPTION_NAMES = {
    FIRST_TARGET_SUBOPTION: "first-target",
    SECOND_TARGET_SUBOPTION: "second-target",
    INITIATOR_NAME_SUBOPTION: "initiator-name",
}
_KEA_SPACE = "vendor-encapsulated-options-space"
_KEA_SUBOPTION_NAMES = {code: f"iscsi-boot-{name}" for code, name in _ISC_SUBOPTION_NAMES.items()}


@dataclass(frozen=True)
class BootTarget:
    """One target portal a client may boot from, and the LUN it boots from there."""

    address: str
    target_iqn: str
    port: int = ISCSI_PORT
    lun: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", _normalize_address(self.address))
        object.__setattr__(self, "target_iqn", normalize_iscsi_name(self.target_iqn, "target IQN"))
        if not _is_int(self.port) or not 1 <= self.port <= 65535:
            raise InvalidArgument(f"target port {self.port!r} is out of range: use 1 to 65535")
        if not _is_int(self.lun) or not 0 <= self.lun <= MAX_BOOT_LUN:
            raise InvalidArgument(
                f"boot LUN {self.lun!r} is out of range: use 0 to {MAX_BOOT_LUN} "
                "(LUN 255 crashes the Microsoft initiator at boot)"
            )

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.address


@dataclass(frozen=True)
class BootProfile:
    """What one client needs from DHCP to boot from iSCSI."""

    name: str
    initiator_iqn: str
    primary: BootTarget
    secondary: BootTarget | None = None
    mac: str | None = None
    vendor_id: str = DEFAULT_VENDOR_ID

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _PROFILE_NAME_RE.fullmatch(self.name):
            raise InvalidArgument(
                f"boot profile name {self.name!r} is invalid: use 1 to 63 letters, digits or '-', "
                "not starting or ending with '-'"
            )
        object.__setattr__(self, "initiator_iqn", normalize_iscsi_name(self.initiator_iqn, "initiator IQN"))
        if not isinstance(self.primary, BootTarget):
            raise InvalidArgument("the first boot target is missing")
        if self.secondary is not None:
            if not isinstance(self.secondary, BootTarget):
                raise InvalidArgument("the second boot target is not a boot target")
            if self.secondary == self.primary:
                raise InvalidArgument("the second boot target is the same as the first; omit it instead")
        if self.mac is not None:
            object.__setattr__(self, "mac", _normalize_mac(self.mac))
        _check_vendor_id(self.vendor_id)


def root_path(target: BootTarget) -> str:
    """Return the RFC 4173 root path ``iscsi:<server>:6:<port>:<LUN>:<targetname>``.

    The LUN is hexadecimal. RFC 4173 writes it as the SAM LUN in up to four dash-separated
    16-bit hex groups with trailing zero groups left out; for a boot LUN of 0-254 (single-level
    peripheral addressing) that is just the LUN in hex, so LUN 64 is ``40``, which is what the
    Broadcom/QLogic firmware, iPXE and the UEFI iSCSI driver all read.
    """
    server = f"[{target.address}]" if target.is_ipv6 else target.address
    return f"iscsi:{server}:{ROOT_PATH_PROTOCOL}:{target.port}:{target.lun:X}:{target.target_iqn}"


def vendor_suboptions(profile: BootProfile) -> list[tuple[int, str]]:
    """Return the option 43 sub-options (code, text) in the order the firmware documents them."""
    suboptions = [(FIRST_TARGET_SUBOPTION, root_path(profile.primary))]
    if profile.secondary is not None:
        suboptions.append((SECOND_TARGET_SUBOPTION, root_path(profile.secondary)))
    suboptions.append((INITIATOR_NAME_SUBOPTION, profile.initiator_iqn))
    return suboptions


def isc_dhcpd(profile: BootProfile, *, definitions: bool = True) -> str:
    """Return a dhcpd.conf snippet: a class matching the client that carries options 17 and 43.

    ``definitions`` includes the option space declarations; dhcpd accepts them repeated, so
    snippets of several profiles can be pasted one after the other.
    """
    primary_path, suboptions = _dhcp4_values(profile)
    lines = [f"# iSCSI boot profile {profile.name}: ISC dhcpd (dhcpd.conf)"]
    if definitions:
        lines.append(f"option space {_ISC_SPACE};")
        lines += [
            f"option {_ISC_SPACE}.{name} code {code} = text;" for code, name in sorted(_ISC_SUBOPTION_NAMES.items())
        ]
    match = f"option vendor-class-identifier = {_quote(profile.vendor_id)}"
    if profile.mac is not None:
        # ``hardware`` is the hardware type (1, Ethernet) followed by the client's address.
        match += f" and hardware = 1:{profile.mac}"
    lines += [
        f'class "{_class_name(profile)}" {{',
        f"    match if {match};",
        # dhcpd sends only the options a client asks for; the firmware's request list is not
        # documented, so 17 and 43 (hex 11, 2b) are added to it rather than hoped for.
        "    if exists dhcp-parameter-request-list {",
        "        option dhcp-parameter-request-list = concat(option dhcp-parameter-request-list, 11, 2b);",
        "    }",
        f"    option root-path {_quote(primary_path)};",
        f"    vendor-option-space {_ISC_SPACE};",
    ]
    lines += [f"    option {_ISC_SPACE}.{_ISC_SUBOPTION_NAMES[code]} {_quote(value)};" for code, value in suboptions]
    lines.append("}")
    return "\n".join(lines) + "\n"


def kea(profile: BootProfile, *, definitions: bool = True) -> str:
    """Return a JSON object to merge into Kea's ``Dhcp4`` map: option-def and a client class.

    Kea refuses an option definition given twice, so pass ``definitions=False`` for every
    profile after the first one that goes into the same configuration.
    """
    primary_path, suboptions = _dhcp4_values(profile)
    test = f"option[{VENDOR_CLASS_OPTION}].text == '{profile.vendor_id}'"
    if profile.mac is not None:
        test += " and pkt4.mac == 0x" + profile.mac.replace(":", "")
    option_data: list[dict[str, object]] = [
        # always-send: Kea, like dhcpd, otherwise sends only what the client asked for.
        {"name": "root-path", "code": ROOT_PATH_OPTION, "data": primary_path, "always-send": True},
        # Option 43 without data: Kea builds it from the sub-options of its encapsulated space.
        {"name": "vendor-encapsulated-options", "code": VENDOR_SPECIFIC_OPTION, "always-send": True},
    ]
    option_data += [
        {"name": _KEA_SUBOPTION_NAMES[code], "code": code, "space": _KEA_SPACE, "data": value}
        for code, value in suboptions
    ]
    fragment: dict[str, object] = {}
    if definitions:
        fragment["option-def"] = [
            {"name": name, "code": code, "space": _KEA_SPACE, "type": "string"}
            for code, name in sorted(_KEA_SUBOPTION_NAMES.items())
        ]
    fragment["client-classes"] = [{"name": _class_name(profile), "test": test, "option-data": option_data}]
    return json.dumps(fragment, indent=4) + "\n"


def dnsmasq(profile: BootProfile) -> str:
    """Return dnsmasq.conf lines: tags for the client and forced options 17 and 43.

    dnsmasq matches a vendor class as a substring of the client's option 60, not exactly.
    """
    primary_path, suboptions = _dhcp4_values(profile)
    vendor_tag = f"{_class_name(profile)}-vendor"
    lines = [
        f"# iSCSI boot profile {profile.name}: dnsmasq",
        f"dhcp-vendorclass=set:{vendor_tag},{profile.vendor_id}",
    ]
    tags = f"tag:{vendor_tag}"
    if profile.mac is not None:
        # dhcp-mac rather than dhcp-host: it only sets a tag, so it does not clash with a
        # dhcp-host line that already gives this client its address.
        mac_tag = f"{_class_name(profile)}-mac"
        lines.append(f"dhcp-mac=set:{mac_tag},{profile.mac}")
        tags += f",tag:{mac_tag}"
    # dhcp-option-force: sent even if the firmware does not list the option in its request.
    # Values are quoted so that dnsmasq keeps them as text instead of guessing a type.
    lines.append(f"dhcp-option-force={tags},{ROOT_PATH_OPTION},{_quote(primary_path)}")
    lines += [
        f"dhcp-option-force={tags},vendor:{profile.vendor_id},{code},{_quote(value)}" for code, value in suboptions
    ]
    return "\n".join(lines) + "\n"


def _dhcp4_values(profile: BootProfile) -> tuple[str, list[tuple[int, str]]]:
    targets = [profile.primary] if profile.secondary is None else [profile.primary, profile.secondary]
    for target in targets:
        if target.is_ipv6:
            # DHCPv6 boot clients take the sub-options in DHCPv6 option 17, which these
            # DHCPv4 snippets cannot carry.
            raise InvalidArgument(f"target portal {target.address} is IPv6; DHCPv4 boot options need IPv4 portals")
    primary_path = root_path(profile.primary)
    if len(primary_path.encode()) > MAX_OPTION_BYTES:
        raise InvalidArgument(
            f"root path of profile {profile.name} is {len(primary_path.encode())} bytes; "
            f"DHCP option {ROOT_PATH_OPTION} holds at most {MAX_OPTION_BYTES}: use a shorter target IQN"
        )
    suboptions = vendor_suboptions(profile)
    # Each sub-option costs a code byte and a length byte on top of its text.
    encoded = sum(2 + len(value.encode()) for _, value in suboptions)
    if encoded > MAX_OPTION_BYTES:
        raise InvalidArgument(
            f"option {VENDOR_SPECIFIC_OPTION} of profile {profile.name} would be {encoded} bytes; "
            f"it holds at most {MAX_OPTION_BYTES}: use shorter IQNs or drop the second target"
        )
    return primary_path, suboptions


def _class_name(profile: BootProfile) -> str:
    return f"iscsi-boot-{profile.name}"


def _quote(text: str) -> str:
    # dhcpd and dnsmasq both read C-style \\ and \" inside double quotes.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _normalize_address(address: object) -> str:
    if not isinstance(address, str):
        raise InvalidArgument(f"target address {address!r} is not an IP address")
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError as exc:
        raise InvalidArgument(f"target address {address!r} is not an IP address") from exc
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        raise InvalidArgument(f"target address {address!r} has a zone index, which boot firmware cannot use")
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise InvalidArgument(f"target address {address!r} is not one a boot client can connect to")
    return ip.compressed


def _normalize_mac(mac: object) -> str:
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac.strip()):
        raise InvalidArgument(f"MAC address {mac!r} is invalid: use six hex pairs such as 00:11:22:33:44:55")
    normalized = mac.strip().lower().replace("-", ":")
    if int(normalized[:2], 16) & 1:
        raise InvalidArgument(f"MAC address {mac!r} is a multicast address, not a client's")
    return normalized


def _check_vendor_id(vendor_id: object) -> None:
    if not isinstance(vendor_id, str) or not 1 <= len(vendor_id) <= MAX_OPTION_BYTES:
        raise InvalidArgument(f"DHCP vendor ID {vendor_id!r} must be 1 to {MAX_OPTION_BYTES} characters")
    if vendor_id != vendor_id.strip():
        raise InvalidArgument(f"DHCP vendor ID {vendor_id!r} must not start or end with a space")
    if any(not " " <= c <= "~" or c in _VENDOR_ID_FORBIDDEN for c in vendor_id):
        raise InvalidArgument(f"DHCP vendor ID {vendor_id!r} must be printable ASCII without quotes, '\\', ',' or '#'")


def render_all(profile: BootProfile) -> dict[str, str]:
    """Every format that applies, by name; raises InvalidArgument if one cannot be made.

    With an IPv6 portal only the root path applies: the DHCPv4 snippets cannot carry it, and
    DHCPv6 servers take the root path as it is.
    """
    formats = {"root-path": root_path(profile.primary)}
    if not any(target.is_ipv6 for target in (profile.primary, profile.secondary) if target):
        formats.update({"isc-dhcpd": isc_dhcpd(profile), "kea": kea(profile), "dnsmasq": dnsmasq(profile)})
    return formats


def profile_for(client: BootClient, target: Target) -> BootProfile:
    """The DHCP view of a configured boot client, with its target's current IQN."""
    secondary = None
    if client.secondary_address:
        secondary = BootTarget(client.secondary_address, target.iqn, client.secondary_port, client.lun)
    return BootProfile(
        name=client.name,
        initiator_iqn=client.initiator,
        primary=BootTarget(client.address, target.iqn, client.port, client.lun),
        secondary=secondary,
        mac=client.mac or None,
    )
