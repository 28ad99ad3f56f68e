"""Two daemons paired over test-made namespaces, each on a private bus of its own."""

from __future__ import annotations

import time
from pathlib import Path

from tests.conftest import POLICY
from tests.support.daemon import Daemon
from tests.support.netns import Namespace
from tests.support.private_bus import PrivateBus


def wait(condition, timeout: float = 40, step: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)


class PairedDaemons:
    """Daemons a and b in namespaces of their own, paired over ``main`` with ``aux`` as the
    auxiliary path (addresses by node name); stopped with ``close``."""

    def __init__(self, root: Path, namespaces: dict[str, Namespace], main: dict, aux: dict, key: str) -> None:
        self.buses = {name: PrivateBus(POLICY) for name in ("a", "b")}
        self.nodes: dict[str, Daemon] = {}
        for name, bus in self.buses.items():
            bus.start()
            directory = root / name
            directory.mkdir()
            self.nodes[name] = Daemon(bus.address, directory, exec_prefix=namespaces[name].exec_prefix)
            self.nodes[name].start()
        for name, node in self.nodes.items():
            peer = "b" if name == "a" else "a"
            created = node.cli("pair", "create", main[peer], "--aux-address", aux[peer], input=key)
            assert created.returncode == 0, created.stderr
        wait(lambda: '"connected": true' in self.nodes["a"].cli("--json", "pair", "status").stdout)

    def close(self) -> None:
        for node in self.nodes.values():
            if node.process:
                node.stop()
        for bus in self.buses.values():
            bus.stop()
