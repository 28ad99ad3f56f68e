"""Fixtures of the fuzz tier: one daemon per test module, and the hypothesis profiles.

The "ci" profile (the default) is seeded and bounded so that the tier adds a few minutes
to ``.ci/run``; ``APPLIANCED_FUZZ=long tools/test tests/fuzz`` runs the "long" profile,
which draws many more examples, new ones on each run, and shrinks what fails to a minimal
example. APPLIANCED_FUZZ_EXAMPLES sets the number of examples per test of either profile.
"""

import os

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import POLICY
from tests.fuzz.world import World
from tests.support.private_bus import PrivateBus

COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
# Reproducible: the same examples on every run. Without shrinking, because a call that
# hangs costs the whole per-call timeout on each shrinking step.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=int(os.environ.get("APPLIANCED_FUZZ_EXAMPLES", "60")),
    phases=[Phase.explicit, Phase.generate],
    **COMMON,
)
settings.register_profile("long", max_examples=int(os.environ.get("APPLIANCED_FUZZ_EXAMPLES", "1000")), **COMMON)
settings.load_profile(os.environ.get("APPLIANCED_FUZZ", "ci"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    bus = PrivateBus(POLICY)
    bus.start()
    node = World(bus.address, tmp_path_factory.mktemp("fuzz"))
    try:
        node.start()
        yield node
    finally:
        node.stop()
        bus.stop()
