"""Per-target source allow-lists, enforced by nftables rules bound to the portals.

A target may name the sources allowed to reach it: IP networks or addresses (IPv4, IPv6),
MAC addresses (meaningful only for initiators on the node's own link, since routers
rewrite the source MAC) and DNS names, resolved whenever the rules are applied. LIO has
no notion of a source address, so the rules filter the TCP connections to the portals:
a portal whose targets have an allow-list admits only those sources, and everyone else
gets a TCP reset. A reset rather than a silent drop, so that a refused initiator (or
boot firmware) fails at once with "connection refused" instead of retrying a login for
minutes; the portal's existence is no secret worth that. Rules match every packet, not
only new connections, so a session from a source that is no longer listed is cut at once.

The rules can only be exact per target when every portal of a target serves targets with
the same list; ``check_portals`` refuses any configuration where that does not hold.

applianced owns the table ``inet applianced`` and replaces it in one nft transaction
(add, delete, define again), so a half-applied rule set never exists and nothing else on
the node is touched. The table is read back as JSON first: when it already holds the
wanted rules nothing is written. With no allow-list at all the table is removed, so nodes
that do not use the feature never need nftables.

A portal can also be *held* while a failover's planned switchover hands its virtual
address to the peer: the address stays here, its sessions see silence (nothing in,
nothing out: the initiator notices no close and reconnects at once when the new active
node resets the connection), and a new connection is refused with an ICMP port
unreachable (the initiator retries in seconds instead of backing off on unanswered
SYNs). An ICMP error rather than a TCP reset, because the reset would leave through the
output chain, which drops every TCP packet the held portal sends. Held portals live in a
table of their own, ``inet applianced-held``, written in one batch without a read: the
hold is on the clients' stall, where the main table's read and rewrite (with 64
replicated volumes' export rules in it) and a wait for the engine's commits cost 0.7-4 s
under emulation. A drop in any table is final, so the hold needs no ordering with the
allow-lists; its chains run first anyway (priority -10) and spare the packets the rest.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from applianced.errors import InvalidArgument, KernelError
from applianced.state import Config, Portal, Target

log = logging.getLogger(__name__)

LIBNFTABLES = "libnftables.so.1"
# From <nftables/libnftables.h>.
NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4
FAMILY = "inet"
TABLE = "applianced"
CHAIN = "portals"
HOLD_TABLE = "applianced-held"
HOLD_CHAIN = "held"
HOLD_OUTPUT_CHAIN = "held-out"
HOLD_PRIORITY = -10
MAX_SOURCES = 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# A JSON object of nft's schema: a table, a chain or a rule, as ``nft -j list`` prints it.
NftObject = dict[str, Any]
Ruleset = tuple[NftObject, ...]
# Name -> addresses; a name that did not resolve maps to nothing (it admits no one).
Resolved = Mapping[str, frozenset[str]]

_MAC = re.compile(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}")
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_UNKNOWN = "{text!r} is not an IP address or network, a MAC address or a DNS name"


class Firewall(Protocol):
    """What the engine needs from the firewall; ``NftFirewall`` is the real one."""

    def apply(self, ruleset: Ruleset) -> bool:
        """Make the node's table hold ``ruleset``; True when something was changed."""
        ...

    def hold(self, ruleset: Ruleset) -> None:
        """Make the hold table ``ruleset`` (``held_ruleset``), without reading it first."""
        ...


# -- allow-list entries --------------------------------------------------------------------


def normalize_sources(sources: Iterable[str]) -> tuple[str, ...]:
    """Canonical entries, duplicates dropped, in a stable order (addresses, MACs, names)."""
    entries = {normalize_source(text) for text in sources}
    if len(entries) > MAX_SOURCES:
        raise InvalidArgument(f"an allow-list holds at most {MAX_SOURCES} sources")
    return tuple(sorted(entries, key=_sort_key))


