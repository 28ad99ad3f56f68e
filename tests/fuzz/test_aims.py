"""The strategies reach the inputs that broke applianced before (issue 8).

Each entry is a method and a predicate on its arguments that describes one defect found
by hand or by this tier; hypothesis must be able to draw such arguments, so that a change
to the strategies cannot quietly stop aiming at them.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, find, settings

from tests.fuzz.strategies import METHODS, targetcli_document
from tests.fuzz.world import MIB, TRAILER_SIZE

pytestmark = pytest.mark.fuzz


def option(args, key):
    value = args[-1].get(key)
    return value.value if value is not None and not isinstance(value.value, list | dict) else value


def forged_trailer(args, check):
    path = Path(args[0])
    if not path.name.startswith("forged-") or path.stat().st_size < TRAILER_SIZE:
        return False
    with path.open("rb") as f:
        f.seek(-TRAILER_SIZE, 2)
        end = f.read()
    try:
        fields = json.loads(end[16:].rstrip(b"\0"))
    except (ValueError, RecursionError):
        return False
    return isinstance(fields, dict) and check(fields)


def _json_kind(value):
    return "number" if type(value) in (int, float) else type(value).__name__


def retyped(text, original):
    """Whether ``text`` is JSON with a value of another type than ``original`` has at that place."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return False

    def differs(value, original):
        if _json_kind(value) != _json_kind(original):
            return True
        if isinstance(value, dict):
            return any(differs(value[key], original[key]) for key in value.keys() & original.keys())
        if isinstance(value, list):
            return any(differs(item, reference) for item, reference in zip(value, original, strict=False))
        return False

    # The document as a whole of another type is a different aim (a bad document, not a bad field).
    return isinstance(document, dict) and differs(document, json.loads(original))


AIMS = {
    "wrong-typed JSON value in an import": ("Manager.ImportConfiguration", lambda a, w: retyped(a[0], w.baseline)),
    "deeply nested import": ("Manager.ImportConfiguration", lambda a, w: "[" * 1000 in a[0] or '{"a": ' * 1000 in a[0]),
    "wrong-typed targetcli value": (
        "Manager.ImportTargetcli",
        lambda a, w: retyped(a[0], json.dumps(targetcli_document(w))),
    ),
    "deeply nested targetcli file": ("Manager.ImportTargetcli", lambda a, w: "[" * 1000 in a[0]),
    "extend by less than a trailer": ("Disk.Extend", lambda a, w: a[0] % MIB and a[0] % MIB < TRAILER_SIZE),
    "import a disk under a new name": ("Manager.ImportDisk", lambda a, w: option(a, "name") == "new1"),
    "forged trailer, size near 2**63": (
        "Manager.ImportDisk",
        lambda a, w: forged_trailer(a, lambda t: isinstance(t.get("size"), int) and t["size"] >= 2**63 - 1),
    ),
    "forged trailer, name of the wrong type": (
        "Manager.ImportDisk",
        lambda a, w: forged_trailer(a, lambda t: "name" in t and not isinstance(t["name"], str)),
    ),
    "name with a trailing newline": ("Manager.CreateDisk", lambda a, w: a[0].endswith("\n") and a[0].strip()),
    "size near 2**63": ("Manager.CreateDisk", lambda a, w: 2**63 - 2 * TRAILER_SIZE <= a[1] < 2**64),
    "path component over 255 bytes": (
        "Manager.CreateDisk",
        lambda a, w: any(len(p.encode()) > 255 for p in str(option(a, "path") or "").split("/")),
    ),
    "non-ASCII digits in a portal port": ("Manager.CreateBootProfile", lambda a, w: "²" in str(option(a, "portal"))),
    "a disk path naming a FIFO": ("Manager.ImportDisk", lambda a, w: a[0].endswith("/fifo")),
    "a new disk file under a FIFO": ("Manager.CreateDisk", lambda a, w: "/fifo/" in str(option(a, "path"))),
    "a known option of the wrong type": (
        "Target.Modify",
        lambda a, w: "enabled" in a[0] and a[0]["enabled"].signature != "b",
    ),
}


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@pytest.mark.parametrize("aim", sorted(AIMS))
def test_strategies_reach(world, aim):
    key, predicate = AIMS[aim]
    world.reset()
    found = find(
        METHODS[key](world),
        lambda drawn: predicate(drawn, world),
        settings=settings(
            max_examples=3000, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
        ),
    )
    assert predicate(found, world)
