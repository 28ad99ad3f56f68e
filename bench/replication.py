"""Benchmark: the replication bridge against DRBD, on the same two guests and the same disks.

Two QEMU guests (the VM harness, TCG) on a bridge inside a test-made namespace, each with
one virtio disk on a sparse host file. On the source, fio writes straight to the device
each variant gives (no iSCSI in between: the initiator path adds the same to every
variant, and this measures the replication data path itself):

* ``local``: the source's disk alone, unreplicated;
* ``bridge-1``, ``bridge-2``, ``bridge-4``: applianced's bridge (dm-raid raid1 over NBD,
  qemu-nbd on the target) with one, two and four NBD connections;
* ``nbd-1``: the transport alone, fio on the NBD device of the peer's export (one
  connection), no raid above it: the ceiling of the bridge's peer leg;
* ``drbd-C``, ``drbd-A``: DRBD 8.4 (the guest kernel's module, drbd-utils) with protocol C
  (synchronous) and A (asynchronous), ``max-buffers``/``max-epoch-size`` 8000.

Every replicated variant starts from a pair declared in sync (no initial copy) and its
metadata on a loop device over a file in the guest's RAM; the same disks are reused, one
variant after the other, torn down between them. Two figures per variant, each the median
of ``--repeat`` rounds, the variants interleaved in every round (forward, then backward) so
that a slow phase of the host hits all of them alike:

* ``seq MB/s``: 1 MiB sequential writes, queue depth 8, ``--seq-size`` bytes, direct I/O;
* ``4k lat ms``: mean completion latency of 4 KiB random writes at queue depth 1 for
  ``--lat-seconds`` seconds, direct I/O.

Ratios are to ``drbd-C``. Under emulation absolute numbers mean little; the ratios of
one run are the result. Run as root from the checkout, after ``tools/setup``:

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/replication.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.vm.appliance import VENV_BIN
from tests.vm.harness import Disk, Guest, Lab, Nic, start_all

MIB = 1 << 20
DISK_SIZE = 512 * MIB
ADDRESSES = {"source": "10.99.0.1", "target": "10.99.0.2"}
STATE_DIR = "/var/lib/applianced"
DRBD_META = "/run/drbd-meta.img"

DRBD_RESOURCE = """
resource r0 {{
  protocol {protocol};
  net {{ max-buffers 8000; max-epoch-size 8000; }}
  on source {{ device /dev/drbd0; disk {disk}; address {source}:7789; meta-disk {meta}; }}
  on target {{ device /dev/drbd0; disk {disk}; address {target}:7789; meta-disk {meta}; }}
}}
"""

BRIDGE = """
import pathlib, sys, time
from applianced.replication.bridge import DeviceMapper, Export, Mirror, PeerEndpoint, Volume
role, action, disk, connections = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
volume = Volume("bench", disk, {size})
state = pathlib.Path("{state}")
if role == "target":
    export = Export(volume, state, DeviceMapper())
    export.assemble("{target}") if action == "up" else export.disassemble()
