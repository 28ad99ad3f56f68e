"""Adversarial arguments of the right D-Bus signature for every documented method.

``METHODS`` maps each method (``Interface.Member``) to its strategy: a function of the
``World`` that returns a hypothesis strategy of the method's argument list. Values that
must exist as files first (forged disk files) are written by the strategy through the
world, inside the example, so that they are part of the snapshot taken before the call.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dbus_fast import Variant
from hypothesis import strategies as st

from applianced.constants import BOOT_PROFILES_PATH, DISKS_PATH, PORTALS_PATH, ROOT_PATH, TARGETS_PATH
from tests.fuzz.world import MAGIC, MIB, TRAILER_SIZE, World, trailer
from tests.support.daemon import INITIATOR

# -- plain values -------------------------------------------------------------------------------

U16 = [0, 1, 3260, 65535]
U32 = [0, 1, 254, 255, 256, 2**31, 2**32 - 1]
SIZES = [
    0,
    1,
    511,
    512,
    MIB - 512,
    MIB,
    MIB + 1,
    MIB + 512,
    2 * MIB,
    2**40,
    2**62,
    2**63 - TRAILER_SIZE - 512,
    2**63 - TRAILER_SIZE,
    2**63 - 1,
    2**63,
    2**64 - TRAILER_SIZE,
    2**64 - 1,
]
# Growths of a 1 MiB or 2 MiB disk, around a trailer's size.
GROWTHS = [512, 1024, TRAILER_SIZE - 512, TRAILER_SIZE, TRAILER_SIZE + 512, MIB]

# No NUL (D-Bus strings cannot carry one) and no lone surrogates (not UTF-8).
text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=40)
NASTY_STRINGS = [
    "",
    " ",
    "\n",
    "d1\n",
    "t1\n",
    "x\n",
    "\t",
    "\x1b[31m",
    "\x7f",
    "a,b",
    "a b",
    "ä",
    "名前",
    "\u202e",
    "²",
    "٣",
    "-",
    ".",
    "..",
    "a/b",
    "../../etc/passwd",
    "/etc/passwd",
    "/../../etc/passwd",
    "/dev/zero",
    "/dev/null",
    "/proc/self/mem",
    "a" * 64,
    "a" * 65,
    "a" * 256,
    "x" * 5000,
    "x" * 200_000,
    "%s%n{0}",
    "'\"",
    "null",
]


def mostly(usual: st.SearchStrategy[Any], adversarial: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a plausible value, so that calls get past the first check and reach the deep ones."""
    return st.one_of(usual, usual, usual, adversarial)


def strings(*extra: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from([*extra, *NASTY_STRINGS]), text)


def descriptions() -> st.SearchStrategy[str]:
    return mostly(st.sampled_from(["", "mail store", 'Ärger: 10 € / "quoted"']), strings("x" * 256, "x" * 257))


def names(*existing: str) -> st.SearchStrategy[str]:
    """Entity names: new valid ones, existing ones, and everything a name must not be."""
    return mostly(st.sampled_from(["new1", "N.e_w-2", "9", "a" * 64, *existing]), strings())


def integers(edges: list[int], bits: int) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(edges), st.integers(0, 2**bits - 1))


def macs() -> st.SearchStrategy[str]:
    return mostly(
        st.sampled_from(["00:15:17:0b:0e:f6", "00-15-17-0B-0E-F6"]),
        strings("ff:ff:ff:ff:ff:ff", "00:15:17:0b:0e", "00:15:17:0b:0e:g6", "00:15:17:0b:0e:f6\n"),
    )


