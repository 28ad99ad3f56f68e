"""Benchmark: replicated volumes through iSCSI against DRBD, on the same guests and disks.

Three QEMU guests (the VM harness, TCG) on two bridges inside a test-made namespace: two
storage nodes, ``a`` and ``b``, each with one virtio disk on a sparse host file, paired
over the ``hb`` bridge; a client on ``lan`` writes with fio through iSCSI (open-iscsi) to
a LUN that node ``a`` serves with applianced. The LUN's disk is, in turn:

* ``local``: node a's disk alone, unreplicated (applianced's block disk on it);
* ``sync``, ``async``: the same disk mirrored to node b's by applianced (md raid1 over the
  kernel's NBD client, qemu-nbd on b), sync and async mode, 64 KiB per bitmap bit;
* ``sync-4M``: sync mode with 4 MiB per bitmap bit, the size of DRBD's activity-log
  extents: what md's bitmap updates (a flushed write to both legs on a region's first
  write) cost the writes;
* ``drbd-C``, ``drbd-A``: DRBD 8.4 (the guest kernel's module, drbd-utils 9) over the same
  two disks, protocol C (synchronous) and A (asynchronous), ``max-buffers`` and
  ``max-epoch-size`` 8000, with applianced serving ``/dev/drbd0`` as a block disk.

Every replicated variant starts from a pair declared in sync (no initial copy). Two
figures per variant, each the median of ``--repeat`` rounds, the variants interleaved in
every round (forward, then backward) so that a slow phase of the host hits all alike:
1 MiB sequential writes at queue depth 8 (``--seq-size`` bytes) and the mean completion
latency of 4 KiB random writes at queue depth 1 (``--lat-seconds``), direct I/O.

Then resyncs, applianced against DRBD protocol C on the same disks: a partial one (node b's
replication cable pulled while the client writes ``--dirty`` random 64 KiB regions, then
plugged back: time from the plug to in sync, and bytes node b's disk took, against the
dirty bytes), and a full one (``mirror resync`` against ``drbdadm invalidate-remote``).

With ``--volumes N`` it also makes N more mirrors of small disks and reports what a pair
carrying them costs: the time to make each, the qemu-nbd processes' memory on node b, the
daemons' CPU while idle, and the 4K latency of the first LUN meanwhile.

Ratios are to ``drbd-C``. Under emulation absolute numbers mean little; the ratios of one
run are the result. Run as root from the checkout, after ``tools/setup``:

    cd /work/main && PYTHONPATH=. .venv/bin/python bench/replication.py [--repeat 3] [--volumes 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.vm.appliance import UDEV_RULES, VENV_BIN, ApplianceNode
from tests.vm.harness import Disk, Guest, Lab, Nic, start_all

MIB = 1 << 20
REGION = 64 * 1024
DISK_SIZE = 512 * MIB
LAN = {"a": "10.70.0.1", "b": "10.70.0.2", "client": "10.70.0.10"}
HB = {"a": "10.71.0.1", "b": "10.71.0.2"}
INITIATOR = "iqn.2026-11.org.applianced.bench:client"
TARGET = "iqn.2003-01.org.linux-iscsi.applianced:t1"
DEVICE = "/dev/disk/by-id/virtio-vol"
DRBD_META = "/run/drbd-meta.img"
CTL = str(VENV_BIN / "appliancectl")

DRBD_RESOURCE = """
resource r0 {{
  protocol {protocol};
  net {{ max-buffers 8000; max-epoch-size 8000; }}
  disk {{ c-max-rate 400M; }}
  on a {{ device /dev/drbd0; disk {disk}; address {a}:7789; meta-disk {meta}; }}
  on b {{ device /dev/drbd0; disk {disk}; address {b}:7789; meta-disk {meta}; }}
}}
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fio(guest: Guest, device: str, job: list[str]) -> dict[str, Any]:
    """One fio job of direct writes to ``device`` in ``guest``: fio's figures of its writes."""
    argv = ["fio", "--name=bench", f"--filename={device}", "--direct=1", "--ioengine=libaio"]
    out = guest.run([*argv, *job, "--output-format=json"], timeout=1800).stdout
    return json.loads(out)["jobs"][0]["write"]


