"""Profile, in one guest, where the reconcile and its reference points spend their time.

For N targets built like bench/config_apply.py builds them (one 1 GiB sparse fileio LUN and
one ACL each, one portal), this runs under cProfile, inside a QEMU guest booted by the VM
harness:

* the engine's restore (LIO empty): ``observe`` and ``apply`` profiled separately;
* the engine's no-op (LIO intact): ``observe``;
* the plain rtslib loop of config_apply.py, with Debian's rtslib and with the venv's;
* ``python -X importtime`` of ``applianced.daemon`` and ``applianced.cli.main``.

cProfile slows Python down, so these show shares, not speeds: bench/config_apply.py gives
the times. The reconcile is profiled in the calling thread (the daemon runs it in a worker
thread, which cProfile would not see), with the same open/observe/plan/apply steps as
``Appliance._reconcile``. Outputs (``.prof`` files for ``pstats``, text summaries, import
times) go to ``--output`` on the host.

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/profile_reconcile.py [--targets 50]
"""

from __future__ import annotations

import argparse
import contextlib
import pstats
import sys
import time
from pathlib import Path

from bench.config_apply import DEBIAN_PY, DISK_SIZE, GEN, INITIATOR, PORTAL, RTSLIB_LOOP, VENV_PY
from tests.vm.appliance import ApplianceNode
from tests.vm.harness import GUEST_SHARED_DIR, REPO_ROOT, Guest

WORK = "/tmp/profile"
OUT = f"{GUEST_SHARED_DIR}/profile"
STATE_DIR = "/var/lib/applianced"

# venv python: the export document becomes the state file, as an import would store it.
STORE = r"""
import json, sys
from pathlib import Path
from applianced.state import Config, StateStore
doc = json.loads(Path(sys.argv[1]).read_text())
doc.pop("format")
StateStore(Path(sys.argv[2]), "state.json").save(Config.from_json(doc))
"""

# venv python: the engine's reconcile steps, observe and apply each under its own profile.
RECONCILE = r"""
import cProfile, json, sys, time
from pathlib import Path
from applianced.iscsi.kernel.lio import LioKernel
from applianced.iscsi.kernel.model import render
from applianced.iscsi.kernel.plan import plan
from applianced.state import StateStore
state_dir, out = Path(sys.argv[1]), sys.argv[2]
desired = StateStore(state_dir, "state.json").load()
kernel = LioKernel()
kernel.open()
wanted = render(desired)
names = (sorted(desired.disks), sorted(t.iqn for t in desired.targets.values()), wanted.disk_devices)
times = {}
profile = cProfile.Profile()
t = time.monotonic()
profile.runcall(kernel.observe, *names)
times["observe"] = time.monotonic() - t
profile.dump_stats(f"{out}-observe.prof")
actions = plan(kernel.observe(*names), wanted)
times["actions"] = len(actions)
if actions:
    profile = cProfile.Profile()
    t = time.monotonic()
    profile.runcall(kernel.apply, actions)
    times["apply"] = time.monotonic() - t
    profile.dump_stats(f"{out}-apply.prof")
print(json.dumps(times))
"""

# Counts in configfs must equal N after each build (targets, LUNs, mapped LUNs).
COUNT = "ls -d /sys/kernel/config/target/iscsi/iqn.*/tpgt_1/lun/lun_* | wc -l"


def summary(prof: Path, lines: int = 35) -> str:
    """The top functions by own time and by cumulative time, as text."""
    out = []
    for key in ("tottime", "cumulative"):
        stream = _Capture()
        stats = pstats.Stats(str(prof), stream=stream)
        stats.strip_dirs().sort_stats(key).print_stats(lines)
        out.append(stream.text)
    return "\n".join(out)


class _Capture:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> None:
        self.parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--output", type=Path, default=None, help="default: test-logs/profile-reconcile-<time>")
    args = parser.parse_args(argv)
    n = args.targets
    output = args.output or REPO_ROOT / "test-logs" / time.strftime("profile-reconcile-%Y%m%d-%H%M%S")
    guest = Guest("profile", output / "guest", memory="2G", cpus=2)
    try:
        guest.start()
        ApplianceNode(guest).prepare()
        guest.run(f"mkdir -p {WORK} {OUT}")
        for name, text in (("gen", GEN), ("store", STORE), ("reconcile", RECONCILE), ("loop", RTSLIB_LOOP)):
            guest.write_file(f"{WORK}/{name}.py", text, mode=0o644)
        doc, spec = f"{WORK}/export.json", f"{WORK}/spec.json"
        guest.run(
            [VENV_PY, f"{WORK}/gen.py", str(n), f"{STATE_DIR}/disks", str(DISK_SIZE), doc, spec, PORTAL, INITIATOR],
            timeout=600,
        )
        guest.run([VENV_PY, f"{WORK}/store.py", doc, STATE_DIR])

        def step(label: str, cmd: list[str]) -> None:
            result = guest.run(cmd, timeout=1800)
            print(f"{label}: {result.duration:.1f}s {result.stdout.strip()}", flush=True)

        step("restore", [VENV_PY, f"{WORK}/reconcile.py", STATE_DIR, f"{OUT}/restore"])
        assert int(guest.run(COUNT).stdout) == n
        step("no-op", [VENV_PY, f"{WORK}/reconcile.py", STATE_DIR, f"{OUT}/noop"])
        for label, python in (("loop-debian", DEBIAN_PY), ("loop-venv", VENV_PY)):
            guest.run("targetctl clear", timeout=1800)
            step(label, [python, "-m", "cProfile", "-o", f"{OUT}/{label}.prof", f"{WORK}/loop.py", spec])
            assert int(guest.run(COUNT).stdout) == n
        for module in ("applianced.daemon", "applianced.cli.main"):
            result = guest.run([VENV_PY, "-X", "importtime", "-c", f"import {module}"], cwd="/")
            (output / f"importtime-{module}.txt").write_text(result.stderr)
    finally:
        with contextlib.suppress(Exception):
            guest.stop()
    shared = guest.shared_dir / "profile"
    for prof in sorted(shared.glob("*.prof")):
        (output / f"{prof.stem}.txt").write_text(summary(prof))
        prof.replace(output / prof.name)
    print(f"profiles in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
