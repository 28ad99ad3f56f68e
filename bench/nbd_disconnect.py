"""Taking a mirror's peer leg down: the kernel's NBD ioctls, as the daemon does, against
``nbd-client -d``, in one guest.

A planned switchover takes the peer's leg out of every source's array in the clients'
stall; with 64 mirrors, a process per device counts. In one QEMU guest booted by the VM
harness (Debian's 6.1 kernel, TCG, one vCPU), ``--devices`` copies of 8 MiB file disks are
served by the bridge's own exports (qemu-nbd, as on a node) on loopback. Each round, for
each way in turn (forward, then backward in the next round), every device is connected
with the daemon's ``nbd.connect`` (not timed), then disconnected one after the other and
timed:

* ``ioctls``: ``applianced.blockdev.nbd.disconnect`` (NBD_DISCONNECT, NBD_CLEAR_SOCK);
* ``nbd-client -d``: the baseline, one process per device.

After each way every device must be free again (no size, no client task), or the
benchmark stops. Printed: a Markdown table of the seconds per device (median over rounds
of each round's mean) and the ratio to ``nbd-client -d``; ``--output`` keeps every sample.

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/nbd_disconnect.py \\
        [--devices 16] [--rounds 4] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 8 << 20
PORT = 20000
WAYS = ("ioctls", "nbd-client -d")
STATE_DIR = Path("/var/lib/applianced")


# -- in the guest ---------------------------------------------------------------------


def in_guest(devices: int, rounds: int) -> dict[str, list[float]]:
    from applianced.blockdev import nbd
    from applianced.replication import bridge

    copies = bridge.DataPath(STATE_DIR)
    (copies.state_dir / "replication").mkdir(parents=True, exist_ok=True)
    copies.prepare()  # the modules: device-mapper, md, nbd
    for i in range(devices):
        disk = copies.state_dir / f"c{i}.img"
        with open(disk, "wb") as f:
            f.truncate(SIZE)
        copies.export(bridge.Volume(f"c{i}", str(disk), True, SIZE)).assemble("127.0.0.1", PORT + i, fresh=True)

    disconnect = {
        "ioctls": nbd.disconnect,
        "nbd-client -d": lambda device: subprocess.run(["nbd-client", "-d", device], check=True, capture_output=True),
    }
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for round_number in range(rounds):
        for way in WAYS if round_number % 2 == 0 else reversed(WAYS):
            connected = [nbd.connect("127.0.0.1", PORT + i, f"c{i}", 5) for i in range(devices)]
            began = time.monotonic()
            for device in connected:
                disconnect[way](device)
            seconds[way].append((time.monotonic() - began) / devices)
            # The device is free once the kernel's client task has gone.
            deadline = time.monotonic() + 30
            while any(nbd.connected(device) for device in connected):
                if time.monotonic() > deadline:
                    raise SystemExit(f"{way}: devices still connected after 30 s")
                time.sleep(0.1)
            print(f"{way}: {seconds[way][-1] * 1000:.1f} ms a device", file=sys.stderr, flush=True)
    return seconds


# -- on the host ----------------------------------------------------------------------


def table(seconds: dict[str, list[float]]) -> str:
    base = statistics.median(seconds["nbd-client -d"])
    lines = ["| way | ms per device | vs nbd-client -d | samples (ms) |", "|---|---:|---:|---|"]
    for way in WAYS:
        each = statistics.median(seconds[way])
        samples = ", ".join(f"{sample * 1000:.1f}" for sample in seconds[way])
        lines.append(f"| {way} | {each * 1000:.1f} | {each / base:.2f} | {samples} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench import one_guest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=Path, help="every sample, as JSON")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_guest:
        print(json.dumps(in_guest(args.devices, args.rounds)))
        return 0
    logs = Path(tempfile.mkdtemp(prefix="bench-nbd-disconnect-"))
    arguments = ["--in-guest", f"--devices={args.devices}", f"--rounds={args.rounds}"]
    seconds = one_guest.run("bench-nbd-disconnect", logs, __file__, arguments, lambda guest: guest.setup_storage())
    print(table(seconds))
    one_guest.keep(args, seconds, logs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