def sequential(guest: Guest, device: str, size: int) -> float:
    """MB/s of ``size`` bytes of 1 MiB sequential writes at queue depth 8."""
    return fio(guest, device, ["--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}"])["bw_bytes"] / 1e6


def latency(guest: Guest, device: str, seconds: int) -> float:
    """Mean completion latency (ms) of 4 KiB random writes at queue depth 1 for ``seconds``."""
    job = ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--runtime={seconds}", "--time_based", "--size=256M"]
    return fio(guest, device, job)["clat_ns"]["mean"] / 1e6


Samples = dict[str, list[dict[str, float]]]


def interleaved(
    names: list[str], repeat: int, run: Callable[[str], dict[str, float]]
) -> tuple[dict[str, dict[str, float]], Samples]:
    """``run`` each variant in each round, forward then backward in turn, so that a slow
    phase of the host hits all alike: each figure's median over the rounds, and every
    round's figures."""
    samples: Samples = {name: [] for name in names}
    for round_ in range(repeat):
        for name in names if round_ % 2 == 0 else reversed(names):
            samples[name].append(run(name))
            log(f"round {round_ + 1} {name}: {samples[name][-1]}")
    medians = {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]} for name, runs in samples.items()
    }
    return medians, samples


def measured(variant: tuple[str, Callable[[], None]], measure: Callable[[str], dict[str, float]]) -> dict[str, float]:
    """``measure`` the device a variant set up (``(device, down)``), then take it down."""
    device, down = variant
    try:
        return measure(device)
    finally:
        down()


