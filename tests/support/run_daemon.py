"""Runs the real applianced daemon with the in-memory kernel, for the D-Bus tier.

Usage: python -m tests.support.run_daemon KERNEL_FILE [applianced arguments...]
The kernel file stands for LIO across daemon restarts; deleting it is a "reboot". The
replication data path is a stand-in too (datapath.json beside it).
The firewall is an in-memory stand-in kept beside it (firewall.json), unless
APPLIANCED_TEST_FIREWALL=nft asks for the real nftables table: only ever inside a
test-made network namespace. DNS names resolve only through the JSON file named by
APPLIANCED_TEST_HOSTS ({"name": ["address", ...]}, read at each lookup), so that no
test ever sends a DNS query.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from applianced.daemon import main
from applianced.iscsi.firewall import NftFirewall
from tests.support.fake_datapath import FakeDataPath
from tests.support.fake_firewall import FakeFirewall
from tests.support.fake_kernel import FAIL_ENV, SLOW_SESSIONS_ENV, FakeKernel

FIREWALL_ENV = "APPLIANCED_TEST_FIREWALL"
HOSTS_ENV = "APPLIANCED_TEST_HOSTS"


def resolve(name: str) -> list[str]:
    path = os.environ.get(HOSTS_ENV)
    hosts = json.loads(Path(path).read_text()) if path else {}
    if name not in hosts:
        raise OSError(f"{name}: Name or service not known")
    return hosts[name]


if __name__ == "__main__":
    kernel_file = Path(sys.argv[1])
    real_firewall = os.environ.get(FIREWALL_ENV) == "nft"
    raise SystemExit(
        main(
            sys.argv[2:],
            lambda: FakeKernel(kernel_file, os.environ.get(FAIL_ENV), float(os.environ.get(SLOW_SESSIONS_ENV, "0"))),
            NftFirewall if real_firewall else lambda: FakeFirewall(kernel_file.with_name("firewall.json")),
            resolve,
            lambda state_dir: FakeDataPath(state_dir, kernel_file.with_name("datapath.json")),
        )
    )
