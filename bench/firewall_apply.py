"""How long replacing and re-checking the allow-list table takes, for N portals.

Usage (as root): PYTHONPATH=. .venv/bin/python bench/firewall_apply.py [--sizes 1,10,100,1000] [--repeat 5]

It makes one network namespace of its own, and inside it builds N targets, each with a
portal of its own (10.0.x.y:3260) and an allow-list of four sources (a network, an
address, an IPv6 network, a MAC). It then times, with the real nft of this machine:
  * render: the pure rule set from the configuration (applianced/iscsi/firewall.py);
  * replace: NftFirewall.apply of that rule set over a table that differs (one nft -j
    list plus the nft -j -f - batch that deletes and redefines the table);
  * no-op: NftFirewall.apply of the same rule set again (one nft -j list and the
    comparison: what every daemon start, reload and unrelated change costs);
  * clear: removing the table.
Each figure is the median of --repeat runs, in milliseconds. No packet is sent; the
namespace is deleted at the end. There is no baseline: nothing else does this job here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

INNER = r"""
import json, statistics, sys, time
from applianced.iscsi import firewall
from applianced.state import Config, Portal, Target

sizes, repeat = json.loads(sys.argv[1]), int(sys.argv[2])
nft = firewall.NftFirewall()

def config(n, variant):
    targets, portals = {}, []
    for i in range(n):
        name = f"t{i}"
        sources = (f"10.{100 + variant}.{i // 250}.0/24", f"192.168.{i % 250}.{1 + variant}",
                   f"fd00:{i:x}::/64", f"52:54:00:00:{i // 250:02x}:{i % 250:02x}")
        allowed = firewall.normalize_sources(sources)
        targets[name] = Target(name, f"iqn.2003-01.org.example:{name}", allowed_sources=allowed)
        portals.append(Portal(f"10.0.{i // 250}.{1 + i % 250}", 3260, (name,)))
    return Config("bench", targets=targets, portals=tuple(portals))

def ms(fn):
    t = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t) * 1000, result

rows = []
for n in sizes:
    samples = {"render": [], "replace": [], "noop": [], "clear": []}
    for r in range(repeat):
        cfg_a, cfg_b = config(n, 0), config(n, 1)
        t, wanted_a = ms(lambda: firewall.ruleset(firewall.filters(cfg_a, {}).values()))
        samples["render"].append(t)
        wanted_b = firewall.ruleset(firewall.filters(cfg_b, {}).values())
        nft.apply(wanted_b)
        t, changed = ms(lambda: nft.apply(wanted_a))
        assert changed
        samples["replace"].append(t)
        t, changed = ms(lambda: nft.apply(wanted_a))
        assert not changed
        samples["noop"].append(t)
        t, changed = ms(lambda: nft.apply(()))
        assert changed
        samples["clear"].append(t)
    rows.append({"portals": n, "rules": len(wanted_a) - 2,
                 **{k: round(statistics.median(v), 1) for k, v in samples.items()}})
print(json.dumps(rows))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,100,1000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    namespace = f"appl-bench-fw-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        started = time.monotonic()
        done = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", INNER, json.dumps(sizes), str(args.repeat)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows = json.loads(done.stdout)
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
    print(
        f"nft {subprocess.run(['nft', '--version'], capture_output=True, text=True).stdout.strip()}, "
        f"median of {args.repeat}, ms ({time.monotonic() - started:.0f} s in all)"
    )
    print("| portals | rules | render | replace | no-op check | clear |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cells = [row[key] for key in ("portals", "rules", "render", "replace", "noop", "clear")]
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
