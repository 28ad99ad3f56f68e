"""applianced's ``Kernel`` on LIO: read and built through configfs, torn down through rtslib-fb.

It reads the part of LIO that applianced manages into a ``KernelConfig`` (``configfs.py``),
sessions (``sessions.py``) and login activity with plain file reads. Of a plan's actions,
the ones that build and configure objects write configfs (``configfs_actions.py``): they
are all a restore at boot does, and their speed is the restore's. Removals go through
rtslib-fb (``rtslib_actions.py``), which is imported on the first one: a daemon that starts
over an intact or an empty kernel never loads rtslib and pyudev (a good part of its imports
under emulation; see bench/README.md).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from applianced.errors import KernelError
from applianced.iscsi.kernel import configfs, negotiation, plan, sessions
from applianced.iscsi.kernel.configfs_actions import ConfigfsActions
from applianced.iscsi.kernel.disk_devices import DiskDevices
from applianced.iscsi.kernel.model import (
    TPG_ATTRIBUTES,
    TPG_PARAMETERS,
    DiskDevice,
    KernelConfig,
    LoginActivity,
    LoginCounters,
    LogPosition,
    TargetSessions,
)
from applianced.state import write_private_file

if TYPE_CHECKING:
    from applianced.iscsi.kernel.rtslib_actions import RtslibActions

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
ISCSI_CONFIGFS = CONFIGFS / "target" / "iscsi"
# Where LIO keeps persistent reservations and ALUA state: rtslib's and targetcli's choice.
DBROOT = "/etc/target"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
KMSG = "/dev/kmsg"
DYNAMIC_DEBUG = (Path("/proc/dynamic_debug/control"), Path("/sys/kernel/debug/dynamic_debug/control"))
TPG_TAG = configfs.TPG_TAG
# Modules loaded up front: configfs is not always auto-mounted, the backends are not
# requested by the kernel when their HBA directories are made, and a disk's device needs
# device-mapper and, for a file, the loop driver.
MODULES = (
    "configfs",
    "target_core_mod",
    "target_core_file",
    "target_core_iblock",
    "iscsi_target_mod",
    "dm_mod",
    "loop",
)


class LioKernel:
    """LIO. ``open()`` must succeed before anything else is called."""

    def __init__(self) -> None:
        self._removals: RtslibActions | None = None
        self._kernel_log = KernelLog()
        self._disk_devices = DiskDevices()

    def open(self) -> None:
        try:
            loaded = {line.split()[0] for line in Path("/proc/modules").read_text().splitlines() if line}
            missing = [module for module in MODULES if module not in loaded]
            if missing:
                subprocess.run(["modprobe", "-a", *missing], check=True, capture_output=True, text=True)
            if not os.path.ismount(CONFIGFS):
                subprocess.run(["mount", "-t", "configfs", "configfs", str(CONFIGFS)], check=True, capture_output=True)
            # LIO writes the reservations that initiators make persistent (APTPL) under
            # <dbroot>/pr, and fails their PERSISTENT RESERVE OUT without it.
            for directory in (DBROOT, f"{DBROOT}/pr"):
                Path(directory).mkdir(mode=0o700, exist_ok=True)
        except subprocess.CalledProcessError as exc:
            raise KernelError(f"LIO is not available on this node: {exc.stderr or exc}") from exc
        except OSError as exc:
            raise KernelError(f"LIO is not available on this node: {exc}") from exc
        _set_dbroot()
        _enable_negotiation_log()

    # -- reading -------------------------------------------------------------------------

    def observe(
        self, storage_objects: Iterable[str], targets: Iterable[str], disk_devices: Mapping[str, DiskDevice]
    ) -> KernelConfig:
        """Read the named backstores and targets, and the devices of the disks ``storage_objects``
        names (``disk_devices`` are the ones wanted); what is missing is left out."""
        names = list(storage_objects)
        try:
            objects = configfs.storage_objects(names)
            found = {}
            for iqn in targets:
                target = configfs.target(iqn, TPG_TAG, TPG_ATTRIBUTES, TPG_PARAMETERS)
                if target is not None:
                    found[iqn] = target
            discovery = configfs.discovery_auth()
        except (OSError, ValueError) as exc:
            raise KernelError(f"cannot read the LIO configuration: {exc}") from exc
        devices = self._disk_devices.observe(names, disk_devices)
        return KernelConfig(storage_objects=objects, targets=found, discovery_auth=discovery, disk_devices=devices)

    def sessions(self, target_iqn: str) -> TargetSessions:
        """What is logged in to one target, read from configfs and the TCP table."""
        tpg_dir = ISCSI_CONFIGFS / target_iqn / f"tpgt_{TPG_TAG}"
        if not tpg_dir.is_dir():
            return TargetSessions()
        connections = sessions.established_connections(sessions.portal_ports([tpg_dir]))
        return sessions.read_target_sessions(tpg_dir, target_iqn, connections)

    def login_activity(
        self, targets: Iterable[str], position: LogPosition | None, known: Mapping[str, LoginCounters]
    ) -> LoginActivity:
        """The login statistics of ``targets`` and the kernel's iSCSI log lines after ``position``.

        Read straight from configfs, not through rtslib objects, because this runs every few
        seconds for as long as the daemon does: two files per target whose totals still
        match ``known`` (the counters read together with ``position``), seven for the
        others. Targets missing from LIO are left out.
        """
        boot_id = BOOT_ID.read_text().strip()
        if position is None or position.boot_id != boot_id:
            known = {}  # another boot's counters, or of unknown age
        lines, read_to = self._kernel_log.read(boot_id, position)
        counters = {}
        for iqn in targets:
            statistics = f"{ISCSI_CONFIGFS}/{iqn}/fabric_statistics"
            with contextlib.suppress(FileNotFoundError):
                last = known.get(iqn)
                counters[iqn] = (
                    last if last and _totals_unchanged(statistics, last) else _read_login_counters(statistics)
                )
        return LoginActivity(boot_id, counters, lines, read_to)

    def saved_reservations(self, serials: Iterable[str]) -> dict[str, str]:
        """The persistent reservations (APTPL) LIO saved for the disks of unit serials
        ``serials``, as the files it wrote; "" for a disk it saved none for."""
        saved = {}
        try:
            directory = configfs.reservations_dir()  # read once: this runs at every look
            for serial in serials:
                try:
                    saved[serial] = configfs.reservations_file(serial, directory).read_text()
                except FileNotFoundError:
                    saved[serial] = ""
        except OSError as exc:
            raise KernelError(f"cannot read the persistent reservations: {exc}") from exc
        return saved

    # -- changing ------------------------------------------------------------------------

    def keep_reservations(self, serial: str, saved: str) -> None:
        """Keep ``saved`` (another node's ``saved_reservations`` of this disk) where LIO saves
        its own, so that the backstore made here at a takeover restores them; "" removes them."""
        try:
            path = configfs.reservations_file(serial)
            if saved:
                write_private_file(path, saved.encode())
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            raise KernelError(f"cannot keep the persistent reservations of {serial}: {exc}") from exc

    def apply(self, actions: Sequence[plan.Action]) -> None:
        """Carry out ``actions`` in order: each run of removals through rtslib, disk devices
        through device-mapper, the rest through configfs."""
        for backend, run in itertools.groupby(actions, key=_backend):
            if backend == "rtslib":
                self._rtslib().apply(list(run))
            elif backend == "dm":
                for action in run:
                    self._disk_devices.apply(action)
            else:
                # Made per run: what it caches of LIO is stale after rtslib's removals.
                ConfigfsActions().apply(list(run))

    def _rtslib(self) -> RtslibActions:
        if self._removals is None:
            from applianced.iscsi.kernel.rtslib_actions import RtslibActions  # imported late: see the module docstring

            self._removals = RtslibActions()
        return self._removals


def _backend(action: plan.Action) -> str:
    if isinstance(action, plan.REMOVALS):
        return "rtslib"
    return "dm" if isinstance(action, plan.DISK_DEVICE_ACTIONS) else "configfs"


class KernelLog:
    """New records of the kernel log (/dev/kmsg) that come from the iSCSI target, read without blocking."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._unreadable = False
        self._position: LogPosition | None = None

    def read(self, boot_id: str, position: LogPosition | None) -> tuple[tuple[str, ...], LogPosition | None]:
        """Messages after ``position`` (None: from now on; another boot's: from this boot's start).

        Returns them with the position reached, which is None when the log is unreadable.
        """
        if self._fd is None:
            if self._unreadable:
                return (), None
            try:
                self._fd = os.open(KMSG, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                self._unreadable = True
                log.warning(
                    "cannot read the kernel log (%s): refused initiators outside an ACL stay unnamed, "
                    "negotiated values unknown",
                    exc,
                )
                return (), None
        elif position != self._position:
            # The caller dropped the last reading (its sample failed): read it again.
            os.lseek(self._fd, 0, os.SEEK_SET)
        after = -1 if position is not None and position.boot_id != boot_id else position.seq if position else None
        last = self._position.seq if self._position and self._position.boot_id == boot_id else -1
        lines = []
        while True:
            try:
                record = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                # Records were overwritten before they were read; carry on with the oldest left.
                continue
            header, _, text = record.decode(errors="replace").partition(";")
            seq = int(header.split(",")[1])
            last = max(last, seq)
            message = text.split("\n", 1)[0]
            relevant = message.startswith("iSCSI ") or negotiation.is_negotiation_line(message)
            if after is not None and seq > after and relevant:
                lines.append(message)
        self._position = LogPosition(boot_id, last)
        return tuple(lines), self._position


def _set_dbroot() -> None:
    """Point LIO's database directory at /etc/target, as rtslib does, so that reservations
    made persistent by initiators (APTPL) are kept where targetcli also finds them.

    LIO accepts this only before its first backstore; later it keeps what it has (the
    default /var/target, or what another tool set), which still works, so this only warns.
    """
    path = f"{configfs.TARGET_ROOT}/dbroot"
    with contextlib.suppress(FileNotFoundError):
        if configfs.read(path) == DBROOT:
            return
        try:
            # With its newline: LIO 6.1 copies only the bytes written, so a shorter value
            # without one keeps the tail of the old path.
            configfs.write(path, f"{DBROOT}\n")
        except OSError as exc:
            log.warning("LIO keeps persistent reservations in %s, not %s: %s", configfs.read(path), DBROOT, exc)


def _enable_negotiation_log() -> None:
    """Have LIO log what each login negotiated (see kernel/negotiation.py); without it, sessions just lack it."""
    control = next((path for path in DYNAMIC_DEBUG if path.exists()), None)
    try:
        if control is None:
            raise OSError("no dynamic debug control file")
        for query in negotiation.DEBUG_QUERIES:
            control.write_text(query + "\n")
    except OSError as exc:
        log.warning("cannot enable LIO's login parameter messages (%s): negotiated values stay unknown", exc)


def _totals_unchanged(statistics: str, last: LoginCounters) -> bool:
    # login_fails is LIO's sum of the failure counters (and of redirects, which applianced
    # never configures): counters only grow, so equal totals mean nothing happened.
    fails = last.authorize_fails + last.authenticate_fails + last.negotiate_fails + last.other_fails
    return (
        int(configfs.read(f"{statistics}/iscsi_login_stats/accepts")) == last.accepts
        and int(configfs.read(f"{statistics}/iscsi_tgt_attr/login_fails")) == fails
    )


def _read_login_counters(statistics: str) -> LoginCounters:
    def read(name: str) -> str:
        return configfs.read(f"{statistics}/{name}")

    def known(value: str) -> str:
        # LIO shows "None" before the first failure, "Unknown" for a name it never read,
        # "(einval)" for an address it never had.
        return "" if value in ("None", "Unknown", "(einval)") else value

    return LoginCounters(
        accepts=int(read("iscsi_login_stats/accepts")),
        authorize_fails=int(read("iscsi_login_stats/authorize_fails")),
        authenticate_fails=int(read("iscsi_login_stats/authenticate_fails")),
        negotiate_fails=int(read("iscsi_login_stats/negotiate_fails")),
        other_fails=int(read("iscsi_login_stats/other_fails")),
        last_fail_name=known(read("iscsi_tgt_attr/fail_intr_name")),
        last_fail_address=known(read("iscsi_tgt_attr/fail_intr_addr")),
    )
