"""An in-memory stand-in for the nftables table, for unit tests and the D-Bus tier.

The host's own network namespace must never get firewall rules, so tests that do not run
in a namespace of their own use this. It keeps the last rule set (in a JSON file when
given one, so that it outlives the daemon process), counts the replacements, and can be
told to refuse, to exercise roll-back. What nftables really does with the rules is proven
in the netns and VM tiers.
"""

from __future__ import annotations

import json
from pathlib import Path

from applianced.errors import KernelError
from applianced.iscsi.firewall import Ruleset


class FakeFirewall:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.ruleset: Ruleset = ()
        self.replacements = 0
        # The engine's looks at the table (each one a read of it through libnftables).
        self.looks = 0
        # The hold table (in memory: a daemon starts by releasing it).
        self.held: Ruleset = ()
        self.holds = 0
        self.fail = False
        if path and path.exists():
            self.ruleset = tuple(json.loads(path.read_text()))

    def apply(self, ruleset: Ruleset) -> bool:
        self.looks += 1
        if ruleset == self.ruleset:
            return False
        if self.fail:
            raise KernelError("injected firewall failure")
        self.ruleset = ruleset
        self.replacements += 1
        if self.path:
            self.path.write_text(json.dumps(list(ruleset)))
        return True

    def hold(self, ruleset: Ruleset) -> None:
        if self.fail:
            raise KernelError("injected firewall failure")
        self.held = ruleset
        self.holds += 1