def _another_host(text: str) -> bool:
    """Whether ``text`` names a host other than this one, which a peer link would send to."""
    try:
        return not ipaddress.ip_address(text.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def peer_addresses() -> st.SearchStrategy[str]:
    """Loopback peers and what is no address at all: never another host (the network rule),
    since a pair the fuzzer makes starts sending handshakes to its peer at once."""
    return mostly(
        st.sampled_from(["127.0.0.2", "::1"]), strings("fe80::1", "127.0.0.2\n", "[::1]", "localhost", "127.1")
    ).filter(lambda address: not _another_host(address))


def interfaces() -> st.SearchStrategy[str]:
    """Loopback, and what names no interface: never one of the machine's NICs (the network rule)."""
    nic = Path("/sys/class/net")
    real = {entry.name for entry in nic.iterdir()} - {"lo"} if nic.exists() else set()
    return mostly(st.just("lo"), strings("lo0", "nope0", "a" * 16, "../lo", "lo/x", ".")).filter(
        lambda name: name not in real
    )


def virtual_addresses() -> st.SearchStrategy[str]:
    return mostly(
        st.sampled_from(["192.0.2.100/24", "2001:db8::100/64"]),
        strings("192.0.2.100", "127.0.0.5/8", "fe80::5/64", "224.0.0.5/24", "192.0.2.300/24", "::/0"),
    )


def ping_nodes() -> st.SearchStrategy[str]:
    """Loopback only (a ping node is pinged at every check): never another host."""
    return mostly(st.sampled_from(["127.0.0.1", "::1"]), strings("localhost", "127.1", "::1\n")).filter(
        lambda address: not _another_host(address)
    )


def pair_keys() -> st.SearchStrategy[bytes]:
    return mostly(st.binary(min_size=32, max_size=64), st.one_of(st.binary(max_size=31), st.binary(max_size=4096)))


def portals() -> st.SearchStrategy[str]:
    usual = st.sampled_from(["192.0.2.10", "192.0.2.10:3261", "[2001:db8::1]:3260", "2001:db8::2"])
    return mostly(
        usual,
        strings(
            "127.0.0.1",
            "127.0.0.1:3260",
            "127.0.0.1:3261",
            "192.0.2.10:²",
            "192.0.2.10:٣٢٦٠",
            "127.0.0.1:²",
            "127.0.0.1:٣٢٦٠",
            "127.0.0.1:+3260",
            "127.0.0.1: 3260",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:99999999999999999999",
            "[::1]:3260",
            "[::1]",
            "[::1]:²",
            "[::1",
            "::1",
            "0.0.0.0",
            "192.0.2.10:3260",
            "fe80::1%lo:3260",
            "256.0.0.1",
        ),
    )


def iqns() -> st.SearchStrategy[str]:
    usual = st.sampled_from(
        [INITIATOR, "iqn.2026-11.com.example:new", "eui.0123456789abcdef", "iqn.2026-11.com.example"]
    )
    return mostly(
        usual,
        strings(
            INITIATOR,
            INITIATOR.upper(),
            INITIATOR + "\n",
            " " + INITIATOR,
            "iqn.2003-01.org.linux-iscsi.applianced:t1",
            "iqn.2026-13.com.example:x",
            "iqn.2026-11.com.example:" + "a" * 300,
            "eui.0123456789abcdef",
            "naa.0123456789abcdef",
            "naa.0123456789ABCDEF0123456789ABCDEF",
            "iqn.",
        ),
    )


def secrets() -> st.SearchStrategy[str]:
    return mostly(
        st.sampled_from(["alice-secret1", "bob-secret-22", "x" * 12, "y" * 16]),
        strings("x" * 11, "x" * 17, "with space12", "ümlaut-secret", "secret\nsecret"),
    )


def luns() -> st.SearchStrategy[int]:
    return mostly(st.sampled_from([0, 1, 2, 254]), integers(U32, 32))


# -- file paths -----------------------------------------------------------------------------------


def file_paths(world: World, *existing: str) -> st.SearchStrategy[str]:
    """Paths a call may name: prepared files of every kind, traversal, devices, long names."""
    f = world.files
    return mostly(
        st.sampled_from([*existing, f"{f}/new.img", f"{f}/dir/new.img", f"{f}/spare.img", f"{f}/{'a' * 255}"]),
        st.sampled_from(
            [
                f"{f}/fifo",
                f"{f}/dir",
                f"{f}/empty",
                f"{f}/plain.img",
                f"{f}/tc.img",
                f"{f}/spare.img",
                f"{f}/link",
                f"{f}/dangling",
                f"{f}/new.img",
                f"{f}/new.img\n",
                f"{f}/",
                f"{f}/./new.img",
                f"{f}/dir/../new.img",
                f"{f}/nodir/new.img",
                f"{f}/fifo/new.img",
                f"{f}/{'a' * 255}",
                f"{f}/{'a' * 256}",
                f"{f}/{'ä' * 128}",
                f"{f}/{'a' * 200}/" * 21 + "x",
                f"{f}/a,b.img",
                f"{f}/a\tb.img",
                f"{f}/\x1b.img",
                "relative.img",
                f"{f}/../../../../etc/passwd",
                str(world.base / "d1.img"),
                str(world.disks_dir / "d2.img"),
                "/",
                "/proc/self/mem",
            ]
        )
        | strings(),
    )


@st.composite
def forged_disk_files(draw: st.DrawFn, world: World) -> str:
    """A disk file in the prepared directory whose last 4 KiB are a real or forged trailer."""
    data_size = draw(mostly(st.sampled_from([MIB, 2 * MIB]), st.sampled_from([0, 512, MIB + 1, MIB - 512])))
    fields: dict[str, Any] = {
        "name": draw(mostly(st.sampled_from(["imp1", "d1", "spare", "a" * 64]), strings())),
        "serial": draw(
            mostly(st.just(str(uuid.UUID(int=draw(st.integers(10, 20))))), st.sampled_from(["", "x" * 254, "a b", "é"]))
        ),
        "size": data_size,
        "version": 1,
    }
    kind = draw(
        mostly(
            st.just("valid"), st.sampled_from(["field", "field", "size", "nested", "long", "magic", "garbage", "short"])
        )
    )
    if kind == "size":
        # Sizes at and beyond off_t's limit, which ImportDisk once accepted (issue 8).
        fields["size"] = draw(st.sampled_from([2**63 - 1, 2**63, 2**63 - TRAILER_SIZE - 512, 2**64]))
    if kind == "field":
        key = draw(st.sampled_from(sorted(fields)))
        extremes = st.sampled_from([2**63 - 1, 2**63, 2**63 - TRAILER_SIZE - 512, 2**64, -1, 0, "1048576", 1048576.0])
        fields[key] = draw(mostly(extremes, json_values()) if key in ("size", "version") else json_values())
    if kind == "nested":
        fields["name"] = {"a": json.loads("[" * 500 + "]" * 500)}
    end = trailer(**fields)
    if kind == "long":
        end = MAGIC + json.dumps({**fields, "pad": "x" * TRAILER_SIZE}).encode()
    elif kind == "magic":
        end = b"APPLIANCED-DISK" + end[len(MAGIC) :]
    elif kind == "garbage":
        end = MAGIC + draw(st.binary(min_size=0, max_size=64)).ljust(TRAILER_SIZE - len(MAGIC), b"\0")
    elif kind == "short":
        end = end[: draw(st.integers(0, TRAILER_SIZE - 1))]
    return world.forge(data_size, end)


# -- options (a{sv}) --------------------------------------------------------------------------------

SIGNATURE_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "s": strings(),
    "b": st.booleans(),
    "u": integers(U32, 32),
    "q": integers(U16, 16),
    "t": integers(SIZES, 64),
    "i": st.integers(-(2**31), 2**31 - 1),
    "x": st.integers(-(2**63), 2**63 - 1),
    "y": st.integers(0, 255),
    "d": st.floats(allow_nan=True),
    "o": st.sampled_from([ROOT_PATH, f"{DISKS_PATH}/d1", "/"]),
    "as": st.lists(strings(), max_size=3),
    "ao": st.lists(st.sampled_from([f"{TARGETS_PATH}/t1", "/"]), max_size=3),
    "a{sv}": st.just({"x": Variant("s", "y")}),
    "ay": st.binary(max_size=8),
    "v": st.just(Variant("s", "inner")),
}


