"""A takeover's md arrays: the copies' prepared arrays taken over, against arrays started
at the takeover through sysfs and with mdadm, and what udev's handling of each new array
costs, in one guest.

In one QEMU guest booted by the VM harness (Debian's 6.1 kernel, TCG, ``--cpus`` vCPUs,
udev running with the storage node's rule, as on a node), N mirrors of 8 MiB file disks are
built with the bridge's own code, each copy served by qemu-nbd on loopback; then the
sources are stopped, as a crashed node's are gone. Each round takes the N copies over as a
takeover does (their exports stopped, their arrays started on ``--workers`` threads, the
daemon's pool on one vCPU), with a first 4 KiB write to each (md marks the array dirty in
its superblock before that write completes), and stops the arrays again, for each way in
turn:

* ``prepared``: ``Mirror.take_over`` of each copy's prepared array (``Mirror.prepare``,
  before the round), what the daemon does;
* ``applianced``: ``Mirror.start``, the daemon's start through md's sysfs, of an array
  forked before the round but not started (what a copy without a prepared array costs);
* ``mdadm``: ``mdadm --assemble --run`` of the same leg and ``mdadm --readwrite``, the way
  the daemon started them before (the baseline);
* ``applianced-no-udev``: ``applianced`` with udev's event queue stopped for the round
  (``udevadm control --stop-exec-queue``; started again and settled after it): what
  udev's handling of the new arrays takes from the start.

Printed: a Markdown table of the seconds for the N arrays (median of ``--rounds``), per
array, and the ratio to mdadm; ``--output`` keeps every sample as JSON.

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/array_start.py [--arrays 64] \\
        [--workers 5] [--rounds 2] [--cpus 1] [--output FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.vm.harness import Guest

SIZE = 8 << 20
PORT = 20000
WAYS = ("prepared", "applianced", "mdadm", "applianced-no-udev")
STATE_DIR = Path("/var/lib/applianced")


# -- in the guest ---------------------------------------------------------------------


def in_guest(arrays: int, workers: int, rounds: int) -> dict[str, list[float]]:
    from applianced.blockdev import md
    from applianced.replication import bridge

    sources, copies = bridge.DataPath(STATE_DIR / "source"), bridge.DataPath(STATE_DIR / "copy")
    for path in (sources, copies):
        (path.state_dir / "replication").mkdir(parents=True, exist_ok=True)
    sources.prepare()

    def volume(path: bridge.DataPath, name: str) -> bridge.Volume:
        disk = path.state_dir / f"{name}.img"
        if not disk.exists():
            with open(disk, "wb") as f:
                f.truncate(SIZE)
        return bridge.Volume(name, str(disk), True, SIZE)

    copy_volumes = [volume(copies, f"c{i}") for i in range(arrays)]
    for i, copy in enumerate(copy_volumes):  # one after the other: NBD devices are numbered as they connect
        copies.export(copy).assemble("127.0.0.1", PORT + i, fresh=True)
        sources.mirror(volume(sources, f"s{i}")).create(bridge.PeerEndpoint("127.0.0.1", copy.name, PORT + i))
    on_threads = concurrent.futures.ThreadPoolExecutor(workers)
    list(on_threads.map(lambda i: sources.mirror(volume(sources, f"s{i}")).stop(), range(arrays)))

    def forked(copy: bridge.Volume) -> None:
        """The copy's own metadata forked and its leg made, no array running."""
        mirror = copies.mirror(copy)
        mirror.prepare()
        mirror.stop_array()

    def mdadm_start(copy: bridge.Volume) -> md.Array:
        leg = f"/dev/mapper/{copies.mirror(copy).leg_name}"
        # A name of its own per array (c<i> gets md<200+i>): threads picking the lowest free
        # one would collide.
        md.mdadm("--assemble", f"/dev/md{200 + int(copy.name[1:])}", "--run", leg)
        array = md.holder_array(leg)
        md.mdadm("--readwrite", array.node)
        return array

    block = mmap.mmap(-1, 4096)
    block.write(b"\xa5" * 4096)

    def first_write(array: md.Array) -> None:
        fd = os.open(array.node, os.O_WRONLY | os.O_DIRECT)
        try:
            os.pwritev(fd, [block], 0)
        finally:
            os.close(fd)

    starts = {
        "prepared": lambda copy: md.Array(copies.mirror(copy).take_over(0).name),
        "applianced": lambda copy: md.Array(copies.mirror(copy).start(0).name),
        "mdadm": mdadm_start,
        "applianced-no-udev": lambda copy: md.Array(copies.mirror(copy).start(0).name),
    }
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            if way == "prepared":
                list(on_threads.map(lambda copy: copies.mirror(copy).prepare(), copy_volumes))
            else:
                list(on_threads.map(forked, copy_volumes))
            subprocess.run(["udevadm", "settle"], check=True)
            list(on_threads.map(lambda copy: copies.export(copy).stop_serving(), copy_volumes))
            if way == "applianced-no-udev":
                subprocess.run(["udevadm", "control", "--stop-exec-queue"], check=True)
            began = time.monotonic()
            try:
                list(on_threads.map(lambda copy, start=starts[way]: first_write(start(copy)), copy_volumes))
                seconds[way].append(time.monotonic() - began)
            finally:
                subprocess.run(["udevadm", "control", "--start-exec-queue"], check=True)
            subprocess.run(["udevadm", "settle"], check=True)
            # Copies again, for the next way.
            list(on_threads.map(lambda copy: copies.mirror(copy).stop_array(), copy_volumes))
            for i, copy in enumerate(copy_volumes):
                copies.export(copy).assemble("127.0.0.1", PORT + i)
            print(f"{way}: {seconds[way][-1]:.2f} s for {arrays} arrays", file=sys.stderr, flush=True)
    return seconds


# -- on the host ----------------------------------------------------------------------


def table(seconds: dict[str, list[float]], arrays: int) -> str:
    base = statistics.median(seconds["mdadm"])
    lines = [
        f"| way | {arrays} arrays s | per array s | vs mdadm |",
        "|---|---:|---:|---:|",
    ]
    for way in WAYS:
        total = statistics.median(seconds[way])
        lines.append(f"| {way} | {total:.1f} | {total / arrays:.3f} | {total / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import one_guest
    from tests.vm.appliance import UDEV_RULES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=64)
    parser.add_argument("--workers", type=int, default=5, help="threads (the daemon's pool on one vCPU: 5)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--output", type=Path, help="every sample, as JSON")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        print(json.dumps(in_guest(args.arrays, args.workers, args.rounds)))
        return 0

    def prepare(guest: Guest) -> None:
        guest.setup_storage()
        for rule in UDEV_RULES:
            guest.write_file(f"/etc/udev/rules.d/{rule.name}", rule.read_bytes(), mode=0o644)
        guest.run("udevadm control --reload")

    logs = Path(tempfile.mkdtemp(prefix="bench-array-start-"))
    arguments = ["--in-guest", f"--arrays={args.arrays}", f"--workers={args.workers}", f"--rounds={args.rounds}"]
    seconds = one_guest.run("bench-array-start", logs, __file__, arguments, prepare, cpus=args.cpus)
    print(table(seconds, args.arrays))
    one_guest.keep(args, seconds, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
