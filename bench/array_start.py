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
  before the round), what the daemon does, its export stopped before the clock;
* ``fenced``: the same, after each export is fenced on the clock as a takeover fences it
  (``Export.fence``: the served leg suspended), all of them first, then the arrays;
* ``fenced-by-reload`` and ``fenced-by-reload-serial``: ``fenced`` with the daemon's
  fence before: the served leg's table swapped for an error target (one reload, whose
  resume sends udev a change event), with device-mapper's ioctls side by side, and one at
  a time across threads as the daemon made them then;
* ``applianced``: ``Mirror.start``, the daemon's start through md's sysfs, of an array
  forked before the round but not started (what a copy without a prepared array costs);
* ``mdadm``: ``mdadm --assemble --run`` of the same leg and ``mdadm --readwrite``, the way
  the daemon started them before (the baseline);
* ``applianced-no-udev``: ``applianced`` with udev's event queue stopped for the round
  (``udevadm control --stop-exec-queue``; started again and settled after it): what
  udev's handling of the new arrays takes from the start.

Printed: a Markdown table of the seconds for the N arrays (median of ``--rounds``), per
array, and the ratio to ``--baseline`` (mdadm unless it is not among ``--ways``);
``--output`` keeps every sample as JSON.

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/array_start.py [--arrays 64] \\
        [--workers 5] [--rounds 2] [--cpus 1] [--ways WAY,...] [--baseline WAY] [--output FILE]
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
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.vm.harness import Guest

SIZE = 8 << 20
PORT = 20000
WAYS = (
    "prepared",
    "fenced",
    "fenced-by-reload",
    "fenced-by-reload-serial",
    "applianced",
    "mdadm",
    "applianced-no-udev",
)
FENCED = ("fenced", "fenced-by-reload", "fenced-by-reload-serial")
STATE_DIR = Path("/var/lib/applianced")


# -- in the guest ---------------------------------------------------------------------


def in_guest(arrays: int, workers: int, rounds: int, ways: list[str]) -> dict[str, list[float]]:
    from applianced.blockdev import dm, md
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

    def reload_fence(copy: bridge.Volume) -> None:
        export = copies.export(copy)
        export.dm.reload(export.name, [dm.error(bridge.META_SECTORS + copy.sectors)])

    one_at_a_time = threading.Lock()
    unlocked_call = dm.DeviceMapper._call

    def locked_call(*args, **kwargs):
        with one_at_a_time:
            return unlocked_call(*args, **kwargs)

    def take_over(copy: bridge.Volume) -> md.Array:
        return md.Array(copies.mirror(copy).take_over(0).name)

    starts = {
        "prepared": take_over,
        "applianced": lambda copy: md.Array(copies.mirror(copy).start(0).name),
        "mdadm": mdadm_start,
        "applianced-no-udev": lambda copy: md.Array(copies.mirror(copy).start(0).name),
    }
    fences = {
        "fenced": lambda copy: copies.export(copy).fence(),
        "fenced-by-reload": reload_fence,
        "fenced-by-reload-serial": reload_fence,
    }
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way in ways:
            if way == "prepared" or way in FENCED:
                list(on_threads.map(lambda copy: copies.mirror(copy).prepare(), copy_volumes))
            else:
                list(on_threads.map(forked, copy_volumes))
            subprocess.run(["udevadm", "settle"], check=True)
            if way not in FENCED:
                list(on_threads.map(lambda copy: copies.export(copy).stop_serving(), copy_volumes))
            if way == "applianced-no-udev":
                subprocess.run(["udevadm", "control", "--stop-exec-queue"], check=True)
            if way == "fenced-by-reload-serial":
                dm.DeviceMapper._call = locked_call
            began = time.monotonic()
            try:
                if way in FENCED:
                    list(on_threads.map(fences[way], copy_volumes))
                    fenced = time.monotonic() - began
                start = starts.get(way, take_over)
                list(on_threads.map(lambda copy, start=start: first_write(start(copy)), copy_volumes))
                seconds[way].append(time.monotonic() - began)
            finally:
                dm.DeviceMapper._call = unlocked_call
                subprocess.run(["udevadm", "control", "--start-exec-queue"], check=True)
            if way in FENCED:
                seconds[f"{way}: the fences"] = [*seconds.get(f"{way}: the fences", []), fenced]
                list(on_threads.map(lambda copy: copies.export(copy).stop_serving(), copy_volumes))
            subprocess.run(["udevadm", "settle"], check=True)
            # Copies again, for the next way.
            list(on_threads.map(lambda copy: copies.mirror(copy).stop_array(), copy_volumes))
            for i, copy in enumerate(copy_volumes):
                copies.export(copy).assemble("127.0.0.1", PORT + i)
            print(f"{way}: {seconds[way][-1]:.2f} s for {arrays} arrays", file=sys.stderr, flush=True)
    return seconds


# -- on the host ----------------------------------------------------------------------


def table(seconds: dict[str, list[float]], arrays: int, baseline: str) -> str:
    base = statistics.median(seconds[baseline])
    lines = [
        f"| way | {arrays} arrays s | per array s | vs {baseline} |",
        "|---|---:|---:|---:|",
    ]
    for way, samples in seconds.items():
        total = statistics.median(samples)
        lines.append(f"| {way} | {total:.2f} | {total / arrays:.3f} | {total / base:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import one_guest
    from tests.vm.appliance import UDEV_RULES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arrays", type=int, default=64)
    parser.add_argument("--workers", type=int, default=5, help="threads (the daemon's pool on one vCPU: 5)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--ways", default=",".join(WAYS), help=f"some of {', '.join(WAYS)}, in this order")
    parser.add_argument("--baseline", help="the way the ratios are to (mdadm, else the first of --ways)")
    parser.add_argument("--output", type=Path, help="every sample, as JSON")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ways = args.ways.split(",")
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        parser.error(f"unknown way(s): {', '.join(unknown)}")
    baseline = args.baseline or ("mdadm" if "mdadm" in ways else ways[0])
    if baseline not in ways:
        parser.error(f"the baseline {baseline} is not among --ways")
    if args.in_guest:
        print(json.dumps(in_guest(args.arrays, args.workers, args.rounds, ways)))
        return 0

    def prepare(guest: Guest) -> None:
        guest.setup_storage()
        for rule in UDEV_RULES:
            guest.write_file(f"/etc/udev/rules.d/{rule.name}", rule.read_bytes(), mode=0o644)
        guest.run("udevadm control --reload")

    logs = Path(tempfile.mkdtemp(prefix="bench-array-start-"))
    arguments = [
        "--in-guest",
        f"--arrays={args.arrays}",
        f"--workers={args.workers}",
        f"--rounds={args.rounds}",
        f"--ways={args.ways}",
    ]
    seconds = one_guest.run("bench-array-start", logs, __file__, arguments, prepare, cpus=args.cpus)
    print(table(seconds, args.arrays, baseline))
    one_guest.keep(args, seconds, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