def normalize_source(text: str) -> str:
    """``10.0.0.0/24``, ``10.0.0.7``, ``fd00::/64``, ``52:54:00:12:34:56`` or a DNS name."""
    entry = text.strip().lower()
    if _MAC.fullmatch(entry):
        mac = entry.replace("-", ":")
        if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
            raise InvalidArgument(f"{text!r} is a multicast or empty MAC address, never a sender's")
        return mac
    try:
        # A zone ("fe80::1%eth0") names an interface of this node, not a source.
        interface = ipaddress.ip_interface(entry) if "%" not in entry else None
    except ValueError:
        interface = None
    if interface is None:
        # No top-level domain is all digits, so "10.0.0" or "10.0.0.300" is a bad address.
        if "/" in entry or ":" in entry or entry.rsplit(".", 1)[-1].isdigit():
            raise InvalidArgument(_UNKNOWN.format(text=text))
        return _normalize_name(text, entry)
    network = interface.network
    if "/" in entry and interface.ip != network.network_address:
        raise InvalidArgument(f"{text!r} has host bits set; the network is {network}")
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.ipv4_mapped:
        raise InvalidArgument(f"{text!r} is IPv4-mapped: IPv4 initiators connect over IPv4, so list the IPv4 form")
    return str(network.network_address) if network.num_addresses == 1 else str(network)


def _normalize_name(text: str, entry: str) -> str:
    name = entry.removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(_UNKNOWN.format(text=text))
    return name


def kind(entry: str) -> str:
    """``network``, ``mac`` or ``name`` for a normalised entry."""
    if _MAC.fullmatch(entry):
        return "mac"
    try:
        ipaddress.ip_network(entry)
    except ValueError:
        return "name"
    return "network"


def _sort_key(entry: str) -> tuple[Any, ...]:
    what = kind(entry)
    if what == "network":
        network = ipaddress.ip_network(entry)
        return (0, network.version, network.network_address.packed, network.prefixlen)
    return (1 if what == "mac" else 2, entry)


def names_of(config: Config) -> set[str]:
    """Every DNS name any target's allow-list holds."""
    return {e for target in config.targets.values() for e in target.allowed_sources if kind(e) == "name"}


