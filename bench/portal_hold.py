"""A planned switchover's portal hold as the daemon writes it (a table of its own, through
libnftables in its process), against the same table written by an nft process (9232e67)
and the hold merged into the allow-lists' table by nft processes (before 9232e67), in
one guest.

In one QEMU guest booted by the VM harness (Debian's 6.1 kernel, TCG, ``--cpus`` vCPUs),
the allow-lists' table ``inet applianced`` holds the rules of ``--exports`` replicated
volumes' NBD exports (each admitting only the peer), as a node with that many mirrors has.
Each round holds one VIP's portal and releases it, for each way in turn:

* ``applianced``: ``NftFirewall.hold`` of ``held_ruleset``, then ``hold(())``;
* ``own-table-nft``: the same batches, each run by one ``nft -j -f -`` process;
* ``shared-table-nft``: the same rules in the allow-lists' table, brought in as the
  daemon did before (one ``nft -j list`` of the whole table, compared, and one
  ``nft -j -f -`` rewriting it), then taken out the same way (the baseline).

The engine's lock, which the shared table's hold also waited for, is not in these numbers.
No packet is sent. Printed: a Markdown table of the milliseconds of a hold and of a release
(median of ``--rounds``) and their ratio to ``shared-table-nft``; ``--output`` keeps every
sample as JSON.

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/portal_hold.py [--exports 64] \\
        [--rounds 7] [--cpus 1] [--output FILE]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WAYS = ("applianced", "own-table-nft", "shared-table-nft")
BASELINE = "shared-table-nft"
VIP = ("10.60.0.100", 3260)
NFT = "/usr/sbin/nft"


# -- in the guest ---------------------------------------------------------------------


def in_guest(exports: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    from applianced.iscsi import firewall

    daemon = firewall.NftFirewall()
    peer = (ipaddress.ip_network("10.61.0.2/32"),)
    export_filters = [
        firewall.PortalFilter("10.61.0.1", 10809 + number, peer, (), f"export d{number}") for number in range(exports)
    ]
    allow_lists = firewall.ruleset(export_filters)
    held = firewall.held_ruleset([VIP])
    # The hold's chains and rules as the allow-lists' table carried them before, in the
    # order nft lists them: the table, its chains, then each chain's rules.
    carried = [{kind: {**body, "table": firewall.TABLE}} for obj in held[1:] for kind, body in obj.items()]
    merged = (*allow_lists[:2], *carried[:2], *allow_lists[2:], *carried[2:])

    def shared(ruleset: firewall.Ruleset) -> None:
        listed = nft("-j", "list", "table", firewall.FAMILY, firewall.TABLE)
        if (
            tuple(firewall._without_handles(o) for o in json.loads(listed)["nftables"] if "metainfo" not in o)
            != ruleset
        ):
            nft("-j", "-f", "-", batch=firewall.transaction(ruleset))

    ways: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "applianced": (lambda: daemon.hold(held), lambda: daemon.hold(())),
        "own-table-nft": (
            lambda: nft("-j", "-f", "-", batch=firewall.transaction(held, firewall.HOLD_TABLE)),
            lambda: nft("-j", "-f", "-", batch=firewall.transaction((), firewall.HOLD_TABLE)),
        ),
        "shared-table-nft": (lambda: shared(merged), lambda: shared(allow_lists)),
    }
    daemon.apply(allow_lists)
    samples: dict[str, dict[str, list[float]]] = {way: {"hold": [], "release": []} for way in WAYS}
    try:
        for _ in range(rounds):
            for way in WAYS:
                hold, release = ways[way]
                for step, action in (("hold", hold), ("release", release)):
                    started = time.monotonic()
                    action()
                    samples[way][step].append(time.monotonic() - started)
                    # Each way leaves the tables as it found them, or the next would not compare.
                    assert daemon.observe() == (merged if (way, step) == (BASELINE, "hold") else allow_lists)
                print(f"{way}: hold {samples[way]['hold'][-1]:.3f} s", file=sys.stderr, flush=True)
    finally:
        daemon.apply(())
        daemon.hold(())
    return samples


def nft(*arguments: str, batch: dict[str, Any] | None = None) -> str:
    done = subprocess.run(
        [NFT, *arguments], input=json.dumps(batch) if batch else None, capture_output=True, text=True, check=True
    )
    return done.stdout


# -- on the host ----------------------------------------------------------------------


def table(samples: dict[str, dict[str, list[float]]], exports: int) -> str:
    baseline = {step: statistics.median(samples[BASELINE][step]) for step in ("hold", "release")}
    lines = [
        f"| way ({exports} export rules in the allow-lists' table) | hold, ms | ratio | release, ms | ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for way in WAYS:
        hold, release = (statistics.median(samples[way][step]) for step in ("hold", "release"))
        lines.append(
            f"| {way} | {hold * 1000:.0f} | {hold / baseline['hold']:.2f} "
            f"| {release * 1000:.0f} | {release / baseline['release']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import one_guest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exports", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--output", type=Path, help="every sample, as JSON")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        print(json.dumps(in_guest(args.exports, args.rounds)))
        return 0
    logs = Path(tempfile.mkdtemp(prefix="bench-portal-hold-"))
    arguments = ["--in-guest", f"--exports={args.exports}", f"--rounds={args.rounds}"]
    samples = one_guest.run("bench-portal-hold", logs, __file__, arguments, lambda guest: None, cpus=args.cpus)
    print(table(samples, args.exports))
    one_guest.keep(args, samples, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
