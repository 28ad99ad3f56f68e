"""The replication monitor's look at an array, this checkout's against a baseline's, in one
guest with N idle raid1 arrays.

The monitor reads every source array's state from md's sysfs each second
(``md.Array.status``); with 64 mirrors that cost a node half of its TCG vCPU. In one QEMU
guest booted by the VM harness (Debian's 6.1 kernel, TCG, one vCPU), N raid1 arrays are
made with mdadm as the bridge makes its mirrors (two legs of 8 MiB sparse files on loop
devices, the second write-mostly, an internal bitmap of 64 KiB regions, in sync and idle:
a node carrying N quiet mirrors). Each round times one look at all N arrays with this
checkout's ``applianced/blockdev/md.py`` and with the baseline's (``git show
REV:applianced/blockdev/md.py``), alternating which goes first; printed: the median time
of a look at one array for each and their ratio, and the CPU time the look at N arrays
takes (what a pass of the monitor costs the node, before its own bookkeeping).

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/monitor_look.py --baseline REV \\
        [--arrays 64] [--rounds 20] [--output FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

LEG_SIZE = 8 << 20
WORK = Path("/tmp/monitor-look")


def in_guest(baseline_file: Path, arrays: int, rounds: int) -> dict[str, list[float]]:
    from applianced.blockdev import md

    spec = importlib.util.spec_from_file_location("md_baseline", baseline_file)
    assert spec and spec.loader
    baseline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = baseline  # its dataclasses look their module up there
    spec.loader.exec_module(baseline)
    WORK.mkdir(exist_ok=True)
    names = []
    for i in range(arrays):
        legs = []
        for side in ("local", "peer"):
            path = WORK / f"{i}-{side}.img"
            with open(path, "wb") as f:
                f.truncate(LEG_SIZE)
            legs.append(
                subprocess.run(
                    ["losetup", "-f", "--show", str(path)], check=True, capture_output=True, text=True
                ).stdout.strip()
            )
        node = f"/dev/md{100 + i}"
        create = ["mdadm", "--create", node, "--run", "--quiet", "--level=1", "--raid-devices=2", "--metadata=1.2"]
        bitmap = ["--assume-clean", "--bitmap=internal", "--bitmap-chunk=64K"]
        subprocess.run([*create, *bitmap, legs[0], "--write-mostly", legs[1]], check=True, capture_output=True)
        names.append(node.removeprefix("/dev/"))
    subprocess.run(["udevadm", "settle"], check=False)

    def look(module: ModuleType) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for name in names:
            module.Array(name).status()
        return time.perf_counter() - wall, time.process_time() - cpu

    samples: dict[str, list[float]] = {"current": [], "baseline": [], "current_cpu": [], "baseline_cpu": []}
    for round_ in range(rounds):
        order = [("current", md), ("baseline", baseline)]
        for label, module in order if round_ % 2 == 0 else reversed(order):
            wall, cpu = look(module)
            samples[label].append(wall)
            samples[f"{label}_cpu"].append(cpu)
    return samples


def main(argv: list[str] | None = None) -> int:
    from bench import one_guest
    from tests.vm.harness import REPO_ROOT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="the commit whose md.py is compared (required on the host)")
    parser.add_argument("--arrays", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--output", type=Path, help="every sample, as JSON")
    parser.add_argument("--in-guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        print(json.dumps(in_guest(args.in_guest, args.arrays, args.rounds)))
        return 0
    if not args.baseline:
        parser.error("--baseline REV is required")
    logs = Path(tempfile.mkdtemp(prefix="bench-monitor-look-"))
    baseline_file = logs / "md_baseline.py"
    baseline_file.write_text(
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "show", f"{args.baseline}:applianced/blockdev/md.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    arguments = [f"--in-guest={baseline_file}", f"--arrays={args.arrays}", f"--rounds={args.rounds}"]
    samples = one_guest.run(
        "bench-monitor-look",
        logs / "guest",
        __file__,
        arguments,
        lambda guest: guest.run(["modprobe", "-a", "md_mod", "raid1", "loop"]),
    )
    per_array = {label: statistics.median(samples[label]) / args.arrays * 1000 for label in ("current", "baseline")}
    cpu = {label: statistics.median(samples[f"{label}_cpu"]) for label in ("current", "baseline")}
    print(f"{args.arrays} idle arrays, {args.rounds} rounds, medians; baseline {args.baseline}")
    print("| md.py | one array's look, ms | ratio | CPU s for all arrays |")
    print("|---|---:|---:|---:|")
    for label in ("baseline", "current"):
        ratio = per_array[label] / per_array["baseline"]
        print(f"| {label} | {per_array[label]:.2f} | {ratio:.2f} | {cpu[label]:.3f} |")
    one_guest.keep(args, samples, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