def resolve_name(name: str) -> frozenset[str]:
    """The addresses ``name`` has now (the node's resolver: /etc/hosts, DNS); OSError if none."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    # A link-local IPv6 answer carries its zone ("fe80::1%eth0"); the rule matches the address.
    return frozenset(info[4][0].split("%")[0] for info in infos)


def resolve(names: Iterable[str], resolver: Callable[[str], Iterable[str]], strict: bool) -> dict[str, frozenset[str]]:
    """Resolve every name; one that fails is InvalidArgument when ``strict``, else admits nothing."""
    resolved = {}
    for name in sorted(names):
        try:
            addresses = frozenset(str(ipaddress.ip_address(a)) for a in resolver(name))
            if not addresses:
                raise OSError("no address")
        except (OSError, ValueError) as exc:
            if strict:
                raise InvalidArgument(f"DNS name {name} does not resolve: {exc}") from None
            log.warning("allowed source %s does not resolve (%s); it admits no one until it does", name, exc)
            addresses = frozenset()
        resolved[name] = addresses
    return resolved


def admits(sources: Sequence[str], resolved: Resolved, address: str) -> bool:
    """Whether the IP entries of ``sources`` (or the addresses of its names) cover ``address``.

    MAC entries cannot be judged from an address; callers treat them as not admitting.
    """
    if not sources:
        return True
    ip = ipaddress.ip_address(address)
    return any(ip in network for network in _networks(sources, resolved))


def _networks(sources: Iterable[str], resolved: Resolved) -> list[IPNetwork]:
    found: list[IPNetwork] = []
    for entry in sources:
        what = kind(entry)
        if what == "network":
            found.append(ipaddress.ip_network(entry))
        elif what == "name":
            found += [ipaddress.ip_network(a) for a in resolved.get(entry, ())]
    return found


# -- the rule set ----------------------------------------------------------------------------


def check_portals(config: Config) -> None:
    """Refuse a configuration whose allow-lists cannot be enforced exactly per target.

    Rules bind to portals, so all targets served by one portal must share one list.
    """
    for portal in config.portals:
        groups: dict[tuple[str, ...], list[str]] = {}
        for target in _served(config, portal):
            groups.setdefault(target.allowed_sources, []).append(target.name)
        if len(groups) > 1:
            described = "; ".join(
                f"{', '.join(names)} admit{'s' if len(names) == 1 else ''} {_summary(sources)}"
                for sources, names in sorted(groups.items())
            )
            scope = "every target" if not portal.targets else "targets " + ", ".join(portal.targets)
            raise InvalidArgument(
                f"portal {portal.key} serves {scope}, which would have different allow-lists ({described}); "
                "a portal admits one list of sources, so give a restricted target portals of its own "
                "(portal create ADDRESS --target NAME)"
            )


def _served(config: Config, portal: Portal) -> list[Target]:
    # By name, not by asking every target: a node with a portal per target stays linear.
    if not portal.targets:
        return list(config.targets.values())
    return [config.targets[name] for name in portal.targets if name in config.targets]


def _summary(sources: Sequence[str]) -> str:
    if not sources:
        return "any source"
    return ", ".join(sources[:3]) + (f" and {len(sources) - 3} more" if len(sources) > 3 else "")


@dataclasses.dataclass(frozen=True)
class PortalFilter:
    """The sources one portal admits (networks collapsed, names already resolved).

    ``what`` names the listener in the rule's comment: an iSCSI portal, or the NBD export
    of a replicated volume, which admits only the peer node.
    """

    address: str
    port: int
    networks: tuple[IPNetwork, ...]
    macs: tuple[str, ...]
    what: str = "portal"

    @property
    def key(self) -> str:
        return Portal(self.address, self.port).key


def filters(config: Config, resolved: Resolved) -> dict[str, PortalFilter]:
    """One filter per portal whose targets have an allow-list; other portals stay open."""
    found = {}
    for portal in config.portals:
        sources = next((t.allowed_sources for t in _served(config, portal) if t.allowed_sources), ())
        if not sources:
            continue
        networks = _networks(sources, resolved)
        collapsed = [
            *ipaddress.collapse_addresses(n for n in networks if n.version == 4),
            *ipaddress.collapse_addresses(n for n in networks if n.version == 6),
        ]
        macs = tuple(e for e in sources if kind(e) == "mac")
        found[portal.key] = PortalFilter(portal.address, portal.port, tuple(collapsed), macs)
    return found


def ruleset(portal_filters: Iterable[PortalFilter]) -> Ruleset:
    """The table, its chain and the rules, in the form ``nft -j list table`` prints them.

    Portals on a specific address come first, then 0.0.0.0 (IPv4 only), then :: (LIO's
    :: socket is dual-stack, so it also takes IPv4): the kernel too gives a connection to
    the most specific listener.
    """
    ordered = sorted(portal_filters, key=lambda f: (_wildcard_rank(f.address), f.key))
    if not ordered:
        return ()
    table: NftObject = {"table": {"family": FAMILY, "name": TABLE}}
    chain: NftObject = {
        "chain": {
            "family": FAMILY,
            "table": TABLE,
            "name": CHAIN,
            "type": "filter",
            "hook": "input",
            "prio": 0,
            "policy": "accept",
        }
    }
    return (table, chain, *(rule for f in ordered for rule in _portal_rules(f)))


def held_ruleset(portals: Iterable[tuple[str, int]]) -> Ruleset:
    """The hold table for these (address, port) pairs, as ``ruleset`` renders its table:
    a connection's first SYN refused with an ICMP port unreachable, every other packet to
    the portal dropped, and every packet from it (see the module's docstring)."""
    held = sorted({Portal(address, port) for address, port in portals}, key=lambda p: p.key)
    for portal in held:
        if ipaddress.ip_address(portal.address).is_unspecified:
            raise InvalidArgument(f"only a portal's own address can be held, not {portal.address}")
    if not held:
        return ()
    table: NftObject = {"table": {"family": FAMILY, "name": HOLD_TABLE}}
    chain = {"family": FAMILY, "table": HOLD_TABLE, "type": "filter", "prio": HOLD_PRIORITY, "policy": "accept"}
    incoming: NftObject = {"chain": {**chain, "name": HOLD_CHAIN, "hook": "input"}}
    outgoing: NftObject = {"chain": {**chain, "name": HOLD_OUTPUT_CHAIN, "hook": "output"}}
    # A connection's first SYN (SYN without ACK, whatever its ECN flags), as nft lists it.
    syn = _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "syn")
    refuse = {"reject": {"type": "icmpx", "expr": "port-unreachable"}}
    rules, sent = [], []
    for portal in held:
        label = f"portal held for a switchover {portal.key}"
        to_portal = _portal_match(portal.address, portal.port)
        from_portal = _portal_match(portal.address, portal.port, "saddr", "sport")
        rules += _commented(
            label,
            [
                _rule(HOLD_CHAIN, [*to_portal, syn, refuse], HOLD_TABLE),
                _rule(HOLD_CHAIN, [*to_portal, {"drop": None}], HOLD_TABLE),
            ],
        )
        sent += _commented(label, [_rule(HOLD_OUTPUT_CHAIN, [*from_portal, {"drop": None}], HOLD_TABLE)])
    return (table, incoming, outgoing, *rules, *sent)


