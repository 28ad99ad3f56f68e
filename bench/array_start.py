"""Starting a takeover's md arrays: applianced's start through sysfs against mdadm, and
what udev's handling of each new array costs, in one guest.

In one QEMU guest booted by the VM harness (Debian's 6.1 kernel, TCG, ``--cpus`` vCPUs,
udev running with the storage node's rule, as on a node), N mirrors of 8 MiB file disks are
built with the bridge's own code, each copy served by qemu-nbd on loopback; then the
sources are stopped, as a crashed node's are gone. Each round takes the N copies over as a
takeover does (their exports stopped, their arrays started on ``--workers`` threads, the
daemon's pool on one vCPU) and stops the arrays again, for each way in turn:

* ``applianced``: ``Mirror.start``, the daemon's start through md's sysfs;
* ``mdadm``: ``mdadm --assemble --run`` of the leg and ``mdadm --readwrite``, the way the
  daemon started them before (the baseline);
* ``applianced-no-udev``: ``Mirror.start`` with udev's event queue stopped for the round
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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 8 << 20
PORT = 20000
WAYS = ("applianced", "mdadm", "applianced-no-udev")
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

    def mdadm_start(copy: bridge.Volume) -> None:
        leg = f"/dev/mapper/{copies.mirror(copy).leg_name}"
        # A name of its own per array (c<i> gets md<200+i>): threads picking the lowest free
        # one would collide.
        md.mdadm("--assemble", f"/dev/md{200 + int(copy.name[1:])}", "--run", leg)
        md.mdadm("--readwrite", md.holder_array(leg).node)

    starts = {
        "applianced": lambda copy: copies.mirror(copy).start(0),
        "mdadm": mdadm_start,
        "applianced-no-udev": lambda copy: copies.mirror(copy).start(0),
    }
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            subprocess.run(["udevadm", "settle"], check=True)
            list(on_threads.map(lambda copy: copies.export(copy).stop_serving(), copy_volumes))
            if way == "applianced-no-udev":
                subprocess.run(["udevadm", "control", "--stop-exec-queue"], check=True)
            began = time.monotonic()
            try:
                list(on_threads.map(starts[way], copy_volumes))
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
    from tests.vm.appliance import UDEV_RULES, VENV_BIN
    from tests.vm.harness import REPO_ROOT, Guest, check_platform

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
    check_platform()
    logs = Path(tempfile.mkdtemp(prefix="bench-array-start-"))
    guest = Guest("bench-array-start", logs, memory="1536M", cpus=args.cpus)
    guest.start()
    try:
        guest.setup_storage()
        for rule in UDEV_RULES:
            guest.write_file(f"/etc/udev/rules.d/{rule.name}", rule.read_bytes(), mode=0o644)
        guest.run("udevadm control --reload")
        command = [
            str(VENV_BIN / "python"),
            str(Path(__file__).resolve()),
            "--in-guest",
            f"--arrays={args.arrays}",
            f"--workers={args.workers}",
            f"--rounds={args.rounds}",
        ]
        done = guest.run(command, timeout=3600, env={"PYTHONPATH": str(REPO_ROOT)})
    finally:
        guest.stop()
    seconds = json.loads(done.stdout.strip().splitlines()[-1])
    print(done.stderr.strip())
    print(table(seconds, args.arrays))
    if args.output:
        args.output.write_text(json.dumps({"arguments": vars(args) | {"output": str(args.output)}, "seconds": seconds}))
    print(f"guest logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
