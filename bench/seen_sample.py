"""Benchmark: what one sample of the recently-seen-initiators watch costs with N targets.

The daemon samples every 5 s for as long as it runs, so this measures, in one QEMU guest
booted by the VM harness (Debian's kernel under TCG, like the VM tests), for N targets
that each have one ACL:

* ``full``: ``LioKernel.login_activity`` reading all seven configfs files per target (the
  first sample, and any target whose logins moved), with the boot id and the kernel log;
* ``steady``: the same call with the last reading given as ``known``, so that it reads two
  files per target whose totals did not move: what a sample without logins reads;
* ``sessions``: ``LioKernel.sessions`` of every target (configfs and the TCP table): what a
  sample reads every few minutes; after a login it reads only the targets with new logins;
* ``sample``: ``SeenInitiators.sample`` in the steady state (no login, no session read),
  i.e. the reading plus the bookkeeping, as the daemon runs it.

Each is the median of ``--repeat`` calls, timed with ``time.perf_counter`` in the guest.
No initiator logs in: the cost of a sample does not depend on the logins it finds, except
for the session read that a new login triggers (``sessions``). Run as root from the checkout:

    PYTHONPATH=. .venv/bin/python bench/seen_sample.py [--sizes 1,50,100,200] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tests.vm.appliance import VENV_BIN
from tests.vm.harness import REPO_ROOT, Guest

GUEST_SCRIPT = r"""
import json, statistics, sys, time
from pathlib import Path
import rtslib_fb
from applianced.iscsi.initiators import SeenInitiators
from applianced.iscsi.kernel.lio import LioKernel
from applianced.state import Config, Target

sizes, repeat = [int(n) for n in sys.argv[1].split(",")], int(sys.argv[2])
kernel = LioKernel()
kernel.open()
iqns = []

def median_ms(call, times):
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return round(statistics.median(samples) * 1000, 2)

for n in sizes:
    while len(iqns) < n:
        iqn = f"iqn.2026-11.org.applianced.bench:seen{len(iqns):04d}"
        tpg = rtslib_fb.TPG(rtslib_fb.Target(kernel.fabric, iqn), 1)
        rtslib_fb.NodeACL(tpg, f"iqn.2026-11.org.applianced.bench:client{len(iqns):04d}")
        iqns.append(iqn)
    last = kernel.login_activity(iqns, None, {})

    def full_read():
        global last
        last = kernel.login_activity(iqns, last.log_position, {})

    def steady_read():
        global last
        last = kernel.login_activity(iqns, last.log_position, last.counters)

    config = Config(node_id="bench", targets={f"t{i}": Target(f"t{i}", iqn) for i, iqn in enumerate(iqns)})
    path = Path(f"/tmp/seen-{n}.json")
    seen = SeenInitiators(kernel, path, lambda: config, monotonic=lambda: 0.0)
    seen.sample()  # the first sample reads the sessions; later ones (same clock) do not
    print(json.dumps({
        "targets": n,
        "full_ms": median_ms(full_read, repeat),
        "steady_ms": median_ms(steady_read, repeat),
        "sessions_ms": median_ms(lambda: [kernel.sessions(iqn) for iqn in iqns], max(3, repeat // 4)),
        "sample_ms": median_ms(seen.sample, repeat),
    }), flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,50,100,200")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--log-dir", type=Path, default=REPO_ROOT / "test-logs" / time.strftime("bench-seen-%Y%m%d-%H%M%S")
    )
    args = parser.parse_args()
    guest = Guest("bench-seen", args.log_dir, memory="2G", cpus=2)
    rows = []
    try:
        guest.start()
        guest.setup_storage()
        guest.write_file("/tmp/seen_bench.py", GUEST_SCRIPT)
        out = guest.run([str(VENV_BIN / "python"), "/tmp/seen_bench.py", args.sizes, str(args.repeat)], timeout=1800)
        rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    finally:
        guest.stop()
    print("| targets | full read (ms) | steady read (ms) | sample, steady state (ms) | sessions (ms) |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = (row["targets"], row["full_ms"], row["steady_ms"], row["sample_ms"], row["sessions_ms"])
        print("| " + " | ".join(str(cell) for cell in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