def _wildcard_rank(address: str) -> int:
    ip = ipaddress.ip_address(address)
    return 0 if not ip.is_unspecified else 1 if ip.version == 4 else 2


def _portal_match(address: str, port: int, to: str = "daddr", at: str = "dport") -> list[dict[str, Any]]:
    """The packets to the portal (or, with ``saddr`` and ``sport``, from it)."""
    ip = ipaddress.ip_address(address)
    matches = [_match({"payload": {"protocol": "tcp", "field": at}}, port)]
    if not ip.is_unspecified:
        protocol = "ip6" if ip.version == 6 else "ip"
        matches.insert(0, _match({"payload": {"protocol": protocol, "field": to}}, str(ip)))
    elif ip.version == 4:
        # Not "meta nfproto ipv4": nft lists that rule without it, and it would never
        # compare equal when read back. "ip version 4" is listed as written.
        matches.insert(0, _match({"payload": {"protocol": "ip", "field": "version"}}, 4))
    return matches


def _portal_rules(portal: PortalFilter) -> list[NftObject]:
    ip = ipaddress.ip_address(portal.address)
    to_portal = _portal_match(portal.address, portal.port)
    families = (4, 6) if ip.is_unspecified and ip.version == 6 else (ip.version,)
    rules = []
    for version in families:
        elements = [_element(n) for n in portal.networks if n.version == version]
        if elements:
            protocol = "ip6" if version == 6 else "ip"
            source = _match({"payload": {"protocol": protocol, "field": "saddr"}}, _set(elements))
            rules.append([*to_portal, source, {"accept": None}])
    if portal.macs:
        source = _match({"payload": {"protocol": "ether", "field": "saddr"}}, _set(list(portal.macs)))
        rules.append([*to_portal, source, {"accept": None}])
    refuse: dict[str, Any] = {"reject": {"type": "tcp reset"}}
    rules.append([*to_portal, refuse])
    return _commented(f"{portal.what} {portal.key}", [_rule(CHAIN, expr) for expr in rules])


def _rule(chain: str, expr: list[dict[str, Any]], table: str = TABLE) -> NftObject:
    return {"rule": {"family": FAMILY, "table": table, "chain": chain, "expr": expr}}


def _commented(label: str, objects: list[NftObject]) -> list[NftObject]:
    # The comment names the portal in `nft list ruleset`, for people reading it.
    objects[-1]["rule"]["comment"] = f"applianced {label}"
    return objects


def _match(left: dict[str, Any], right: Any) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": right}}


def _element(network: IPNetwork) -> Any:
    if network.num_addresses == 1:
        return str(network.network_address)
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _set(elements: list[Any]) -> Any:
    # nft prints a one-element anonymous set as the bare value; render it the same way.
    return elements[0] if len(elements) == 1 else {"set": elements}


