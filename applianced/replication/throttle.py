"""The bandwidth throttle of mirrors: a rate limit on each mirror's NBD traffic to its copy.

A mirror's throttle (Kbit/s, 0 = unlimited) limits everything the source sends to the
copy's export: the writes it replicates and its resyncs, as the reference's
BandwidthThrottle does. It is an HTB class per throttled mirror on the interface that
routes to the copy, with a u32 filter on the export's address and port; other traffic is
not classified and leaves at the interface's own pace. applianced owns the root qdisc
it makes (handle ``1a6c:``) on such an interface, and never replaces a root qdisc of
another kind that the administrator set (it logs that the throttle does not apply).

The rules are made again from the mirrors' settings whenever those change (a tune, a
mirror made, moved or deleted, a role swapped), with ``tc`` from iproute2: this happens
rarely, and ``tc`` knows the kernel's formats.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from applianced.blockdev import tools
from applianced.errors import KernelError

log = logging.getLogger(__name__)

HANDLE = "1a6c"
# Root qdiscs an interface has by default, which the throttle may replace.
DEFAULT_QDISCS = {"noqueue", "pfifo_fast", "fq_codel", "fq", "mq", "pfifo", "htb"}


@dataclass(frozen=True)
class Limit:
    """``kbit`` Kbit/s for the traffic to ``address``:``port`` (a copy's export)."""

    address: str
    port: int
    kbit: int


def apply(limits: Iterable[Limit]) -> None:
    """Make every interface's throttle match ``limits`` (the ones with a rate above 0)."""
    by_interface: dict[str, list[Limit]] = {}
    for limit in limits:
        if limit.kbit > 0:
            by_interface.setdefault(_interface_to(limit.address), []).append(limit)
    for interface in set(_ours()) | set(by_interface):
        wanted = sorted(by_interface.get(interface, []), key=lambda limit: (limit.address, limit.port))
        try:
            _apply_interface(interface, wanted)
        except KernelError as exc:
            log.error("the mirrors' throttle on %s could not be set: %s", interface, exc)


def _apply_interface(interface: str, limits: list[Limit]) -> None:
    root = _root_qdisc(interface)
    if root is not None and root["kind"] not in DEFAULT_QDISCS:
        log.warning(
            "%s has a root qdisc of its own (%s): the mirrors' throttle does not apply there", interface, root["kind"]
        )
        return
    if root is not None and root["kind"] == "htb" and root["handle"] != f"{HANDLE}:":
        log.warning("%s has an HTB root qdisc of another owner: the mirrors' throttle does not apply", interface)
        return
    # Made anew: a replaced HTB qdisc would keep the classes and filters it had.
    if root is not None and root["handle"] == f"{HANDLE}:":
        tools.run(["tc", "qdisc", "del", "dev", interface, "root"])
    if not limits:
        return
    # Unclassified traffic (everything but the exports) is not shaped: HTB's "default 0".
    tools.run(["tc", "qdisc", "add", "dev", interface, "root", "handle", f"{HANDLE}:", "htb", "default", "0"])
    for number, limit in enumerate(limits, 1):
        rate, classid = f"{limit.kbit}kbit", f"{HANDLE}:{number:x}"
        tc = ["tc", "class", "add", "dev", interface, "parent", f"{HANDLE}:", "classid", classid]
        tools.run([*tc, "htb", "rate", rate, "ceil", rate])
        family = "ip6" if ipaddress.ip_address(limit.address).version == 6 else "ip"
        protocol = "ipv6" if family == "ip6" else "ip"
        matches = ["match", family, "dst", limit.address, "match", family, "dport", str(limit.port), "0xffff"]
        tc = ["tc", "filter", "add", "dev", interface, "parent", f"{HANDLE}:", "protocol", protocol]
        tools.run([*tc, "prio", str(number), "u32", *matches, "flowid", classid])


def _interface_to(address: str) -> str:
    route = json.loads(tools.run(["ip", "-j", "route", "get", address]))
    return route[0]["dev"]


def _root_qdisc(interface: str) -> dict[str, str] | None:
    for qdisc in json.loads(tools.run(["tc", "-j", "qdisc", "show", "dev", interface]) or "[]"):
        if qdisc.get("root"):
            return {"kind": qdisc["kind"], "handle": qdisc.get("handle", "")}
    return None


def _ours() -> list[str]:
    """Interfaces whose root qdisc applianced made."""
    found = []
    for qdisc in json.loads(tools.run(["tc", "-j", "qdisc", "show"]) or "[]"):
        if qdisc.get("root") and qdisc.get("handle") == f"{HANDLE}:":
            found.append(qdisc["dev"])
    return found
