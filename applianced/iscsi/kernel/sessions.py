"""Who is logged in to a target: LIO's session info, its session count, and the TCP table.

LIO shows in configfs, per ACL, only the newest session of an initiator
(``se_node_acl.nacl_sess``): an initiator with one session per path (MPIO) appears once in
``acls/<initiator>/info``. Two other kernel sources fill the gap: the target's count of
logged-in sessions (``fabric_statistics/iscsi_instance/sessions``) and the established
TCP connections on the target's portals, which also tell which portal each session came
in through. Everything is read directly from files (the TCP table from ``/proc/net``, not
through psutil, which would also walk every process's file descriptors to find owners that
kernel sockets do not have); this runs for every target each time a client reads the
``Sessions`` property, so it must stay cheap.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from applianced.iscsi.kernel import configfs
from applianced.iscsi.kernel.model import Connection, Session, TargetSessions

_SESSION_LINE = re.compile(r"ISID: 0x([0-9a-f ]+?)\s+TSIH: (\d+)\s+SessionType: (\w+)")
_STATE_LINE = re.compile(r"Session State: TARG_SESS_STATE_(\w+)")
_ADDRESS_LINE = re.compile(r"^\s+Address (\S+) ", re.MULTILINE)
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_ESTABLISHED = "01"


def parse_acl_info(target_iqn: str, initiator: str, text: str) -> Session | None:
    """The session in an ACL's ``info`` file, or None when the initiator is not logged in."""
    session = _SESSION_LINE.search(text)
    if session is None:
        return None
    state = _STATE_LINE.search(text)
    return Session(
        target_iqn=target_iqn,
        initiator=initiator,
        state=state.group(1) if state else "",
        addresses=tuple(_plain_address(a) for a in _ADDRESS_LINE.findall(text)),
        isid=session.group(1).replace(" ", ""),
        tsih=int(session.group(2)),
    )


def read_target_sessions(tpg_dir: Path, target_iqn: str, connections: Iterable[Connection]) -> TargetSessions:
    """The sessions of one target, given its TPG directory and the node's iSCSI connections."""
    portals = {_portal_endpoint(name) for name in _listdir(tpg_dir / "np")}
    mine = tuple(c for c in connections if _reaches(c, portals))
    sessions = []
    for initiator in sorted(_listdir(tpg_dir / "acls")):
        session = parse_acl_info(target_iqn, initiator, _read(tpg_dir / "acls" / initiator / "info"))
        if session is not None:
            used = tuple(sorted({c.portal for c in mine if c.source_address in session.addresses}))
            sessions.append(dataclasses.replace(session, portals=used))
    count = _read(tpg_dir.parent / "fabric_statistics" / "iscsi_instance" / "sessions").strip()
    return TargetSessions(tuple(sessions), int(count) if count.isdigit() else len(sessions), mine)


def established_connections(ports: Iterable[int], tables: Iterable[Path] = TCP_TABLES) -> list[Connection]:
    """Established TCP connections whose local port is one of ``ports`` (the portals')."""
    wanted = set(ports)
    found = []
    for table in tables:
        for line in _read(table).splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != TCP_ESTABLISHED:
                continue
            (local, local_port), (remote, remote_port) = _tcp_endpoint(fields[1]), _tcp_endpoint(fields[2])
            if local_port in wanted:
                found.append(Connection(remote, remote_port, _endpoint(local, local_port)))
    return found


def _tcp_endpoint(field: str) -> tuple[str, int]:
    """``0100007F:0CBC`` from /proc/net/tcp{,6}: the address is in 32-bit words of host order."""
    address, port = field.split(":")
    words = bytes.fromhex(address)
    raw = b"".join(words[i : i + 4][::-1] for i in range(0, len(words), 4)) if sys.byteorder == "little" else words
    return _plain_address(str(ipaddress.ip_address(raw))), int(port, 16)


def portal_ports(tpg_dirs: Iterable[Path]) -> set[int]:
    return {_portal_endpoint(name)[1] for tpg in tpg_dirs for name in _listdir(tpg / "np")}


def _reaches(connection: Connection, portals: set[tuple[str, int]]) -> bool:
    address, port = _portal_endpoint(connection.portal)
    return (address, port) in portals or any(p == port and ipaddress.ip_address(a).is_unspecified for a, p in portals)


def _portal_endpoint(name: str) -> tuple[str, int]:
    address, port = configfs.portal(name)
    return _plain_address(address), port


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _plain_address(address: str) -> str:
    """IPv4-mapped IPv6 addresses (a dual-stack listener's view of IPv4 peers) as IPv4."""
    try:
        parsed = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _read(path: Path) -> str:
    try:
        with open(path) as handle:
            return handle.read()
    except FileNotFoundError:
        return ""
