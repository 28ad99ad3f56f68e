"""A PC that boots from the network, and the DHCP server it asks, inside a test's Lab.

The PC is plain QEMU with no disk and the NIC option ROM QEMU ships (Debian's
ipxe-qemu): ``-boot n`` makes SeaBIOS run iPXE, which takes its boot settings from DHCP
and, given an iSCSI root path, logs in and boots the LUN's first sector. The PC's serial
port goes to a file, where the sector made by :func:`boot_sector` prints its marker.
dnsmasq serves DHCP only in the lab's namespace, bound to one lab bridge, and both
processes are stopped by their own pid when the ``with`` block ends.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import IO

from tests.vm.harness import HarnessError, Lab

DNSMASQ = "/usr/sbin/dnsmasq"
# 16-bit code run at 0000:7C00: print the NUL-terminated text after it on COM1, then halt.
# The BIOS has not set COM1 up for this, but QEMU's UART sends what is written whatever
# its line settings are.
_PRINT_AND_HALT = bytes.fromhex(
    "31c0"  # xor ax, ax
    "8ed8"  # mov ds, ax
    "fc"  # cld
    "be177c"  # mov si, 0x7c17 (the text, right after these 23 bytes)
    "baf803"  # mov dx, 0x3f8 (COM1)
    "ac"  # next: lodsb
    "84c0"  # test al, al
    "7403"  # jz halt
    "ee"  # out dx, al
    "ebf8"  # jmp next
    "fa"  # halt: cli
    "f4"  # hlt
    "ebfc"  # jmp halt
)


def boot_sector(marker: str) -> bytes:
    """A 512-byte MBR that prints ``marker`` on the serial port and halts."""
    text = marker.encode("ascii") + b"\r\n\0"
    code = _PRINT_AND_HALT + text
    if len(code) > 510:
        raise ValueError("marker too long for a boot sector")
    return code + bytes(510 - len(code)) + b"\x55\xaa"


class Dnsmasq:
    """dnsmasq serving ``config`` (plus the interface and range lines) on one lab bridge."""

    def __init__(self, lab: Lab, bridge: str, dhcp_range: str, config: str, log_dir: Path) -> None:
        self.lab = lab
        self.log_dir = log_dir
        # What a site adds to the printed snippet: where to serve, and which addresses.
        self.config = f"interface={bridge}\nbind-interfaces\ndhcp-range={dhcp_range}\n{config}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / "dnsmasq.log"

    def __enter__(self) -> Dnsmasq:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        conf = self.log_dir / "dnsmasq.conf"
        conf.write_text(self.config)
        argv = [
            DNSMASQ,
            "--keep-in-foreground",
            f"--conf-file={conf}",
            # DHCP only: no DNS, and nothing written outside the log directory.
            "--port=0",
            "--user=root",
            f"--pid-file={self.log_dir / 'dnsmasq.pid'}",
            f"--dhcp-leasefile={self.log_dir / 'dnsmasq.leases'}",
            "--log-dhcp",
            "--log-facility=-",
        ]
        self._log = open(self.log_path, "ab")  # closed in __exit__
        self._proc = subprocess.Popen(
            self.lab.exec_prefix() + argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        # dnsmasq reads and checks its configuration before it logs that it started.
        deadline = time.monotonic() + 30
        while b"started" not in self.log_path.read_bytes():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise HarnessError(f"dnsmasq did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


class NetbootPc:
    """A diskless QEMU PC on a lab bridge, booting from the network with its stock ROM."""

    def __init__(self, lab: Lab, bridge: str, mac: str, log_dir: Path) -> None:
        self.lab = lab
        self.bridge = bridge
        self.mac = mac
        self.log_dir = log_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._tap = ""

    @property
    def serial_path(self) -> Path:
        return self.log_dir / "pc-serial.log"

    def serial(self) -> str:
        return self.serial_path.read_bytes().decode("ascii", errors="replace") if self.serial_path.exists() else ""

    def __enter__(self) -> NetbootPc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.serial_path.unlink(missing_ok=True)
        self._tap = self.lab.create_tap(self.bridge)
        argv = [
            "qemu-system-x86_64",
            # TCG: guests hang with KVM on these machines.
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-netdev",
            f"tap,id=nic0,ifname={self._tap},script=no,downscript=no",
            # No romfile given: the NIC's default ROM, iPXE from Debian's ipxe-qemu.
            "-device",
            f"virtio-net-pci,netdev=nic0,mac={self.mac}",
            "-boot",
            "n",
            "-serial",
            f"file:{self.serial_path}",
            # SeaBIOS's own log, for when the PC does not boot.
            "-chardev",
            f"file,id=bios,path={self.log_dir / 'seabios.log'}",
            "-device",
            "isa-debugcon,iobase=0x402,chardev=bios",
        ]
        with open(self.log_dir / "qemu.log", "ab") as out:
            self._proc = subprocess.Popen(
                self.lab.exec_prefix() + argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def wait_for(self, marker: str, timeout: float) -> float:
        """Seconds until ``marker`` appeared on the serial port; HarnessError after ``timeout``."""
        assert self._proc is not None
        started = time.monotonic()
        while marker not in self.serial():
            if self._proc.poll() is not None or time.monotonic() - started > timeout:
                raise HarnessError(
                    f"the PC did not print {marker!r} within {timeout:.0f} s (logs: {self.log_dir}); "
                    f"serial port: {self.serial()[-500:]!r}"
                )
            time.sleep(0.5)
        return time.monotonic() - started

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            _stop(self._proc)
            self._proc = None
        if self._tap:
            self.lab.delete_tap(self._tap)
            self._tap = ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # ip netns exec execs the program, so this pid is the program's own.
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)
