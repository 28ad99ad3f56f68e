"""iSCSI boot profiles: the DHCP settings that let a client's boot firmware find its boot LUN.

A profile names one client (its initiator IQN and, usually, its MAC), one or two target
portals (the active node and, in a two-node cluster, the standby node) and the firmware
families it serves. Each family reads different DHCP options (see the README's table):

* all of them read the RFC 4173 root path, DHCP option 17;
* iPXE (every QEMU/KVM NIC ROM, PXE chain-loads) reads the initiator IQN from top-level
  option 203 and CHAP credentials from its option 175 encapsulation (190 username, 191
  password, 192 reverse username, 193 reverse password: iPXE src/include/ipxe/dhcp.h);
* the Broadcom / QLogic firmware reads option 43 sub-options 201/202 (first and second
  target) and 203 (initiator IQN) when its option 60 is its "DHCP Vendor ID", ``BRCM ISAN``
  by default;
* UEFI's iSCSI driver (EDK2 NetworkPkg/IScsiDxe/IScsiDhcp.c) reads option 17 only, in an
  attempt set to take its target from DHCP; the rest is typed into its setup.

The settings are rendered as ready-to-paste snippets for ISC dhcpd, Kea (DHCPv4) and
dnsmasq. CHAP credentials are left out unless ``secrets`` is asked for, which only root may
do over D-Bus. Nothing here touches the system; the snippets are text for the
administrator's DHCP server.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

from applianced.errors import InvalidArgument
from applianced.iscsi.kernel.model import resolve_chap
from applianced.names import normalize_iscsi_name
from applianced.state import BootClient, Chap, Config, Target

ROOT_PATH_OPTION = 17
VENDOR_SPECIFIC_OPTION = 43
VENDOR_CLASS_OPTION = 60
USER_CLASS_OPTION = 77
IPXE_ENCAPSULATION_OPTION = 175
INITIATOR_IQN_OPTION = 203
FIRST_TARGET_SUBOPTION = 201
SECOND_TARGET_SUBOPTION = 202
INITIATOR_NAME_SUBOPTION = 203
IPXE_USERNAME_SUBOPTION = 190
IPXE_PASSWORD_SUBOPTION = 191
IPXE_REVERSE_USERNAME_SUBOPTION = 192
IPXE_REVERSE_PASSWORD_SUBOPTION = 193

# The firmware families a profile serves: "all" of them, or just one.
FIRMWARE_ALL = "all"
FIRMWARE_IPXE = "ipxe"
FIRMWARE_UEFI = "uefi"
FIRMWARE_BROADCOM = "broadcom"
FIRMWARES = (FIRMWARE_ALL, FIRMWARE_IPXE, FIRMWARE_UEFI, FIRMWARE_BROADCOM)

DEFAULT_VENDOR_ID = "BRCM ISAN"
# What iPXE sends as its user class (option 77), as a bare string rather than RFC 3004's
# length-prefixed list.
IPXE_USER_CLASS = "iPXE"
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
_PROFILE_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?:([:-])[0-9A-Fa-f]{2})(?:\1[0-9A-Fa-f]{2}){4}")
# The vendor ID is written unescaped into a Kea expression ('...'), a dnsmasq argument list
# (',' separates, '#' starts a comment, quotes are stripped) and an ISC string.
_VENDOR_ID_FORBIDDEN = set("\"'\\,#")

# Option spaces, by the encapsulating option: Broadcom's sub-options live in option 43,
# iPXE's in option 175.
_BROADCOM = VENDOR_SPECIFIC_OPTION
_IPXE = IPXE_ENCAPSULATION_OPTION
# The names iPXE's own documentation gives its options in dhcpd.conf, so that the snippet
# agrees with an iPXE configuration already in place.
_ISC_SPACES = {_BROADCOM: "iscsi-boot", _IPXE: "ipxe"}
_ISC_SUBOPTIONS = {
    _BROADCOM: {
        FIRST_TARGET_SUBOPTION: ("first-target", "text"),
        SECOND_TARGET_SUBOPTION: ("second-target", "text"),
        INITIATOR_NAME_SUBOPTION: ("initiator-name", "text"),
    },
    _IPXE: {
        IPXE_USERNAME_SUBOPTION: ("username", "string"),
        IPXE_PASSWORD_SUBOPTION: ("password", "string"),
        IPXE_REVERSE_USERNAME_SUBOPTION: ("reverse-username", "string"),
        IPXE_REVERSE_PASSWORD_SUBOPTION: ("reverse-password", "string"),
    },
}
_ISC_TOP_LEVEL = {ROOT_PATH_OPTION: "root-path", INITIATOR_IQN_OPTION: "iscsi-initiator-iqn"}
_ISC_IPXE_ENCAPSULATION = "ipxe-encap-opts"
_KEA_SPACES = {_BROADCOM: "vendor-encapsulated-options-space", _IPXE: "ipxe"}
_KEA_SUBOPTION_NAMES = {
    _BROADCOM: {code: f"iscsi-boot-{name}" for code, (name, _) in _ISC_SUBOPTIONS[_BROADCOM].items()},
    _IPXE: {code: name for code, (name, _) in _ISC_SUBOPTIONS[_IPXE].items()},
}
_KEA_ENCAPSULATIONS = {_BROADCOM: "vendor-encapsulated-options", _IPXE: _ISC_IPXE_ENCAPSULATION}


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
    """What one client needs from DHCP to boot from iSCSI.

    ``chap`` holds the credentials the target checks, with default user names filled in
    (see ``resolve_chap``); only iPXE takes them from DHCP.
    """

    name: str
    initiator_iqn: str
    primary: BootTarget
    secondary: BootTarget | None = None
    mac: str | None = None
    vendor_id: str = DEFAULT_VENDOR_ID
    firmware: str = FIRMWARE_ALL
    chap: Chap | None = None

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
        if self.firmware not in FIRMWARES:
            raise InvalidArgument(f"boot firmware {self.firmware!r} is not one of {', '.join(FIRMWARES)}")
        if self.firmware == FIRMWARE_UEFI and self.mac is None:
            # IScsiDxe's DHCP request carries no vendor or user class to tell it apart.
            raise InvalidArgument("a profile for UEFI needs the client's MAC: UEFI's iSCSI driver sends no class")


@dataclass(frozen=True)
class DhcpOption:
    """One option value; ``space`` is the encapsulating option (43, 175) or 0 for top level."""

    code: int
    value: str
    space: int = 0
    # CHAP credentials: printed only when secrets are asked for.
    credential: bool = False


@dataclass(frozen=True)
class ClientGroup:
    """Options for the profile's clients that also send this vendor class or user class.

    ``family`` names the group in class names and tags ("" for the profile's main group).
    """

    family: str
    options: tuple[DhcpOption, ...]
    vendor_class: str = ""
    user_class: str = ""


def root_path(target: BootTarget) -> str:
    """Return the RFC 4173 root path ``iscsi:<server>:6:<port>:<LUN>:<targetname>``.

    The LUN is hexadecimal. RFC 4173 writes it as the SAM LUN in up to four dash-separated
    16-bit hex groups with trailing zero groups left out; for a boot LUN of 0-254 (single-level
    peripheral addressing) that is just the LUN in hex, so LUN 64 is ``40``, which is what the
    Broadcom/QLogic firmware, iPXE (scsi_parse_lun) and the UEFI iSCSI driver
    (IScsiAsciiStrToLun) all read.
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


def ipxe_options(profile: BootProfile) -> list[DhcpOption]:
    """The initiator IQN as top-level option 203 and the CHAP credentials in option 175."""
    options = [DhcpOption(INITIATOR_IQN_OPTION, profile.initiator_iqn)]
    chap = profile.chap
    if chap is not None:
        credentials = [(IPXE_USERNAME_SUBOPTION, chap.user), (IPXE_PASSWORD_SUBOPTION, chap.secret)]
        if chap.mutual:
            credentials += [
                (IPXE_REVERSE_USERNAME_SUBOPTION, chap.mutual_user),
                (IPXE_REVERSE_PASSWORD_SUBOPTION, chap.mutual_secret),
            ]
        options += [DhcpOption(code, value, _IPXE, credential=True) for code, value in credentials]
    return options


def client_groups(profile: BootProfile) -> list[ClientGroup]:
    """The options of each firmware family, grouped by the class test that must also match.

    With a MAC and every family, one group serves everything to that MAC (UEFI's driver
    can be recognised by nothing else), and Broadcom's option 43 goes only to its vendor
    class, since option 43's meaning depends on the vendor. Without a MAC each family is
    recognised by its class, so UEFI cannot be served (``BootProfile`` refuses that case
    when asked for UEFI alone).
    """
    root = DhcpOption(ROOT_PATH_OPTION, root_path(profile.primary))
    broadcom = tuple(DhcpOption(code, value, _BROADCOM) for code, value in vendor_suboptions(profile))
    ipxe = tuple(ipxe_options(profile))
    if profile.firmware == FIRMWARE_UEFI:
        return [ClientGroup("", (root,))]
    groups = []
    if profile.firmware == FIRMWARE_ALL and profile.mac is not None:
        groups.append(ClientGroup("", (root, *ipxe)))
    elif profile.firmware in (FIRMWARE_ALL, FIRMWARE_IPXE):
        groups.append(ClientGroup(FIRMWARE_IPXE, (root, *ipxe), user_class=IPXE_USER_CLASS))
    if profile.firmware in (FIRMWARE_ALL, FIRMWARE_BROADCOM):
        options = broadcom if groups and profile.mac is not None else (root, *broadcom)
        groups.append(ClientGroup(FIRMWARE_BROADCOM, options, vendor_class=profile.vendor_id))
    return groups


def isc_dhcpd(profile: BootProfile, *, definitions: bool = True, secrets: bool = False) -> str:
    """Return a dhcpd.conf snippet: one class per client group, carrying its options.

    ``definitions`` includes the option declarations; dhcpd accepts them repeated, so
    snippets of several profiles can be pasted one after the other.
    """
    groups = _checked_groups(profile)
    lines = _header(profile, groups, secrets, "ISC dhcpd (dhcpd.conf)")
    if definitions:
        lines += [f"option {_ISC_TOP_LEVEL[INITIATOR_IQN_OPTION]} code {INITIATOR_IQN_OPTION} = string;"]
        for space, suboptions in _ISC_SUBOPTIONS.items():
            lines.append(f"option space {_ISC_SPACES[space]};")
            lines += [
                f"option {_ISC_SPACES[space]}.{name} code {code} = {kind};"
                for code, (name, kind) in sorted(suboptions.items())
            ]
        lines.append(f"option {_ISC_IPXE_ENCAPSULATION} code {_IPXE} = encapsulate {_ISC_SPACES[_IPXE]};")
    for group in groups:
        # ``hardware`` is the hardware type (1, Ethernet) followed by the client's address.
        mac_test = f"hardware = 1:{profile.mac}" if profile.mac is not None else ""
        # The classes need no escaping: the vendor ID has no quotes or backslashes.
        tests = _class_tests(group, 'option vendor-class-identifier = "{}"', 'option user-class = "{}"', mac_test)
        # dhcpd sends only the options a client asks for; firmware request lists differ, so
        # the top-level options and encapsulations are added to the list rather than hoped for.
        requested = sorted({option.space or option.code for option in _shown(group, secrets)})
        lines += [
            f'class "{_class_name(profile, group)}" {{',
            f"    match if {' and '.join(tests)};",
            "    if exists dhcp-parameter-request-list {",
            "        option dhcp-parameter-request-list = concat(option dhcp-parameter-request-list, "
            + ", ".join(f"{code:x}" for code in requested)
            + ");",
            "    }",
        ]
        if any(option.space == _BROADCOM for option in group.options):
            lines.append(f"    vendor-option-space {_ISC_SPACES[_BROADCOM]};")
        for option in _shown(group, secrets):
            if option.space:
                name = f"{_ISC_SPACES[option.space]}.{_ISC_SUBOPTIONS[option.space][option.code][0]}"
            else:
                name = _ISC_TOP_LEVEL[option.code]
            lines.append(f"    option {name} {_quote(option.value)};")
        lines.append("}")
    return "\n".join(lines) + "\n"


def kea(profile: BootProfile, *, definitions: bool = True, secrets: bool = False) -> str:
    """Return a JSON object to merge into Kea's ``Dhcp4`` map: option-def and client classes.

    Kea refuses an option definition given twice, so pass ``definitions=False`` for every
    profile after the first one that goes into the same configuration.
    """
    groups = _checked_groups(profile)
    fragment: dict[str, object] = {}
    if definitions:
        option_defs: list[dict[str, object]] = [
            {"name": _ISC_TOP_LEVEL[INITIATOR_IQN_OPTION], "code": INITIATOR_IQN_OPTION, "type": "string"},
            {
                "name": _KEA_ENCAPSULATIONS[_IPXE],
                "code": _IPXE,
                "type": "empty",
                "encapsulate": _KEA_SPACES[_IPXE],
            },
        ]
        option_defs += [
            {"name": name, "code": code, "space": _KEA_SPACES[space], "type": "string"}
            for space, names in _KEA_SUBOPTION_NAMES.items()
            for code, name in sorted(names.items())
        ]
        fragment["option-def"] = option_defs
    classes = []
    for group in groups:
        mac_test = "pkt4.mac == 0x" + profile.mac.replace(":", "") if profile.mac is not None else ""
        tests = _class_tests(
            group,
            f"option[{VENDOR_CLASS_OPTION}].text == '{{}}'",
            f"option[{USER_CLASS_OPTION}].hex == '{{}}'",
            mac_test,
        )
        option_data: list[dict[str, object]] = []
        for option in _shown(group, secrets):
            if option.space == 0:
                name = _ISC_TOP_LEVEL[option.code]
                # always-send: Kea, like dhcpd, otherwise sends only what the client asked for.
                option_data.append(
                    {"name": name, "code": option.code, "data": _kea_text(option.value), "always-send": True}
                )
                continue
            encapsulation = {"name": _KEA_ENCAPSULATIONS[option.space], "code": option.space, "always-send": True}
            if encapsulation not in option_data:
                # Without data: Kea builds the option from the sub-options of its space.
                option_data.append(encapsulation)
            option_data.append(
                {
                    "name": _KEA_SUBOPTION_NAMES[option.space][option.code],
                    "code": option.code,
                    "space": _KEA_SPACES[option.space],
                    "data": _kea_text(option.value),
                }
            )
        entry: dict[str, object] = {"name": _class_name(profile, group), "test": " and ".join(tests)}
        note = _hidden_note(profile, [group], secrets)
        if note:
            entry["comment"] = note
        entry["option-data"] = option_data
        classes.append(entry)
    fragment["client-classes"] = classes
    return json.dumps(fragment, indent=4) + "\n"


def dnsmasq(profile: BootProfile, *, secrets: bool = False) -> str:
    """Return dnsmasq.conf lines: tags for the client and forced options.

    dnsmasq matches a vendor or user class as a substring of what the client sends.
    """
    groups = _checked_groups(profile)
    lines = _header(profile, groups, secrets, "dnsmasq")
    mac_tags = []
    if profile.mac is not None:
        # dhcp-mac rather than dhcp-host: it only sets a tag, so it does not clash with a
        # dhcp-host line that already gives this client its address.
        mac_tag = f"{_class_name(profile)}-mac"
        lines.append(f"dhcp-mac=set:{mac_tag},{profile.mac}")
        mac_tags.append(f"tag:{mac_tag}")
    for group in groups:
        tags = list(mac_tags)
        if group.vendor_class:
            lines.append(f"dhcp-vendorclass=set:{_class_name(profile, group)},{group.vendor_class}")
            tags.append(f"tag:{_class_name(profile, group)}")
        if group.user_class:
            lines.append(f"dhcp-userclass=set:{_class_name(profile, group)},{group.user_class}")
            tags.append(f"tag:{_class_name(profile, group)}")
        # dhcp-option-force: sent even if the firmware does not list the option in its request.
        # Values are quoted so that dnsmasq keeps them as text instead of guessing a type.
        for option in _shown(group, secrets):
            where = {0: "", _BROADCOM: f"vendor:{group.vendor_class},", _IPXE: f"encap:{_IPXE},"}[option.space]
            lines.append(f"dhcp-option-force={','.join(tags)},{where}{option.code},{_quote(option.value)}")
    return "\n".join(lines) + "\n"


def _checked_groups(profile: BootProfile) -> list[ClientGroup]:
    """The client groups, after checking that DHCPv4 can carry them with their credentials."""
    for target in (profile.primary, profile.secondary):
        if target is not None and target.is_ipv6:
            # DHCPv6 boot clients take the root path in DHCPv6 options, which these DHCPv4
            # snippets cannot carry.
            raise InvalidArgument(f"target portal {target.address} is IPv6; DHCPv4 boot options need IPv4 portals")
    groups = client_groups(profile)
    for group in groups:
        sizes: dict[int, int] = {}
        for option in group.options:
            size = len(option.value.encode())
            if option.space:
                # Each sub-option costs a code byte and a length byte on top of its text.
                sizes[option.space] = sizes.get(option.space, 0) + 2 + size
            elif size > MAX_OPTION_BYTES:
                raise InvalidArgument(
                    f"option {option.code} of profile {profile.name} is {size} bytes; DHCP option "
                    f"{option.code} holds at most {MAX_OPTION_BYTES}: use a shorter IQN"
                )
        for space, size in sizes.items():
            if size > MAX_OPTION_BYTES:
                raise InvalidArgument(
                    f"option {space} of profile {profile.name} would be {size} bytes; it holds at most "
                    f"{MAX_OPTION_BYTES}: use shorter IQNs or CHAP user names, or drop the second target"
                )
    return groups


def _class_tests(group: ClientGroup, vendor_test: str, user_test: str, mac_test: str) -> list[str]:
    """What a client must match, in a server's syntax: ``{}`` in the templates is the class."""
    tests = [vendor_test.format(group.vendor_class)] if group.vendor_class else []
    tests += [user_test.format(group.user_class)] if group.user_class else []
    return tests + ([mac_test] if mac_test else [])


def _shown(group: ClientGroup, secrets: bool) -> list[DhcpOption]:
    return [option for option in group.options if secrets or not option.credential]


def _hidden_note(profile: BootProfile, groups: list[ClientGroup], secrets: bool) -> str:
    """Why the credentials are missing, or "" when nothing was left out."""
    if secrets or all(len(_shown(group, False)) == len(group.options) for group in groups):
        return ""
    return (
        f"CHAP for iPXE (option {_IPXE}) left out: 'appliancectl boot show {profile.name} --secrets' "
        "prints it (root only)"
    )


def _header(profile: BootProfile, groups: list[ClientGroup], secrets: bool, server: str) -> list[str]:
    note = _hidden_note(profile, groups, secrets)
    return [f"# iSCSI boot profile {profile.name}: {server}", *([f"# {note}"] if note else [])]


def _class_name(profile: BootProfile, group: ClientGroup | None = None) -> str:
    base = f"iscsi-boot-{profile.name}"
    return f"{base}-{group.family}" if group is not None and group.family else base


def _quote(text: str) -> str:
    # dhcpd and dnsmasq both read C-style \\ and \" inside double quotes.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kea_text(text: str) -> str:
    # Kea splits option data at commas (csv-format) unless they are escaped.
    return text.replace(",", "\\,")


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


def render_all(profile: BootProfile, *, secrets: bool = False) -> dict[str, str]:
    """Every format that applies, by name; raises InvalidArgument if one cannot be made.

    With an IPv6 portal only the root path applies: the DHCPv4 snippets cannot carry it, and
    DHCPv6 servers take the root path as it is.
    """
    formats = {"root-path": root_path(profile.primary)}
    if not any(target.is_ipv6 for target in (profile.primary, profile.secondary) if target):
        formats.update(
            {
                "isc-dhcpd": isc_dhcpd(profile, secrets=secrets),
                "kea": kea(profile, secrets=secrets),
                "dnsmasq": dnsmasq(profile, secrets=secrets),
            }
        )
    return formats


def profile_for(client: BootClient, target: Target) -> BootProfile:
    """The DHCP view of a configured boot client, with its target's current IQN and CHAP."""
    secondary = None
    if client.secondary_address:
        secondary = BootTarget(client.secondary_address, target.iqn, client.secondary_port, client.lun)
    acl = target.acl(client.initiator)
    return BootProfile(
        name=client.name,
        initiator_iqn=client.initiator,
        primary=BootTarget(client.address, target.iqn, client.port, client.lun),
        secondary=secondary,
        mac=client.mac or None,
        firmware=client.firmware,
        chap=resolve_chap(acl.chap or target.chap, acl, target) if acl is not None else None,
    )


def check_all(config: Config) -> None:
    """Refuse a configuration in which a boot profile could no longer be rendered.

    A CHAP user name or a target IQN changed after the profile was made may push an option
    past 255 bytes; the change is refused rather than leaving a profile nobody can print.
    """
    for client in config.boot_clients.values():
        render_all(profile_for(client, config.targets[client.target]), secrets=True)
