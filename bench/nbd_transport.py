"""Benchmark: the replication bridge's NBD transport alone, by server setting and number of
connections, against DRBD protocol C, on the same guests and disks.

Two QEMU guests (the VM harness, TCG, one vCPU each, as bench/replication.py's nodes) on a
bridge inside a test-made namespace, each with one 512 MiB virtio disk on a sparse host
file. Node b serves its disk; node a writes to it with fio, direct I/O, straight on the
device (no md, no iSCSI: what those add is the same for every variant here):

* ``qemu-nbd``: the daemon's own server command (``bridge.server_command``: O_DIRECT,
  ``--aio=native``), one connection of the kernel's NBD client, as a mirror's leg has;
* ``qemu-nbd-io_uring``, ``qemu-nbd-threads``: the same with qemu's other AIO engines;
* ``qemu-nbd-2conn``, ``qemu-nbd-4conn``: the daemon's server, the client with 2 or 4
  connections (``nbd-client -C``), if the server advertises multi-connection (``nbdinfo``
  says; the variant is refused otherwise);
* ``drbd-C``: DRBD 8.4 protocol C over the same two disks (bench/replication.py's
  resource), fio on ``/dev/drbd0`` of node a;
* ``local``: node a's disk alone.

Per variant, the median of ``--repeat`` rounds (variants interleaved, forward then
backward): 1 MiB sequential writes at queue depth 8 and the mean completion latency of
4 KiB random writes at queue depth 1; and node b's CPU busy share during the sequential job
(the server's node: one vCPU for the guest kernel, the network and the server). Ratios are
to ``drbd-C``. Run as root from the checkout, after ``tools/setup``:

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/nbd_transport.py [--repeat 2]
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from applianced.replication.bridge import server_command
from bench.replication import (
    DISK_SIZE,
    HB,
    drbd_down,
    drbd_up,
    interleaved,
    latency,
    log,
    measured,
    measuring_arguments,
    sequential,
    table,
    variants_of,
)
from tests.vm.harness import Disk, Guest, Lab, Nic, start_all

PORT = 10809
EXPORT = "vol"
DEVICE = "/dev/disk/by-id/virtio-vol"
PID_FILE = "/run/bench-nbd.pid"
NBD_TIMEOUT = 5


class Transport:
    def __init__(self, a: Guest, b: Guest) -> None:
        self.a, self.b = a, b
        for name, guest in (("a", a), ("b", b)):
            guest.run(f"hostname {name} && modprobe -a nbd drbd loop")

    # -- the variants: each gives node a's device to write to, and how to take it down ----

    def nbd(self, aio: str = "native", connections: int = 1) -> tuple[str, Callable[[], None]]:
        command = server_command(EXPORT, DEVICE, HB["b"], PORT, Path(PID_FILE))
        command = [f"--aio={aio}" if arg.startswith("--aio=") else arg for arg in command]
        self.b.run(shlex.join(command))
        if connections > 1:
            flags = self.a.run(["nbdinfo", f"nbd://{HB['b']}:{PORT}/{EXPORT}"]).stdout
            if "can_multi_conn: true" not in flags:
                self.b.run(f"kill $(cat {PID_FILE})")
                raise SystemExit(f"the server does not advertise multi-connection:\n{flags}")
        client = ["nbd-client", HB["b"], str(PORT), "/dev/nbd0", "-N", EXPORT, "-b", "4096"]
        self.a.run([*client, "-t", str(NBD_TIMEOUT), "-C", str(connections)])

        def down() -> None:
            self.a.run("nbd-client -d /dev/nbd0")
            self.b.run(f"pid=$(cat {PID_FILE}); kill $pid; while kill -0 $pid 2>/dev/null; do sleep 0.1; done")

        return "/dev/nbd0", down

    def drbd(self) -> tuple[str, Callable[[], None]]:
        drbd_up(self.a, self.b, "C")
        self.a.run("drbdadm -- --clear-bitmap new-current-uuid r0 && drbdadm primary r0")
        self.a.wait_until("drbdadm dstate r0 | grep -qx UpToDate/UpToDate", timeout=120)
        return "/dev/drbd0", lambda: drbd_down(self.a, self.b)

    def local(self) -> tuple[str, Callable[[], None]]:
        return DEVICE, lambda: None

    # -- measurements -------------------------------------------------------------------

    def measure(self, device: str, seq_size: int, lat_seconds: int) -> dict[str, float]:
        before = self._cpu_times(self.b)
        seq = sequential(self.a, device, seq_size)
        after = self._cpu_times(self.b)
        busy = 1 - (after[1] - before[1]) / max(after[0] - before[0], 1)
        return {"seq_mb_s": seq, "lat_ms": latency(self.a, device, lat_seconds), "b_busy": busy}

    @staticmethod
    def _cpu_times(guest: Guest) -> tuple[int, int]:
        """All of the guest's CPU time and its idle part (idle and iowait), in ticks."""
        fields = [int(n) for n in guest.run("head -n 1 /proc/stat").stdout.split()[1:]]
        return sum(fields), fields[3] + fields[4]


VARIANTS: dict[str, Callable[[Transport], tuple[str, Callable[[], None]]]] = {
    "local": lambda t: t.local(),
    "qemu-nbd": lambda t: t.nbd(),
    "qemu-nbd-io_uring": lambda t: t.nbd(aio="io_uring"),
    "qemu-nbd-threads": lambda t: t.nbd(aio="threads"),
    "qemu-nbd-2conn": lambda t: t.nbd(connections=2),
    "qemu-nbd-4conn": lambda t: t.nbd(connections=4),
    "drbd-C": lambda t: t.drbd(),
}


def main(argv: list[str] | None = None) -> int:
    parser = measuring_arguments(__doc__.splitlines()[0], list(VARIANTS), repeat=2)
    args = parser.parse_args(argv)
    names = variants_of(parser, args)

    logs = Path(tempfile.mkdtemp(prefix="bench-nbd-"))
    with Lab(bridges=("hb",)) as lab:
        guests = [
            Guest(
                f"bench-{name}",
                logs / name,
                cpus=1,
                memory="1536M",
                disks=[Disk("vol", DISK_SIZE)],
                nics=[Nic("hb", f"{HB[name]}/24")],
                lab=lab,
            )
            for name in ("a", "b")
        ]
        try:
            start_all(guests)
            transport = Transport(*guests)
            results, samples = interleaved(
                names,
                args.repeat,
                lambda name: measured(
                    VARIANTS[name](transport),
                    lambda device: transport.measure(device, args.seq_size, args.lat_seconds),
                ),
            )
        finally:
            for guest in guests:
                guest.stop()
    print(table(results, {"b_busy": "node b busy"}))
    if args.output:
        args.output.write_text(json.dumps({"samples": samples, "medians": results}, indent=2))
    log(f"guest logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
