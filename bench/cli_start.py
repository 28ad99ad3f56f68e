"""appliancectl's start-up: import time and wall time of calls, next to a baseline CLI.

The VM tier runs appliancectl many times inside TCG guests, where each start costs
seconds, nearly all of it Python starting and importing. This runs two CLIs side by
side, this checkout's and a baseline checkout's, each from its own virtual environment,
in alternation so that the host's load falls on both alike:

* ``import``: ``-X importtime`` of ``applianced.cli.main`` (its cumulative time), and
  whether asyncio or dbus_fast were among the modules;
* ``python -c pass``: the interpreter's own start in that environment, the floor;
* ``--help``, ``status`` and ``--json target list``: wall time of a whole run, against
  applianced on a private bus (in-memory kernel, as in tests/dbus) holding ``--targets``
  targets, each with a disk, a LUN and an ACL.

With ``--guest`` the same runs in one guest of the VM harness (tests/vm/harness.py; real
LIO, applianced from this checkout, its first slice configured), timed by the guest.

usage (as root, from the checkout)::

    git worktree add /work/cli-base BASE_COMMIT
    python3 -m venv /work/cli-base/.venv && /work/cli-base/.venv/bin/pip install -q -e /work/cli-base
    /work/cli-base/.venv/bin/python -m compileall -q /work/cli-base/applianced
    .venv/bin/python bench/cli_start.py --baseline /work/cli-base [--repeat 30] [--guest]

Both checkouts need their bytecode compiled (tools/setup does it for this one), or each
run compiles the CLI again. It prints a Markdown table of medians (and minima) in ms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.support.daemon import INITIATOR, Daemon  # noqa: E402
from tests.support.private_bus import PrivateBus  # noqa: E402

IMPORT = ["-X", "importtime", "-c", "import applianced.cli.main"]
HEAVY = ("asyncio", "dbus_fast")


def import_time(stderr: str) -> tuple[float, bool]:
    """The CLI's cumulative import time in ms, and whether a heavy module was imported."""
    rows = [line.split("|") for line in stderr.splitlines() if line.startswith("import time:")]
    names = {row[2].strip() for row in rows if len(row) == 3}
    total = next(int(row[1]) for row in reversed(rows) if row[2].strip() == "applianced.cli.main")
    return total / 1000, any(name.split(".")[0] in HEAVY for name in names)


class Side:
    """One CLI: a checkout and the virtual environment it runs from."""

    def __init__(self, label: str, checkout: Path) -> None:
        self.label = label
        self.python = checkout / ".venv" / "bin" / "python"
        self.cli = checkout / ".venv" / "bin" / "appliancectl"
        if not self.cli.exists():
            raise SystemExit(f"{self.cli} is missing: make {checkout}/.venv first (see --help)")
        self.samples: dict[str, list[float]] = {}
        self.heavy = False

    def add(self, measure: str, value: float) -> None:
        self.samples.setdefault(measure, []).append(value)


def wall_ms(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/")
    elapsed = (time.perf_counter() - start) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{command} failed ({done.returncode}): {done.stderr}")
    return elapsed


def alternate(sides: list[Side], repeat: int, measure: Callable[[Side], None]) -> None:
    for round_ in range(repeat):
        # Alternate who goes first as well: a cache warmed by one must not favour the other.
        for side in sides if round_ % 2 == 0 else reversed(sides):
            measure(side)


def host(sides: list[Side], repeat: int, targets: int) -> None:
    bus = PrivateBus(REPO_ROOT / "dbus" / "org.applianced.Appliance1.conf")
    bus.start()
    with tempfile.TemporaryDirectory() as directory:
        daemon = Daemon(bus.address, Path(directory))
        daemon.start()
        try:
            script = "".join(
                f"disk create d{i} 1M\ntarget create t{i}\nlun add t{i} d{i}\nacl add t{i} {INITIATOR}\n"
                for i in range(targets)
            )
            if script:
                configured = daemon.cli("batch", input=script)
                assert configured.returncode == 0, configured.stderr
            # Each side imports from its own environment only: no PYTHONPATH, and "/" as the
            # working directory (``-c`` puts it first on sys.path).
            env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
            env["DBUS_SYSTEM_BUS_ADDRESS"] = bus.address

            def measure(side: Side) -> None:
                done = subprocess.run([str(side.python), *IMPORT], env=env, capture_output=True, text=True, cwd="/")
                total, heavy = import_time(done.stderr)
                side.add("import", total)
                side.heavy |= heavy
                side.add("python -c pass", wall_ms([str(side.python), "-c", "pass"], env))
                side.add("--help", wall_ms([str(side.cli), "--help"], env))
                side.add("status", wall_ms([str(side.cli), "status"], env))
                side.add(
                    f"--json target list ({targets} targets)", wall_ms([str(side.cli), "--json", "target", "list"], env)
                )

            alternate(sides, repeat, measure)
        finally:
            daemon.stop()
            bus.stop()


def guest(sides: list[Side], repeat: int) -> None:
    from tests.vm.appliance import ApplianceNode
    from tests.vm.harness import Guest

    log_dir = REPO_ROOT / "test-logs" / time.strftime("bench-cli-start-%Y%m%d-%H%M%S")
    machine = Guest("bench-cli", log_dir)
    try:
        machine.start()
        node = ApplianceNode(machine).prepare()
        node.start()
        node.serve("64M", INITIATOR)

        def measure(side: Side) -> None:
            done = machine.run([str(side.python), *IMPORT])
            total, heavy = import_time(done.stderr)
            side.add("guest: import", total)
            side.heavy |= heavy
            side.add("guest: python -c pass", machine.run([str(side.python), "-c", "pass"]).duration * 1000)
            side.add("guest: --help", machine.run([str(side.cli), "--help"]).duration * 1000)
            side.add("guest: status", machine.run([str(side.cli), "status"]).duration * 1000)
            side.add(
                "guest: --json target list", machine.run([str(side.cli), "--json", "target", "list"]).duration * 1000
            )

        alternate(sides, repeat, measure)
    finally:
        machine.stop()
        print(f"guest logs: {log_dir}", file=sys.stderr)


def report(sides: list[Side]) -> None:
    baseline, candidate = sides
    print(f"| measure | {baseline.label} (ms) | {candidate.label} (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for measure, before in baseline.samples.items():
        after = candidate.samples[measure]
        ratio = statistics.median(after) / statistics.median(before)
        cells = [f"{statistics.median(values):.1f} (min {min(values):.1f})" for values in (before, after)]
        print(f"| {measure} | {cells[0]} | {cells[1]} | {ratio:.2f} |")
    for side in sides:
        print(f"\n{side.label}: asyncio or dbus_fast imported: {'yes' if side.heavy else 'no'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="a checkout with its own .venv")
    parser.add_argument("--repeat", type=int, default=30, help="runs of each measure per CLI on the host")
    parser.add_argument("--targets", type=int, default=50, help="targets configured for the host's target list")
    parser.add_argument("--guest", action="store_true", help="also measure in a TCG guest")
    parser.add_argument("--guest-repeat", type=int, default=5)
    args = parser.parse_args()
    sides = [Side("baseline", args.baseline.resolve()), Side("this checkout", REPO_ROOT)]
    host(sides, args.repeat, args.targets)
    if args.guest:
        guest(sides, args.guest_repeat)
    report(sides)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
