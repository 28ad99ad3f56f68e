"""applianced inside a guest: start, stop, CLI, and what a node's kernel holds.

A node is a ``Guest`` with LIO loaded, a system dbus-daemon carrying our policy, the
udev rule installed, and applianced started from the checkout's virtual environment, as
systemd would start it (its state in /var/lib/applianced, which lives in guest RAM).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from applianced.cli.messages import EXIT_NO_ANSWER
from applianced.constants import BUS_NAME, MIRROR_INTERFACE, ROOT_PATH
from tests.vm.harness import REPO_ROOT, CommandError, CommandTimeout, Completed, Guest, HarnessError

VENV_BIN = REPO_ROOT / ".venv" / "bin"
# Calls give up before the harness kills the command (120 s), so that a daemon that does not
# answer is named with the call it left unanswered.
APPLIANCECTL = (str(VENV_BIN / "appliancectl"), "--call-timeout", "100")
# The initiator's stable names and the storage node's rule that keeps udev off its stacks,
# as tools/install-node installs them.
UDEV_RULES = (REPO_ROOT / "udev" / "70-applianced-lio-serial.rules", REPO_ROOT / "udev" / "64-applianced-storage.rules")
DAEMON = "applianced"
# An initiator of a failover pair: no pause before it logs in again after losing its
# connection (open-iscsi waits the negotiated DefaultTime2Wait, 2 s by default, first).
FAILOVER_INITIATOR = {"node.session.iscsi.DefaultTime2Wait": "0"}


class ApplianceNode:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest

    def prepare(self, initiator_name: str | None = None) -> ApplianceNode:
        """Load LIO, start the system bus, install the udev rules, and iscsid if asked."""
        self.guest.setup_storage()
        self.guest.start_dbus()
        for rule in UDEV_RULES:
            self.guest.write_file(f"/etc/udev/rules.d/{rule.name}", rule.read_bytes(), mode=0o644)
        self.guest.run("udevadm control --reload || true")
        if initiator_name:
            self.guest.start_iscsid(initiator_name)
        return self

    def start(self, ready_timeout: float = 180) -> None:
        # Ready when it says so over sd_notify, as systemd's Type=notify learns it: the
        # daemon sends READY=1 once its bus name is taken. Polling the bus instead cost
        # a process start in the guest every second, taken from the daemon's own start.
        self.guest.spawn(DAEMON, [str(VENV_BIN / "python"), "-m", "applianced"], cwd="/", notify=True)
        with self._explained():
            self.guest.wait_notify(DAEMON, timeout=ready_timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon alone, as systemd's KillMode=process does: the NBD servers it
        started keep serving."""
        return self.guest.kill(DAEMON, sig, timeout=30, group=False)

    def sectors_written(self, device: str) -> int:
        """Sectors written to a block device of this node since boot (or since its loop was made)."""
        name = self.guest.run(["readlink", "-f", device]).stdout.strip().removeprefix("/dev/")
        return int(self.guest.run(f"cat /sys/block/{name}/stat").stdout.split()[6])

    def log(self) -> str:
        return self.guest.spawn_log(DAEMON)

    def ctl(self, *args: str, check: bool = True) -> Completed:
        with self._explained():
            return self.guest.run([*APPLIANCECTL, *args], check=check, timeout=120)

    def ctl_batch(self, *commands: Sequence[str]) -> Completed:
        """Several commands in one start of appliancectl (each start costs seconds under TCG)."""
        script = "".join(shlex.join(command) + "\n" for command in commands)
        with self._explained():
            return self.guest.run([*APPLIANCECTL, "batch"], input=script, timeout=300)

    @contextlib.contextmanager
    def _explained(self) -> Iterator[None]:
        """A daemon that does not get ready, or a command that runs out of time, comes with
        what the node was doing then: a test that fails on a slow host says why."""
        try:
            yield
        except CommandTimeout as exc:
            raise CommandTimeout(f"{exc}\n{self.doing()}", exc.result) from exc
        except CommandError as exc:
            if exc.result.returncode != EXIT_NO_ANSWER:
                raise  # a command that failed says why itself
            raise CommandError(f"{exc}\n{self.doing()}", exc.result) from exc
        except HarnessError as exc:
            if type(exc) is not HarnessError:
                raise  # a command that failed says why itself
            raise HarnessError(f"{exc}\n{self.doing()}") from exc

    def doing(self) -> str:
        """The daemon's threads' Python stacks (its SIGUSR1 handler writes them to its log),
        the guest's busiest processes and load, and the host's load and pressure."""
        report = [f"--- what {self.guest.name} was doing; the host: load {os.getloadavg()}, {_host_pressure()}"]
        try:
            self.guest.kill(DAEMON, signal.SIGUSR1, timeout=0, group=False)
            time.sleep(2)
            processes = "cat /proc/loadavg; ps -eo pid,stat,pcpu,etime,wchan:24,args --sort=-pcpu | head -20"
            report.append(self.guest.run(processes, timeout=30, check=False).stdout)
        except HarnessError as exc:
            report.append(f"(the guest did not answer: {exc})")
        report.append(self.log()[-8000:])
        return "\n".join(report)

    def ctl_json(self, *args: str) -> list[dict]:
        return json.loads(self.ctl("--json", *args).stdout)

    def objects(self) -> dict[str, dict[str, dict]]:
        """Every object of the daemon, by path: its interfaces' properties as busctl gives
        them (``{"type": "u", "data": 1}``), in one bus read, far cheaper than appliancectl."""
        read = ["busctl", "--system", "--json=short", "call", BUS_NAME, ROOT_PATH]
        read += ["org.freedesktop.DBus.ObjectManager", "GetManagedObjects"]
        with self._explained():
            return json.loads(self.guest.run(read).stdout)["data"][0]

    def mirrors_in_state(self, state: int) -> int:
        """How many mirrors of this node are in ``state`` (1: mirroring)."""
        return sum(
            interfaces.get(MIRROR_INTERFACE, {}).get("State", {}).get("data") == state
            for interfaces in self.objects().values()
        )

    def wait_property(
        self, path: str, interface: str, name: str, value: str, timeout: float = 60, interval: float = 1.0
    ) -> None:
        """Wait until a D-Bus property reads ``value`` as busctl prints it (``s "active"``,
        ``u 1``, ``b true``). A read costs a fifth of a second or more of the guest's one CPU
        under TCG, appliancectl about five, taken from the work that is waited for; hence
        busctl, and ``interval`` seconds between reads."""
        read = shlex.join(["busctl", "--system", "get-property", BUS_NAME, path, interface, name])
        with self._explained():
            self.guest.wait_until(f'test "$({read})" = {shlex.quote(value)}', timeout=timeout, interval=interval)

    def serve(self, disk_size: str, initiator: str, portal: str = "127.0.0.1") -> None:
        """The usual first configuration: disk d1 as LUN 0 of target t1 for one initiator."""
        self.ctl_batch(
            ("disk", "create", "d1", disk_size),
            ("target", "create", "t1"),
            ("portal", "create", portal),
            ("lun", "add", "t1", "d1"),
            ("acl", "add", "t1", initiator),
        )

    def lio_targets(self) -> list[str]:
        """Target IQNs in configfs, read directly from the kernel."""
        out = self.guest.run("ls /sys/kernel/config/target/iscsi 2>/dev/null | grep -E '^(iqn|eui|naa)\\.' || true")
        return out.stdout.split()

    def clear_kernel_state(self) -> None:
        """Forget what a reboot forgets: LIO's configuration, md arrays, dm devices, loops."""
        self.guest.run(
            "targetctl clear"
            ' && for md in /dev/md[0-9]*; do [ -b "$md" ] && mdadm --stop "$md" >/dev/null 2>&1; done;'
            " dmsetup remove_all && losetup -D",
            timeout=120,
        )

    # -- initiator side (open-iscsi in the same guest) -----------------------------------

    def discover(self, portal: str) -> list[str]:
        out = self.guest.run(["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", portal], check=False)
        return [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]

    def login(self, iqn: str, portal: str) -> None:
        self.guest.run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login"], timeout=120)

    def set_node(self, iqn: str, portal: str, settings: dict[str, str]) -> None:
        """Change the initiator's record of a discovered target (takes effect at the next login)."""
        for key, value in settings.items():
            self.guest.run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-o", "update", "-n", key, "-v", value])

    def logout(self, iqn: str, portal: str) -> None:
        self.guest.run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--logout"], timeout=120)

    def reserve_persistently(self, device: str, key: str) -> None:
        """Register ``key`` and take a Write Exclusive, Registrants Only reservation, both
        asked to persist through a power loss (APTPL), as a cluster file system does."""
        persist = ["--param-aptpl", device]
        self.guest.run(["sg_persist", "--out", "--register", f"--param-sark={key}", *persist])
        self.guest.run(["sg_persist", "--out", "--reserve", f"--param-rk={key}", "--prout-type=5", *persist])

    def assert_reserved(self, device: str, key: str) -> None:
        keys = self.guest.run(["sg_persist", "--in", "--read-keys", device]).stdout
        assert key in keys, keys
        reservation = self.guest.run(["sg_persist", "--in", "--read-reservation", device]).stdout
        assert key in reservation and "Write Exclusive, registrants only" in reservation, reservation

    def clear_reservations(self, device: str, key: str) -> None:
        self.guest.run(["sg_persist", "--out", "--clear", f"--param-rk={key}", device], check=False)

    def session_states(self) -> str:
        return self.guest.run("iscsiadm -m session -P 1 2>/dev/null || true").stdout

    def device_for_serial(self, serial: str, timeout: float = 60) -> str:
        """The initiator's block device of a LUN, found by the udev rule's stable name."""
        link = f"/dev/disk/by-lio-serial/{serial}"
        self.guest.wait_until(f"test -b {shlex.quote(link)}", timeout=timeout)
        return self.guest.run(["readlink", "-f", link]).stdout.strip()


def _host_pressure() -> str:
    """The host's stall information (PSI: the share of time tasks waited for CPU, I/O or
    memory, over 10, 60 and 300 s) and its CPU time stolen by the hypervisor so far."""
    lines = []
    for resource in ("cpu", "io", "memory"):
        with contextlib.suppress(OSError):
            some = Path(f"/proc/pressure/{resource}").read_text().splitlines()[0]
            lines.append(f"{resource} {some.removeprefix('some ').rsplit(' total=', 1)[0]}")
    with contextlib.suppress(OSError, IndexError):
        steal = int(Path("/proc/stat").read_text().split()[8]) / os.sysconf("SC_CLK_TCK")
        lines.append(f"stolen {steal:.0f} s since boot")
    return "; ".join(lines) or "no pressure information"