def variants_of_another_type(signature: str) -> st.SearchStrategy[Variant]:
    others = sorted(s for s in SIGNATURE_VALUES if s != signature)
    return st.sampled_from(others).flatmap(lambda s: SIGNATURE_VALUES[s].map(lambda v: Variant(s, v)))


def options(known: dict[str, tuple[str, st.SearchStrategy[Any]]]) -> st.SearchStrategy[dict[str, Variant]]:
    """Known keys with values of their type (often extreme), of another type, and unknown keys."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Variant]:
        result: dict[str, Variant] = {}
        for key in draw(st.lists(st.sampled_from(sorted(known)), unique=True)) if known else []:
            signature, values = known[key]
            if draw(st.integers(0, 5)) == 0:
                result[key] = draw(variants_of_another_type(signature))
            else:
                result[key] = Variant(signature, draw(values))
        if draw(st.integers(0, 7)) == 0:
            key = draw(st.sampled_from(["colour", "", "Force", "force\n", "path ", "x" * 300]))
            result[key] = draw(
                st.sampled_from(sorted(SIGNATURE_VALUES)).flatmap(
                    lambda s: SIGNATURE_VALUES[s].map(lambda v: Variant(s, v))
                )
            )
        return result

    return build()


FORCE = {"force": ("b", st.booleans())}


def chap_credentials() -> st.SearchStrategy[dict[str, Variant]]:
    return options(
        {
            "user": ("s", strings("alice", INITIATOR, "a" * 128, "a" * 129)),
            "secret": ("s", secrets()),
            "mutual_user": ("s", strings("target", "a" * 129)),
            "mutual_secret": ("s", secrets()),
        }
    )


# -- object paths -----------------------------------------------------------------------------------


def object_paths(world: World, collection: str, *names_: str) -> st.SearchStrategy[str]:
    """Paths of existing objects in a collection, of missing ones, and of other kinds."""
    live = [p for p in world.objects() if p.startswith(collection + "/")]
    others = [
        ROOT_PATH,
        "/",
        f"{collection}/missing",
        f"{collection}/d1_0a",
        f"{DISKS_PATH}/d1",
        f"{TARGETS_PATH}/t1",
        f"{TARGETS_PATH}/t1/luns/0",
        f"{PORTALS_PATH}/127_2e0_2e0_2e1_3a3260",
        f"{BOOT_PROFILES_PATH}/pc1",
        *(f"{collection}/{n}" for n in names_),
    ]
    return st.sampled_from(sorted(set(live)) + others)


# -- forged documents ---------------------------------------------------------------------------------

# Placeholders for nesting too deep to build as Python values: "[" or "{" and a depth.
DEEP = "\0deep:"
DEPTHS = (64, 1000, 100_000)


def json_values() -> st.SearchStrategy[Any]:
    """JSON values of every type, extreme ones, and (as a placeholder) very deep nesting."""
    return st.one_of(
        st.sampled_from(
            [
                None,
                True,
                False,
                0,
                -1,
                1,
                2**31,
                2**63 - 1,
                2**63,
                2**64,
                -(2**63) - 1,
                10**400,
                1.5,
                1e308,
                "",
                "x",
                "x\n",
                "²",
                "../../etc/passwd",
                [],
                {},
                [1],
                [[]],
                {"a": 1},
                ["x"],
                [None],
            ]
        ),
        st.sampled_from([f"{DEEP}{kind}{depth}" for kind in "[{" for depth in DEPTHS]),
        text,
    )


MAX_DOCUMENT = 4 * MIB
SWAPS = [[], {}, None, "1", 1, True, 1.5]


def _locations(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _locations(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _locations(item, (*path, index))
    return found


def _render(document: Any) -> str:
    rendered = json.dumps(document)
    for depth in DEPTHS:
        rendered = rendered.replace(json.dumps(f"{DEEP}[{depth}"), "[" * depth + "]" * depth)
        rendered = rendered.replace(json.dumps(f"{DEEP}{{{depth}"), '{"a": ' * depth + "1" + "}" * depth)
    return rendered


@st.composite
def forged_documents(draw: st.DrawFn, original: Any) -> str:
    """A JSON document derived from ``original`` by a few type swaps, deletions and copies."""
    document = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        location = draw(st.sampled_from(_locations(document)))
        if not location:
            document = draw(st.sampled_from([[], None, "x", 1, [document], {"a": document}]) | json_values())
            continue
        *parents, last = location
        parent = document
        for step in parents:
            parent = parent[step]
        operation = draw(st.sampled_from(["swap", "swap", "replace", "replace", "delete", "duplicate", "huge", "add"]))
        if operation == "swap":
            # A value of another JSON type than the one the field has.
            parent[last] = draw(st.sampled_from([v for v in SWAPS if type(v) is not type(parent[last])]))
        elif operation == "replace":
            parent[last] = draw(json_values())
        elif operation == "delete":
            del parent[last]
        elif operation == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        elif operation == "huge":
            # Many copies, within what one D-Bus message carries (a few MiB per document).
            copies = min(draw(st.sampled_from([2, 300, 5000])), MAX_DOCUMENT // (len(_render(parent[last])) + 2))
            parent[last] = [copy.deepcopy(parent[last]) for _ in range(max(copies, 1))]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["unknown", "", "x" * 300]))] = draw(json_values())
    rendered = _render(document)[:MAX_DOCUMENT]
    ending = draw(st.sampled_from(["", "", "", "", " garbage", "}", "bom", "cut"]))
    if ending == "bom":
        return "\ufeff" + rendered
    if ending == "cut":
        return rendered[: len(rendered) // 2]
    return rendered + ending


def export_documents(world: World) -> st.SearchStrategy[str]:
    baseline = json.loads(world.baseline)
    return st.one_of(
        st.just(world.baseline),
        forged_documents(baseline),
        st.sampled_from(
            ["", "{}", "[]", "null", "1", '"x"', "{", "[" * 100_000, '{"format": "applianced-configuration"}']
        ),
        strings(),
    )


def targetcli_document(world: World) -> dict[str, Any]:
    """A saveconfig.json that imports: one fileio backstore, one target, a LUN, an ACL, a portal."""
    return {
        "storage_objects": [
            {
                "plugin": "fileio",
                "name": "tc1",
                "dev": str(world.files / "tc.img"),
                "size": MIB,
                "wwn": str(uuid.UUID(int=9)),
                "write_back": False,
            }
        ],
        "targets": [
            {
                "fabric": "iscsi",
                "wwn": "iqn.2003-01.org.example:tc",
                "tpgs": [
                    {
                        "enable": True,
                        "attributes": {"authentication": 0, "generate_node_acls": 0},
                        "parameters": {"TargetAlias": "LIO Target"},
                        "node_acls": [
                            {
                                "node_wwn": "iqn.1994-05.com.redhat:tc",
                                "attributes": {},
                                "mapped_luns": [{"tpg_lun": 0, "write_protect": False}],
                                "chap_userid": "",
                                "chap_password": "",
                            }
                        ],
                        "luns": [{"index": 0, "storage_object": "/backstores/fileio/tc1"}],
                        "portals": [{"ip_address": "127.0.0.1", "port": 3261}],
                    }
                ],
            }
        ],
        "fabric_modules": [{"name": "iscsi", "discovery_enable_auth": False}],
    }


def targetcli_documents(world: World) -> st.SearchStrategy[str]:
    original = targetcli_document(world)
    return st.one_of(
        st.just(json.dumps(original)),
        forged_documents(original),
        st.sampled_from(
            ["", "{}", "[]", '{"targets": []}', '{"storage_objects": null, "targets": null}', "[" * 100_000]
        ),
        strings(),
    )


# -- every documented method ------------------------------------------------------------------------

Strategy = Callable[[World], st.SearchStrategy[list[Any]]]


def args(*parts: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.tuples(*parts).map(list)


METHODS: dict[str, Strategy] = {
    "Manager.CreateDisk": lambda w: args(
        names("d1", "d2"),
        mostly(st.sampled_from([MIB, 2 * MIB, MIB + 512, 2**30, 2**40]), integers(SIZES, 64)),
        options(
            {"path": ("s", file_paths(w)), "description": ("s", descriptions()), "write_back": ("b", st.booleans())}
        ),
    ),
    "Manager.CreateBlockDisk": lambda w: args(
        names("d1"),
        file_paths(w, "/dev/null", "/dev/zero", "/dev/loop-control"),
        options({"description": ("s", descriptions())}),
    ),
    "Manager.ImportDisk": lambda w: args(
        mostly(forged_disk_files(w), file_paths(w)),
        options({"name": ("s", names("d1", "d2", "spare")), "description": ("s", descriptions())}),
    ),
    "Manager.CreateBootProfile": lambda w: args(
        names("pc1"),
        object_paths(w, TARGETS_PATH, "t1_0a"),
        iqns(),
        options(
            {
                "lun": ("u", luns()),
                "mac": ("s", macs()),
                "portal": ("s", portals()),
                "secondary_portal": ("s", portals()),
                "firmware": ("s", strings("all", "ipxe", "uefi", "broadcom", "iPXE", "all\n")),
            }
        ),
    ),
    "Manager.CreatePair": lambda w: args(
        peer_addresses(),
        pair_keys(),
        options(
            {
                "aux_address": ("s", peer_addresses()),
                "port": ("q", mostly(st.integers(20000, 60000), integers(U16, 16))),
                "local_addresses": ("as", st.lists(mostly(st.just("127.0.0.1"), strings("192.0.2.7")), max_size=3)),
            }
        ),
    ),
    "Manager.ExportConfiguration": lambda w: args(options({})),
    "Manager.ImportConfiguration": lambda w: args(export_documents(w), options(FORCE)),
    "Manager.ImportTargetcli": lambda w: args(targetcli_documents(w), options({})),
    "Manager.CreatePortal": lambda w: args(
        mostly(
            st.sampled_from(["127.0.0.1", "::1", "0.0.0.0", "::"]),
            strings("192.0.2.10", "127.0.0.1:3260", "[::1]", "127.1", "0x7f.1", "::ffff:127.0.0.1", "127.0.0.1\n"),
        ),
        mostly(st.sampled_from([3261, 3262, 860]), integers(U16, 16)),
        options({"targets": ("ao", st.lists(object_paths(w, TARGETS_PATH), max_size=4))}),
    ),
    "Manager.CreateTarget": lambda w: args(
        names("t1", "t2"),
        options(
            {
                "iqn": ("s", iqns()),
                "description": ("s", descriptions()),
                "alias": ("s", mostly(st.sampled_from(["Mail store", ""]), strings("a" * 255, "a" * 256))),
            }
        ),
    ),
    "Manager.SetDiscoveryChap": lambda w: args(chap_credentials(), options({})),
    "Manager.ListSeenInitiators": lambda w: args(options({})),
    "Disk.Delete": lambda w: args(options({"remove_file": ("b", st.booleans())})),
    "Disk.Extend": lambda w: args(
        st.one_of(
            st.sampled_from(GROWTHS).map(lambda g: MIB + g),
            st.sampled_from(GROWTHS).map(lambda g: 2 * MIB + g),
            integers(SIZES, 64),
        ),
        options({}),
    ),
    "Disk.Modify": lambda w: args(
        options(
            {
                "description": ("s", descriptions()),
                "shared": ("b", st.booleans()),
                "backstore": ("s", strings("dm", "direct", "fileio", "dm\n")),
            }
        ),
        options(FORCE),
    ),
    "Target.AddAcl": lambda w: args(iqns(), options({})),
    "Target.AddLun": lambda w: args(
        object_paths(w, DISKS_PATH, "spare"),
        options({"lun": ("u", luns()), "read_only": ("b", st.booleans())}),
    ),
    "Target.Delete": lambda w: args(options(FORCE)),
    "Target.SetChap": lambda w: args(chap_credentials(), options({})),
    "Target.SetAllowedSources": lambda w: args(
        st.lists(
            strings(
                "10.0.0.0/24", "10.0.0.1/24", "fd00::/64", "52:54:00:12:34:56", "app1.example.com", "0.0.0.0/0", "::/0"
            ),
            max_size=5,
        ),
        options(FORCE),
    ),
    "Target.Modify": lambda w: args(
        options(
            {
                "description": ("s", descriptions()),
                "alias": ("s", mostly(st.sampled_from(["Mail store", ""]), strings("a" * 255, "a" * 256))),
                "enabled": ("b", st.booleans()),
                "iqn": ("s", iqns()),
                "header_digest": ("s", strings("allowed", "required", "off", "CRC32C", "Allowed")),
                "data_digest": ("s", strings("allowed", "required", "off", "None")),
            }
        ),
        options(FORCE),
    ),
    "Lun.Delete": lambda w: args(options(FORCE)),
    "Acl.SetChap": lambda w: args(chap_credentials(), options({})),
    "Acl.Logout": lambda w: args(options({})),
    "Acl.Delete": lambda w: args(options(FORCE)),
    "BootProfile.Delete": lambda w: args(options({})),
    "BootProfile.DhcpConfigsWithSecrets": lambda w: args(options({})),
    "Peer.Delete": lambda w: args(options({})),
    "Portal.Delete": lambda w: args(options({})),
    # The fuzzed node is not paired: a mirror can never be made, and every call on one
    # meets a mirror that does not exist.
    "Manager.CreateMirror": lambda w: args(
        object_paths(w, DISKS_PATH, "spare"),
        strings("sync", "async", "SYNC", "sync\n", "A"),
        options(
            {
                "peer_disk": ("s", names("d1")),
                "skip_initial_sync": ("b", st.booleans()),
                "region": ("u", integers([*U32, 3000, 4096, 65536, 2**30], 32)),
            }
        ),
    ),
    "Manager.GetVolumeState": lambda w: args(names("d1", "d2"), options({})),
    "Mirror.Break": lambda w: args(options({})),
    "Mirror.Continue": lambda w: args(options({})),
    "Mirror.Resync": lambda w: args(options({})),
    "Mirror.PrepareTarget": lambda w: args(options({})),
    "Mirror.Grow": lambda w: args(integers(SIZES, 64), options({})),
    "Mirror.Delete": lambda w: args(options({"local_only": ("b", st.booleans())})),
    "Mirror.Pause": lambda w: args(options({"unlock": ("b", st.booleans())})),
    "Mirror.Switchover": lambda w: args(options(FORCE)),
    "Mirror.SetMode": lambda w: args(strings("sync", "async"), options({})),
    "Mirror.SetEndpoints": lambda w: args(peer_addresses(), peer_addresses(), options({})),
    "Failover.AddAddress": lambda w: args(interfaces(), virtual_addresses(), options({})),
    "Failover.RemoveAddress": lambda w: args(interfaces(), virtual_addresses(), options({})),
    "Failover.AddPingNode": lambda w: args(ping_nodes(), interfaces(), options({})),
    "Failover.RemovePingNode": lambda w: args(ping_nodes(), options({})),
    "Failover.Protect": lambda w: args(names("t1"), options({})),
    "Failover.Unprotect": lambda w: args(names("t1"), options({})),
    "Failover.SetHeartbeat": lambda w: args(
        mostly(st.sampled_from([0.5, 1.0]), st.floats(allow_nan=True, allow_infinity=True)),
        integers(U32, 32),
        options({}),
    ),
    # The fuzzed node has no connected peer: Start is always refused, with its list.
    "Failover.Check": lambda w: args(options({})),
    "Failover.Start": lambda w: args(options({})),
    "Failover.Stop": lambda w: args(options({})),
    "Failover.Switchover": lambda w: args(options({})),
    "Failover.TakeOver": lambda w: args(options(FORCE)),
    "Mirror.Tune": lambda w: args(
        options(
            {name: ("u", integers(U32, 32)) for name in ("high_water", "low_water", "throttle", "max_resync_passes")}
        ),
        options({}),
    ),
}
