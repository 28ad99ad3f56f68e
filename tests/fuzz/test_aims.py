"""The strategies reach the inputs that broke applianced before (issue 8).

Each entry is a method and a predicate on its arguments that describes one defect found
by hand or by this tier; hypothesis must be able to draw such arguments, so that a change
to the strategies cannot quietly stop aiming at them.
"""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, find, settings

from tests.fuzz.strategies import METHODS
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
        return check(json.loads(end[16:].rstrip(b"\0")))
    except ValueError:
        return False


AIMS = {
    "wrong-typed JSON value in an import": ("Manager.ImportConfiguration", lambda a: '"shared": []' in a[0]),
    "deeply nested import": ("Manager.ImportConfiguration", lambda a: "[" * 1000 in a[0] or '{"a": ' * 1000 in a[0]),
    "wrong-typed targetcli value": ("Manager.ImportTargetcli", lambda a: '"size": "' in a[0] or '"tpgs": {}' in a[0]),
    "deeply nested targetcli file": ("Manager.ImportTargetcli", lambda a: "[" * 1000 in a[0]),
    "extend by less than a trailer": ("Disk.Extend", lambda a: a[0] % MIB and a[0] % MIB < TRAILER_SIZE),
    "import a disk under a new name": ("Manager.ImportDisk", lambda a: option(a, "name") == "new1"),
    "forged trailer, size near 2**63": (
        "Manager.ImportDisk",
        lambda a: forged_trailer(a, lambda t: isinstance(t["size"], int) and t["size"] >= 2**63 - 1),
    ),
    "forged trailer, name of the wrong type": (
        "Manager.ImportDisk",
        lambda a: forged_trailer(a, lambda t: not isinstance(t["name"], str)),
    ),
    "name with a trailing newline": ("Manager.CreateDisk", lambda a: a[0].endswith("\n") and a[0].strip()),
    "size near 2**63": ("Manager.CreateDisk", lambda a: 2**63 - 2 * TRAILER_SIZE <= a[1] < 2**64),
    "path component over 255 bytes": (
        "Manager.CreateDisk",
        lambda a: any(len(p.encode()) > 255 for p in str(option(a, "path") or "").split("/")),
    ),
    "non-ASCII digits in a portal port": ("Manager.CreateBootProfile", lambda a: "²" in str(option(a, "portal"))),
    "a disk path naming a FIFO": ("Manager.ImportDisk", lambda a: a[0].endswith("/fifo")),
    "a new disk file under a FIFO": ("Manager.CreateDisk", lambda a: "/fifo/" in str(option(a, "path"))),
    "a known option of the wrong type": (
        "Target.Modify",
        lambda a: "enabled" in a[0] and a[0]["enabled"].signature != "b",
    ),
}


@pytest.mark.filterwarnings("ignore:Generating overly large repr")
@pytest.mark.parametrize("aim", sorted(AIMS))
def test_strategies_reach(world, aim):
    key, predicate = AIMS[aim]
    world.reset()
    found = find(
        METHODS[key](world),
        predicate,
        settings=settings(
            max_examples=3000, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck)
        ),
    )
    assert predicate(found)
