"""Every documented method, called with adversarial values of its signature.

After each call: the daemon answers, an error is one of the named ones and speaks no
Python, a failed call changed no file (state, kernel, firewall, disk files, every file it
named), the object tree can be read, and every disk file still carries its trailer. After
each example the node exports its configuration and imports it back unchanged.
"""

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz.strategies import METHODS
from tests.fuzz.world import World
from tests.support.api_client import documented_methods

pytestmark = pytest.mark.fuzz

DOCUMENTED = {method.key: method for method in documented_methods()}
MANAGER = "org.applianced.Appliance1.Manager"
ROOT_PATH = "/org/applianced/Appliance1"


def test_every_documented_method_has_a_strategy():
    assert sorted(METHODS) == sorted(DOCUMENTED)


def callees(world: World, interface: str) -> st.SearchStrategy[str]:
    """The objects a method of ``interface`` can be called on, and (rarely) one that does not exist."""
    if interface == MANAGER:
        return st.just(ROOT_PATH)
    live = world.paths_of(interface)
    missing = {
        "Disk": "disks/gone",
        "Target": "targets/gone",
        "Lun": "targets/t1/luns/200",
        "Acl": "targets/t1/acls/gone",
        "BootProfile": "boot_profiles/gone",
        "Portal": "portals/gone",
        "Peer": "peer/gone",
        "Mirror": "mirrors/gone",
        "Failover": "failover/gone",
    }[interface.rsplit(".", 1)[-1]]
    return st.sampled_from(live * 8 + [f"{ROOT_PATH}/{missing}"])


def fuzzed_call(world: World, data, key: str) -> None:
    method = DOCUMENTED[key]
    path = data.draw(callees(world, method.interface), label="object")
    args = data.draw(METHODS[key](world), label="arguments")
    outcome = world.call(path, method, args)
    event(f"{key}: {outcome.error.rsplit('.', 1)[-1] if outcome.error else outcome}")


@pytest.mark.parametrize("key", sorted(DOCUMENTED))
@given(data=st.data())
def test_method(world, key, data):
    world.reset()
    for _ in range(data.draw(st.integers(1, 3), label="calls")):
        fuzzed_call(world, data, key)
    world.check_round_trip()


@given(data=st.data())
def test_sequences_of_methods(world, data):
    """Calls of different methods in a row: what one leaves behind is what the next gets."""
    world.reset()
    for _ in range(data.draw(st.integers(2, 8), label="calls")):
        fuzzed_call(world, data, data.draw(st.sampled_from(sorted(DOCUMENTED)), label="method"))
    world.check_round_trip()