def measuring_arguments(description: str, variants: list[str], repeat: int) -> argparse.ArgumentParser:
    """The options of a benchmark of write throughput and latency against ``drbd-C``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeat", type=int, default=repeat, help="rounds; each figure is their median")
    parser.add_argument("--seq-size", type=int, default=256 * MIB, help="bytes written by the sequential job")
    parser.add_argument("--lat-seconds", type=int, default=15, help="duration of the latency job")
    parser.add_argument("--variants", default=",".join(variants), help="comma-separated subset")
    parser.add_argument("--output", type=Path, help="raw samples as JSON")
    return parser


def variants_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    names = args.variants.split(",")
    if "drbd-C" not in names:
        parser.error("drbd-C is the baseline of every ratio")
    return names


def drbd_up(a: Guest, b: Guest, protocol: str) -> None:
    """DRBD resource r0 over each node's ``vol`` disk, its metadata in a loop file,
    connected (neither node primary yet)."""
    resource = DRBD_RESOURCE.format(
        protocol=protocol, disk=a.disk_device("vol"), meta="/dev/loop7", a=HB["a"], b=HB["b"]
    )
    for guest in (a, b):
        guest.write_file("/etc/drbd.d/r0.res", resource)
        guest.run(
            f"truncate -s 32M {DRBD_META} && losetup /dev/loop7 {DRBD_META}"
            " && yes yes | drbdadm create-md --force r0 && drbdadm up r0",
            timeout=300,
        )
    a.wait_until("drbdadm cstate r0 | grep -qx Connected", timeout=120)


def drbd_down(a: Guest, b: Guest) -> None:
    for guest in (a, b):
        guest.run(f"drbdadm down r0 && losetup -d /dev/loop7 && rm -f {DRBD_META}", timeout=300)


class Bench:
    def __init__(self, a: Guest, b: Guest, client: Guest) -> None:
        self.a, self.b = ApplianceNode(a).prepare(), ApplianceNode(b).prepare()
        self.client = client
        for name, node in (("a", self.a), ("b", self.b)):
            node.guest.run(f"hostname {name} && modprobe -a drbd")
            node.start()
        key = "7e" * 32
        for node, peer in ((self.a, "b"), (self.b, "a")):
            node.guest.write_file("/tmp/pair.key", key)
            node.ctl("pair", "create", HB[peer], "--aux-address", LAN[peer], "--key-file", "/tmp/pair.key")
        self.a.guest.wait_until(f"{CTL} pair status | grep -q 'connected: *yes'", timeout=120)
        self.a.ctl_batch(
            ("target", "create", "t1"),
            ("portal", "create", LAN["a"]),
            ("acl", "add", "t1", INITIATOR),
        )
        rule = UDEV_RULES[0]
        client.write_file(f"/etc/udev/rules.d/{rule.name}", rule.read_bytes(), mode=0o644)
        client.run("udevadm control --reload || true")
        client.start_iscsid(INITIATOR)
        self.initiator = ApplianceNode(client)
        self.initiator.discover(LAN["a"])

    # -- what the client writes to ------------------------------------------------------

    def serve(self, device: str, prepare: Callable[[], None] | None = None) -> str:
        """Node a serves ``device`` as LUN 0 of t1 (``prepare`` runs once the disk is made,
        before the LUN); the client's device for it."""
        self.a.ctl("disk", "create-block", "d1", device)
        if prepare:
            prepare()
        self.a.ctl("lun", "add", "t1", "d1")
        serial = next(d["serial"] for d in self.a.ctl_json("disk", "list") if d["name"] == "d1")
        self.initiator.login(TARGET, LAN["a"])
        return self.initiator.device_for_serial(serial, timeout=120)

    def unserve(self) -> None:
        self.initiator.logout(TARGET, LAN["a"])
        self.a.ctl_batch(("lun", "remove", "t1", "0", "--force"), ("disk", "delete", "d1"))

    def ours(self, mode: str | None, region: str = "64K"):
        def mirror() -> None:
            # Before the LUN: a disk that initiators use is not blank, and its sync is
            # not skipped.
            self.b.ctl("disk", "create-block", "c1", DEVICE)
            create = ["mirror", "create", "d1", mode, "--peer-disk", "c1", "--skip-initial-sync", "--region", region]
            self.a.ctl(*create)
            self.a.ctl("mirror", "wait", "d1", "--timeout", "300")

        device = self.serve(DEVICE, mirror if mode else None)

        def down() -> None:
            if mode:
                self.a.ctl("mirror", "delete", "d1")
                self.b.ctl("disk", "delete", "c1")
            self.unserve()

        return device, down

    def drbd(self, protocol: str):
        self.drbd_up(protocol)
        self.a.guest.run("drbdadm -- --clear-bitmap new-current-uuid r0 && drbdadm primary r0")
        self.a.guest.wait_until("drbdadm dstate r0 | grep -qx UpToDate/UpToDate", timeout=120)
        device = self.serve("/dev/drbd0")

        def down() -> None:
            self.unserve()
            self.drbd_down()

        return device, down

    def drbd_up(self, protocol: str) -> None:
        drbd_up(self.a.guest, self.b.guest, protocol)

    def drbd_down(self) -> None:
        drbd_down(self.a.guest, self.b.guest)

    # -- measurements -------------------------------------------------------------------

    def measure(self, device: str, seq_size: int, lat_seconds: int) -> dict[str, float]:
        return {"seq_mb_s": sequential(self.client, device, seq_size), "lat_ms": self.latency(device, lat_seconds)}

    def latency(self, device: str, seconds: int) -> float:
        return latency(self.client, device, seconds)

    def written(self, node: ApplianceNode) -> int:
        name = node.guest.run(["readlink", "-f", DEVICE]).stdout.strip().removeprefix("/dev/")
        return int(node.guest.run(f"cat /sys/block/{name}/stat").stdout.split()[6]) * 512

    def dirty(self, device: str, regions: list[int]) -> None:
        script = "; ".join(
            f"dd if=/dev/urandom of={device} bs={REGION} seek={r} count=1 oflag=direct status=none" for r in regions
        )
        self.client.run(script, timeout=1800)

    # -- resyncs ----------------------------------------------------------------------

    def resyncs(self, dirty_regions: int) -> dict[str, dict[str, float]]:
        regions = list(range(7, DISK_SIZE // REGION, (DISK_SIZE // REGION) // dirty_regions))[:dirty_regions]
        results = {}
        device, down = self.ours("sync")
        try:
            results["ours"] = self._resync(
                device,
                regions,
                wait=lambda: self.a.ctl("mirror", "wait", "d1", "--timeout", "1800"),
                full=lambda: self.a.ctl("mirror", "resync", "d1"),
            )
        finally:
            down()
        device, down = self.drbd("C")
        try:
            results["drbd-C"] = self._resync(
                device,
                regions,
                wait=lambda: self.a.guest.wait_until(
                    "drbdadm dstate r0 | grep -qx UpToDate/UpToDate", timeout=1800, interval=0.2
                ),
                full=lambda: self.a.guest.run("drbdadm invalidate-remote r0"),
            )
        finally:
            down()
        return results

    def _resync(self, device: str, regions: list[int], wait, full) -> dict[str, float]:
        b = self.b.guest
        b.set_link(up=False, slot=1)
        self.dirty(device, regions)
        # Both wait until the source noticed; the cable comes back when both have.
        time.sleep(20)
        before = self.written(self.b)
        b.set_link(up=True, slot=1)
        start = time.monotonic()
        wait()
        partial = time.monotonic() - start
        sent = self.written(self.b) - before
        before = self.written(self.b)
        start = time.monotonic()
        full()
        time.sleep(2)
        wait()
        whole = time.monotonic() - start
        copied = self.written(self.b) - before
        dirty = len(regions) * REGION
        return {
            "partial_s": partial,
            "partial_bytes": sent,
            "dirty_bytes": dirty,
            "bytes_per_dirty_byte": sent / dirty,
            "full_s": whole,
            "full_bytes": copied,
            "full_mb_s": copied / whole / 1e6,
        }

    # -- many volumes -------------------------------------------------------------------

    def volumes(self, count: int, lat_seconds: int) -> dict[str, float]:
        device, down = self.ours("sync")
        try:
            alone = self.latency(device, lat_seconds)
            start = time.monotonic()
            for index in range(count):
                name = f"v{index}"
                self.a.ctl_batch(("disk", "create", name, "16M"), ("mirror", "create", name, "sync"))
            made = time.monotonic() - start
            self.a.guest.wait_until(f"test $({CTL} mirror list | grep -c '1 mirroring') -ge {count + 1}", timeout=1800)
            rss = self.b.guest.run("ps -C qemu-nbd -o rss= | awk '{s+=$1} END {print s}'").stdout.strip()
            cpu = {name: self._daemon_cpu(node, 30) for name, node in (("a", self.a), ("b", self.b))}
            loaded = self.latency(device, lat_seconds)
            for index in range(count):
                self.a.ctl("mirror", "delete", f"v{index}")
        finally:
            down()
        return {
            "volumes": count,
            "create_s_per_mirror": made / count,
            "qemu_nbd_rss_mib": int(rss or 0) / 1024,
            "daemon_cpu_a": cpu["a"],
            "daemon_cpu_b": cpu["b"],
            "lat_ms_alone": alone,
            "lat_ms_with_volumes": loaded,
        }

    @staticmethod
    def _daemon_cpu(node: ApplianceNode, seconds: int) -> float:
        """Share of one CPU the daemon used over ``seconds`` while idle."""
        script = (
            "pid=$(pgrep -f 'python -m applianced$'); t0=$(awk '{print $14+$15}' /proc/$pid/stat); "
            f"sleep {seconds}; t1=$(awk '{{print $14+$15}}' /proc/$pid/stat); "
            f"echo $(( (t1 - t0) )) $(getconf CLK_TCK)"
        )
        ticks, hz = node.guest.run(script, timeout=seconds + 60).stdout.split()
        return int(ticks) / int(hz) / seconds


VARIANTS = {
    "local": lambda bench: bench.ours(None),
    "sync": lambda bench: bench.ours("sync"),
    "async": lambda bench: bench.ours("async"),
    "sync-4M": lambda bench: bench.ours("sync", region="4M"),
    "drbd-C": lambda bench: bench.drbd("C"),
    "drbd-A": lambda bench: bench.drbd("A"),
}


def table(results: dict[str, dict[str, float]], extra: dict[str, str] | None = None) -> str:
    """Throughput and latency of each variant and their ratios to ``drbd-C``; ``extra``:
    more figures, by key, under their headings (two decimals)."""
    extra = extra or {}
    base = results["drbd-C"]
    lines = [
        "| variant | seq write MB/s | vs drbd-C | 4K QD1 latency ms | vs drbd-C |"
        + "".join(f" {h} |" for h in extra.values()),
        "|---|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['seq_mb_s']:.1f} | {r['seq_mb_s'] / base['seq_mb_s']:.2f} "
            f"| {r['lat_ms']:.2f} | {r['lat_ms'] / base['lat_ms']:.2f} |" + "".join(f" {r[k]:.2f} |" for k in extra)
        )
    return "\n".join(lines)


def resync_table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| | partial resync s | bytes sent / dirty | full resync s | full MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['partial_s']:.1f} | {r['bytes_per_dirty_byte']:.2f} | {r['full_s']:.1f} "
            f"| {r['full_mb_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = measuring_arguments(__doc__.splitlines()[0], list(VARIANTS), repeat=3)
    parser.add_argument("--dirty", type=int, default=200, help="64 KiB regions written during the outage")
    parser.add_argument("--no-resync", action="store_true", help="skip the resync measurements")
    parser.add_argument("--volumes", type=int, default=0, help="also carry this many more mirrors")
    args = parser.parse_args(argv)
    names = variants_of(parser, args)

    logs = Path(tempfile.mkdtemp(prefix="bench-replication-"))
    report: dict[str, Any] = {}
    with Lab(bridges=("lan", "hb")) as lab:
        guests = [
            Guest(
                f"bench-{name}",
                logs / name,
                cpus=1,
                memory="1536M",
                disks=[Disk("vol", DISK_SIZE)],
                nics=[Nic("lan", f"{LAN[name]}/24"), Nic("hb", f"{HB[name]}/24")],
                lab=lab,
            )
            for name in ("a", "b")
        ]
        client = Guest(
            "bench-client", logs / "client", cpus=1, memory="1G", nics=[Nic("lan", f"{LAN['client']}/24")], lab=lab
        )
        try:
            start_all([*guests, client])
            bench = Bench(*guests, client)
            results, samples = interleaved(
                names,
                args.repeat,
                lambda name: measured(
                    VARIANTS[name](bench), lambda device: bench.measure(device, args.seq_size, args.lat_seconds)
                ),
            )
            if not args.no_resync:
                report["resync"] = bench.resyncs(args.dirty)
                log(f"resyncs: {report['resync']}")
            if args.volumes:
                report["volumes"] = bench.volumes(args.volumes, args.lat_seconds)
                log(f"volumes: {report['volumes']}")
        finally:
            for guest in (*guests, client):
                guest.stop()
    print(table(results))
    if "resync" in report:
        print()
        print(resync_table(report["resync"]))
    if "volumes" in report:
        print()
        print(json.dumps(report["volumes"], indent=2))
    if args.output:
        args.output.write_text(json.dumps({"samples": samples, "medians": results, **report}, indent=2))
    log(f"guest logs: {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
