"""PCs that boot from the network, and the DHCP server they ask, inside a test's Lab.

A PC is plain QEMU with no disk. With BIOS firmware it has the NIC option ROM QEMU ships
(Debian's ipxe-qemu): ``-boot n`` makes SeaBIOS run iPXE, which takes its boot settings
from DHCP and, given an iSCSI root path, logs in and boots the LUN's first sector, made
by :func:`boot_sector`. With UEFI firmware it runs Debian's OVMF, whose iSCSI driver
(IScsiDxe) takes the target from DHCP in an attempt set up beforehand by
:func:`seed_uefi_attempt`, as an administrator does in the setup menu; OVMF's shell then
runs the ``startup.nsh`` it finds on the LUN (:func:`fat_image`). Either way the PC's
serial port goes to a file, where the marker shows. dnsmasq serves DHCP only in the
lab's namespace, bound to one lab bridge; every process is stopped by its own pid.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from applianced.state import Chap
from tests.vm.harness import HarnessError, Lab

DNSMASQ = "/usr/sbin/dnsmasq"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# The variables of EDK2's IScsiDxe (edk2-stable202211, Debian's ovmf 2022.11): "Attempt N"
# and "I_NAME" under gEfiIScsiInitiatorNameProtocolGuid (MdePkg.dec), "AttemptOrder" under
# gIScsiConfigGuid (NetworkPkg.dec).
_ISCSI_ATTEMPT_GUID = "59324945-EC44-4C0D-B1CD-9DB139DF070C"
_ISCSI_CONFIG_GUID = "4B47D616-A8D6-4552-9D44-CCAD2E0F4CF9"
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


def fat_image(files: dict[str, str]) -> bytes:
    """A 1.44 MB FAT12 file system holding ``files`` (made by QEMU's vvfat driver)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "files"
        source.mkdir()
        for name, text in files.items():
            (source / name).write_text(text)
        image = Path(tmp) / "fat.img"
        subprocess.run(
            ["qemu-img", "convert", "-f", "vvfat", "-O", "raw", f"fat:floppy:12:{source}", str(image)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return image.read_bytes()


def _uefi_attempt(mac: str, chap: Chap | None) -> bytes:
    """IScsiDxe's ISCSI_ATTEMPT_CONFIG_NVDATA (IScsiConfig.h, packed) for attempt 1 on ``mac``.

    What the setup menu saves for: enabled, IPv4, initiator and target from DHCP, and
    ``chap`` (user names filled in) if given.
    """

    def text(value: str, size: int) -> bytes:
        return value.encode("ascii").ljust(size, b"\0")

    address = bytes(16)  # EFI_IP_ADDRESS
    session = b"".join(
        [
            struct.pack("<HBB", 3260, 1, 0),  # TargetPort, Enabled (ISCSI_ENABLED), IpMode (IP4)
            address + bytes(4) + address,  # LocalIp, SubnetMask, Gateway
            struct.pack("<BB", 1, 1),  # InitiatorInfoFromDhcp, TargetInfoFromDhcp
            bytes(224) + address + bytes(1 + 8),  # TargetName, TargetIp, PrefixLength, BootLun
            struct.pack("<HB", 1000, 0),  # ConnectTimeout (ms), ConnectRetryCount
            bytes([0x80, 0, 0, 0, 0, 1]),  # IsId: a "random" ISID, as the menu derives one
            bytes(1 + 2) + address + bytes(1 + 255),  # RedirectFlag, OriginalTarget*, DnsMode, TargetUrl
        ]
    )
    credentials = bytes(1 + 127 + 17 + 127 + 17)  # CHAPType, CHAPName, CHAPSecret, reverse ones
    if chap is not None:
        credentials = b"".join(
            [
                bytes([1 if chap.mutual else 0]),  # ISCSI_CHAP_MUTUAL or ISCSI_CHAP_UNI
                text(chap.user, 127),
                text(chap.secret, 17),
                text(chap.mutual_user, 127),
                text(chap.mutual_secret, 17),
            ]
        )
    return b"".join(
        [
            bytes(16),  # LIST_ENTRY Link
            bytes([0, 1, 0, 0, 0, 0]),  # NicIndex, AttemptConfigIndex, DhcpSuccess, ValidiBFTPath, ValidPath, ...
            bytes(4),  # AttemptTitleToken, AttemptTitleHelpToken
            text("Attempt 1", 12),
            text(mac.upper(), 96),  # as IScsiMacAddrToStr writes it
            address * 3,  # PrimaryDns, SecondaryDns, DhcpServer
            session,
            bytes([0 if chap is None else 1]),  # AuthenticationType: none or CHAP
            credentials,
            bytes([0, 1]),  # AutoConfigureSuccess, Actived (ISCSI_ACTIVE_ENABLED)
        ]
    )


def seed_uefi_attempt(vars_path: Path, mac: str, initiator: str, chap: Chap | None, log_dir: Path) -> None:
    """Copy OVMF's variable store to ``vars_path`` with an iSCSI attempt for ``mac``.

    The attempt is what an administrator sets in the firmware's iSCSI setup: the initiator
    name, CHAP, and an attempt on the NIC taking the rest from DHCP. OVMF's own shell
    writes the variables (setvar, from a startup.nsh), so the store's format stays OVMF's.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(OVMF_VARS, vars_path)
    attempt = _uefi_attempt(mac, chap).hex().upper()
    name = (initiator.encode("ascii") + bytes(1)).hex().upper()
    # The shell takes the data in several =H pieces: one command line stays short.
    pieces = " ".join("=H" + attempt[i : i + 256] for i in range(0, len(attempt), 256))
    script = "\n".join(
        [
            f'setvar "Attempt 1" -guid {_ISCSI_ATTEMPT_GUID} -bs -nv {pieces}',
            f"setvar AttemptOrder -guid {_ISCSI_CONFIG_GUID} -bs -nv =H01",
            f"setvar I_NAME -guid {_ISCSI_ATTEMPT_GUID} -bs -nv =H{name}",
            "reset -s",
            "",
        ]
    )
    console = log_dir / "uefi-setup-serial.log"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "startup.nsh").write_text(script)
        argv = [
            *_uefi_machine(vars_path),
            "-net",
            "none",
            "-drive",
            f"file=fat:{tmp},format=raw,if=virtio,readonly=on",
            "-serial",
            f"file:{console}",
        ]
        done = subprocess.run(argv, capture_output=True, timeout=180, check=False)
    if done.returncode != 0:
        raise HarnessError(f"OVMF did not store the iSCSI attempt (rc {done.returncode}); see {console}")


def _qemu(memory: str) -> list[str]:
    # TCG: guests hang with KVM on these machines.
    return ["qemu-system-x86_64", "-accel", "tcg", "-m", memory, "-nodefaults", "-no-user-config", "-display", "none"]


def _uefi_machine(vars_path: Path) -> list[str]:
    return [
        *_qemu("256"),
        "-machine",
        "q35",
        "-drive",
        f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
        "-drive",
        f"if=pflash,format=raw,file={vars_path}",
    ]


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
    """A diskless QEMU PC on a lab bridge, booting from the network.

    With ``uefi_vars`` (a store made by :func:`seed_uefi_attempt`) it runs OVMF with its
    own virtio-net driver; without, SeaBIOS and the NIC's stock iPXE ROM.
    """

    def __init__(self, lab: Lab, bridge: str, mac: str, log_dir: Path, uefi_vars: Path | None = None) -> None:
        self.lab = lab
        self.bridge = bridge
        self.mac = mac
        self.log_dir = log_dir
        self.uefi_vars = uefi_vars
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
        netdev = ["-netdev", f"tap,id=nic0,ifname={self._tap},script=no,downscript=no"]
        serial = ["-serial", f"file:{self.serial_path}"]
        if self.uefi_vars is not None:
            # romfile= leaves the NIC to OVMF's own driver, so that UEFI's iSCSI driver and
            # not iPXE's EFI build is what boots.
            nic = ["-device", f"virtio-net-pci,netdev=nic0,mac={self.mac},romfile="]
            argv = [*_uefi_machine(self.uefi_vars), *netdev, *nic, *serial]
        else:
            argv = [
                *_qemu("128"),
                *netdev,
                # No romfile given: the NIC's default ROM, iPXE from Debian's ipxe-qemu.
                "-device",
                f"virtio-net-pci,netdev=nic0,mac={self.mac}",
                "-boot",
                "n",
                *serial,
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