def transaction(wanted: Ruleset, name: str = TABLE) -> dict[str, Any]:
    """One atomic nft batch: create the table ``name`` if missing, delete it, define it again.

    The first two steps make the batch valid whether or not the table exists; with an
    empty ``wanted`` it only removes the table.
    """
    table = {"table": {"family": FAMILY, "name": name}}
    commands: list[dict[str, Any]] = [{"add": table}, {"delete": table}]
    commands += [{"add": obj} for obj in wanted]
    return {"nftables": commands}


# -- nft ---------------------------------------------------------------------------------


class NftFirewall:
    """The node's ``inet applianced`` table, read and replaced, and its hold table,
    replaced without a read, through libnftables (the library behind the nft command) in
    this process: a batch takes milliseconds where starting nft took 150 ms under
    emulation (bench/portal_hold.py), on the clients' stall of a switchover."""

    def __init__(self, library: str = LIBNFTABLES) -> None:
        self.library = library
        self._nft: Libnftables | None = None
        self._lock = threading.Lock()

    def observe(self) -> Ruleset:
        """The table as it is now, without handles; empty if it does not exist."""
        try:
            listed = self._run(f"list table {FAMILY} {TABLE}")
        except FileNotFoundError:
            return ()
        except KernelError as exc:
            if "No such file or directory" in str(exc):
                return ()
            raise KernelError(f"cannot read the firewall table: {exc}") from None
        return tuple(_without_handles(obj) for obj in json.loads(listed)["nftables"] if "metainfo" not in obj)

    def apply(self, ruleset: Ruleset) -> bool:
        if self.observe() == ruleset:
            return False
        self._write(transaction(ruleset))
        return True

    def hold(self, ruleset: Ruleset) -> None:
        # Without nftables nothing was ever held: there is nothing to release.
        self._write(transaction(ruleset, HOLD_TABLE), missing_ok=not ruleset)

    def _write(self, batch: dict[str, Any], missing_ok: bool = False) -> None:
        try:
            self._run(json.dumps(batch))
        except FileNotFoundError:
            if missing_ok:
                return
            raise KernelError("libnftables is missing: install nftables to use allow-lists") from None
        except KernelError as exc:
            raise KernelError(f"nft refused the rule set: {exc}") from None

    def _run(self, command: str) -> str:
        with self._lock:  # a libnftables context is not thread-safe
            if self._nft is None:
                self._nft = Libnftables(self.library)
            return self._nft.run(command)


class Libnftables:
    """One libnftables context through ctypes, in JSON: the commands nft takes on its
    command line or in a file (a JSON batch is recognised as such), their output as nft
    -j prints it. FileNotFoundError when the library is not installed."""

    def __init__(self, name: str) -> None:
        try:
            library = ctypes.CDLL(name)
        except OSError as exc:
            raise FileNotFoundError(f"{name}: {exc}") from None
        library.nft_ctx_new.restype = ctypes.c_void_p
        library.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for function in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(library, function).argtypes = [ctypes.c_void_p]
        library.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        library.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for function in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(library, function).argtypes = [ctypes.c_void_p]
            getattr(library, function).restype = ctypes.c_char_p
        context = library.nft_ctx_new(NFT_CTX_DEFAULT)
        if not context:
            raise KernelError("libnftables could not make a context")
        library.nft_ctx_buffer_output(context)
        library.nft_ctx_buffer_error(context)
        library.nft_ctx_output_set_flags(context, NFT_CTX_OUTPUT_JSON)
        self.library, self.context = library, context

    def run(self, command: str) -> str:
        """The command's output; KernelError with nft's message if it fails."""
        failed = self.library.nft_run_cmd_from_buffer(self.context, command.encode())
        # Reading a buffer empties it for the next command.
        output = (self.library.nft_ctx_get_output_buffer(self.context) or b"").decode()
        error = (self.library.nft_ctx_get_error_buffer(self.context) or b"").decode().strip()
        if failed:
            raise KernelError(error or "nft failed, without a message")
        return output


def _without_handles(obj: NftObject) -> NftObject:
    return {name: {k: v for k, v in body.items() if k != "handle"} for name, body in obj.items()}