else:
    mirror = Mirror(volume, state, DeviceMapper())
    if action == "up":
        mirror.assemble(PeerEndpoint("{target}", connections=connections), copy_all=False)
        print(mirror.device)
    else:
        mirror.disassemble()
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Pair:
    def __init__(self, source: Guest, target: Guest) -> None:
        self.source, self.target = source, target
        self.nodes = {"source": source, "target": target}
        for name, guest in self.nodes.items():
            guest.run(f"hostname {name} && modprobe -a dm_mod dm_raid loop drbd && modprobe nbd nbds_max=4")
            guest.run(f"mkdir -p {STATE_DIR} && mount -t tmpfs tmpfs {STATE_DIR}")
        self.disk = source.disk_device("vol")
        assert target.disk_device("vol") == self.disk

    # -- variants: each returns the device fio writes to, and a teardown ------------------

    def local(self):
        return self.disk, lambda: None

    def bridge(self, connections: int):
        script = BRIDGE.format(size=DISK_SIZE, state=STATE_DIR, target=ADDRESSES["target"])

        def run(guest: Guest, role: str, action: str) -> str:
            argv = [str(VENV_BIN / "python"), "-c", script, role, action, self.disk, str(connections)]
            return guest.run(argv, cwd="/", timeout=600).stdout.strip()

        run(self.target, "target", "up")
        device = run(self.source, "source", "up")

        def down() -> None:
            run(self.source, "source", "down")
            run(self.target, "target", "down")
            for guest in self.nodes.values():
                guest.run(f"rm -rf {STATE_DIR}/replication")

        return device, down

    def nbd(self, connections: int):
        """The transport alone: the peer's export through the NBD client, no raid above it."""
        script = BRIDGE.format(size=DISK_SIZE, state=STATE_DIR, target=ADDRESSES["target"])
        argv = [str(VENV_BIN / "python"), "-c", script, "target"]
        self.target.run([*argv, "up", self.disk, "1"], cwd="/", timeout=600)
        self.source.run(
            f"nbd-client {ADDRESSES['target']} 10809 /dev/nbd3 -N bench -b 4096 -t 5 -C {connections}", timeout=120
        )

        def down() -> None:
            self.source.run("nbd-client -d /dev/nbd3")
            self.target.run([*argv, "down", self.disk, "1"], cwd="/", timeout=600)
            self.target.run(f"rm -rf {STATE_DIR}/replication")

        return "/dev/nbd3", down

    def drbd(self, protocol: str):
        resource = DRBD_RESOURCE.format(
            protocol=protocol, disk=self.disk, meta="/dev/loop7", source=ADDRESSES["source"], target=ADDRESSES["target"]
        )
        for guest in self.nodes.values():
            guest.write_file("/etc/drbd.d/r0.res", resource)
            guest.run(
                f"truncate -s 16M {DRBD_META} && losetup /dev/loop7 {DRBD_META}"
                " && yes yes | drbdadm create-md --force r0 && drbdadm up r0",
                timeout=300,
            )
        self.source.wait_until("drbdadm cstate r0 | grep -qx Connected", timeout=120)
        # Declared in sync, as the bridge variants are (no initial copy).
        self.source.run("drbdadm -- --clear-bitmap new-current-uuid r0 && drbdadm primary r0")
        self.source.wait_until("drbdadm dstate r0 | grep -qx UpToDate/UpToDate", timeout=120)

        def down() -> None:
            for guest in self.nodes.values():
                guest.run(f"drbdadm down r0 && losetup -d /dev/loop7 && rm -f {DRBD_META}", timeout=300)

        return "/dev/drbd0", down

    # -- measurements -------------------------------------------------------------------

    def fio(self, device: str, job: list[str]) -> dict[str, Any]:
        argv = ["fio", "--name=bench", f"--filename={device}", "--direct=1", "--ioengine=libaio"]
        out = self.source.run([*argv, *job, "--output-format=json"], timeout=1200).stdout
        return json.loads(out)["jobs"][0]["write"]

    def measure(self, device: str, seq_size: int, lat_seconds: int) -> dict[str, float]:
        seq = self.fio(device, ["--rw=write", "--bs=1M", "--iodepth=8", f"--size={seq_size}"])
        lat = self.fio(
            device,
            ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--runtime={lat_seconds}", "--time_based", "--size=256M"],
        )
        return {"seq_mb_s": seq["bw_bytes"] / 1e6, "lat_ms": lat["clat_ns"]["mean"] / 1e6}


VARIANTS = {
    "local": lambda pair: pair.local(),
    "bridge-1": lambda pair: pair.bridge(1),
    "bridge-2": lambda pair: pair.bridge(2),
    "bridge-4": lambda pair: pair.bridge(4),
    "nbd-1": lambda pair: pair.nbd(1),
    "drbd-C": lambda pair: pair.drbd("C"),
    "drbd-A": lambda pair: pair.drbd("A"),
}


def table(results: dict[str, dict[str, float]]) -> str:
    base = results["drbd-C"]
    lines = [
        "| variant | seq write MB/s | vs drbd-C | 4K QD1 latency ms | vs drbd-C |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['seq_mb_s']:.1f} | {r['seq_mb_s'] / base['seq_mb_s']:.2f} "
            f"| {r['lat_ms']:.2f} | {r['lat_ms'] / base['lat_ms']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each figure is their median")
    parser.add_argument("--seq-size", type=int, default=256 * MIB, help="bytes written by the sequential job")
    parser.add_argument("--lat-seconds", type=int, default=15, help="duration of the latency job")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--output", type=Path, help="raw samples as JSON")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if "drbd-C" not in names:
        parser.error("drbd-C is the baseline of every ratio")

    logs = Path(tempfile.mkdtemp(prefix="bench-replication-"))
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with Lab(bridges=("repl",)) as lab:
        guests = [
            Guest(
                name,
                logs / name,
                cpus=1,
                memory="1536M",
                disks=[Disk("vol", DISK_SIZE)],
                nics=[Nic("repl", f"{address}/24")],
                lab=lab,
            )
            for name, address in ADDRESSES.items()
        ]
        try:
            start_all(guests)
            pair = Pair(*guests)
            for round_ in range(args.repeat):
                for name in names if round_ % 2 == 0 else reversed(names):
                    device, down = VARIANTS[name](pair)
                    try:
                        sample = pair.measure(device, args.seq_size, args.lat_seconds)
                    finally:
                        down()
                    log(f"round {round_ + 1} {name}: {sample}")
                    samples[name].append(sample)
        finally:
            for guest in guests:
                guest.stop()
    results = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()
    }
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps({"samples": samples, "medians": results}, indent=2))
    log(f"guest logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
