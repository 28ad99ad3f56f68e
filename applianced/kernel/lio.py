"""The rtslib-fb backend: the only module that touches LIO.

It reads the part of LIO that applianced manages into a ``KernelConfig``, carries out plan
actions one by one (each idempotent, so a plan interrupted by a crash can simply be run
again), and lists sessions. rtslib's constructors have side effects (module loading,
configfs mounts), so they are kept behind this one adapter.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from functools import singledispatchmethod
from pathlib import Path

import rtslib_fb
from rtslib_fb.utils import RTSLibError, RTSLibNotInCFSError, fwrite, modprobe

from applianced.errors import KernelError
from applianced.kernel import negotiation, plan, sessions
from applianced.kernel.model import (
    TPG_ATTRIBUTES,
    TPG_PARAMETERS,
    KernelConfig,
    KernelTarget,
    LoginActivity,
    LoginCounters,
    LogPosition,
    MappedLun,
    NodeAcl,
    StorageObject,
    TargetSessions,
)
from applianced.state import Chap

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
ISCSI_CONFIGFS = CONFIGFS / "target" / "iscsi"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
KMSG = "/dev/kmsg"
DYNAMIC_DEBUG = (Path("/proc/dynamic_debug/control"), Path("/sys/kernel/debug/dynamic_debug/control"))
TPG_TAG = 1
# Modules loaded up front: configfs is not always auto-mounted, and the fileio backend is
# not requested by the kernel when its HBA directory is made.
MODULES = ("configfs", "target_core_mod", "target_core_file", "iscsi_target_mod")


class LioKernel:
    """LIO through rtslib-fb. ``open()`` must succeed before anything else is called."""

    def __init__(self) -> None:
        self._root: rtslib_fb.RTSRoot | None = None
        self._iscsi: rtslib_fb.FabricModule | None = None
        self._kernel_log = KernelLog()

    def open(self) -> None:
        try:
            for module in MODULES:
                modprobe(module)
            if not os.path.ismount(CONFIGFS):
                subprocess.run(["mount", "-t", "configfs", "configfs", str(CONFIGFS)], check=True, capture_output=True)
            # rtslib refuses to start without its database directory.
            Path("/etc/target").mkdir(mode=0o700, exist_ok=True)
            self._root = rtslib_fb.RTSRoot()
            self._iscsi = rtslib_fb.FabricModule("iscsi")
        except (RTSLibError, OSError, subprocess.CalledProcessError) as exc:
            raise KernelError(f"LIO is not available on this node: {exc}") from exc
        _enable_negotiation_log()

    @property
    def fabric(self) -> rtslib_fb.FabricModule:
        assert self._iscsi is not None, "LioKernel.open() was not called"
        return self._iscsi

    # -- reading -------------------------------------------------------------------------

    def observe(self, storage_objects: Iterable[str], targets: Iterable[str]) -> KernelConfig:
        """Read the named backstores and targets; the ones missing from LIO are left out."""
        try:
            objects = {so.name: so for so in (self._find_storage_object(n) for n in storage_objects) if so}
            found = {t.iqn: t for t in (self._read_target(iqn) for iqn in targets) if t}
            discovery = self._read_discovery_auth()
        except RTSLibError as exc:
            raise KernelError(f"cannot read the LIO configuration: {exc}") from exc
        return KernelConfig(storage_objects=objects, targets=found, discovery_auth=discovery)

    def _read_discovery_auth(self) -> Chap | None:
        fabric = self.fabric
        if not fabric.discovery_enable_auth:
            return None
        return Chap(
            fabric.discovery_userid,
            fabric.discovery_password,
            fabric.discovery_mutual_userid,
            fabric.discovery_mutual_password,
        )

    def _find_storage_object(self, name: str) -> StorageObject | None:
        so = _lookup_storage_object(name)
        if so is None:
            return None
        if isinstance(so, rtslib_fb.BlockStorageObject):
            return StorageObject(so.name, so.udev_path, 0, so.wwn, plugin="block")
        return StorageObject(so.name, so.udev_path, so.size, so.wwn, so.write_back)

    def _read_target(self, iqn: str) -> KernelTarget | None:
        tpg = self._find_tpg(iqn)
        if tpg is None:
            return None
        acls = {}
        for acl in tpg.node_acls:
            mapped = frozenset(MappedLun(m.mapped_lun, m.tpg_lun.lun, bool(m.write_protect)) for m in acl.mapped_luns)
            acls[acl.node_wwn] = NodeAcl(acl.node_wwn, mapped, _read_acl_auth(acl))
        return KernelTarget(
            iqn=iqn,
            enabled=bool(tpg.enable),
            attributes={name: tpg.get_attribute(name) for name in TPG_ATTRIBUTES},
            parameters={name: tpg.get_parameter(name) for name in TPG_PARAMETERS},
            portals=frozenset((_unbracket(np.ip_address), int(np.port)) for np in tpg.network_portals),
            luns={lun.lun: lun.storage_object.name for lun in tpg.luns},
            acls=acls,
        )

    def _find_tpg(self, iqn: str) -> rtslib_fb.TPG | None:
        try:
            target = rtslib_fb.Target(self.fabric, iqn, mode="lookup")
            return rtslib_fb.TPG(target, TPG_TAG, mode="lookup")
        except RTSLibNotInCFSError:
            return None

    def _tpg(self, iqn: str) -> rtslib_fb.TPG:
        tpg = self._find_tpg(iqn)
        if tpg is None:
            raise RTSLibError(f"target {iqn} does not exist")
        return tpg

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

    # -- changing ------------------------------------------------------------------------

    def apply(self, actions: Sequence[plan.Action]) -> None:
        for action in actions:
            try:
                self._apply(action)
            except (RTSLibError, OSError) as exc:
                raise KernelError(f"LIO refused {_describe(action)}: {exc}") from exc
            log.debug("applied %s", _describe(action))

    @singledispatchmethod
    def _apply(self, action: plan.Action) -> None:
        raise TypeError(f"no handler for {action!r}")

    @_apply.register
    def _(self, action: plan.CreateStorageObject) -> None:
        want = action.storage_object
        have = self._find_storage_object(want.name)
        if have == want:
            return
        if have is not None:
            raise RTSLibError(f"backstore {want.name} exists with other settings")
        if want.plugin == "block":
            rtslib_fb.BlockStorageObject(want.name, dev=want.path, wwn=want.serial)
        else:
            rtslib_fb.FileIOStorageObject(
                want.name, dev=want.path, size=want.size, wwn=want.serial, write_back=want.write_back
            )

    @_apply.register
    def _(self, action: plan.GrowStorageObject) -> None:
        so = rtslib_fb.FileIOStorageObject(action.name)
        if so.size < action.size:
            # fileio reads its size from fd_dev_size on every READ CAPACITY, and the control
            # file accepts a new value on a live device.
            fwrite(f"{so.path}/control", f"fd_dev_size={action.size}")

    @_apply.register
    def _(self, action: plan.DeleteStorageObject) -> None:
        so = _lookup_storage_object(action.name)
        if so is not None:
            so.delete()

    @_apply.register
    def _(self, action: plan.CreateTarget) -> None:
        target = rtslib_fb.Target(self.fabric, action.iqn, mode="any")
        rtslib_fb.TPG(target, TPG_TAG, mode="any")

    @_apply.register
    def _(self, action: plan.DeleteTarget) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.Target(self.fabric, action.iqn, mode="lookup").delete()

    @_apply.register
    def _(self, action: plan.SetTpgAttributes) -> None:
        tpg = self._tpg(action.iqn)
        for name, value in action.attributes:
            tpg.set_attribute(name, value)

    @_apply.register
    def _(self, action: plan.SetTpgParameters) -> None:
        tpg = self._tpg(action.iqn)
        for name, value in action.parameters:
            tpg.set_parameter(name, value)

    @_apply.register
    def _(self, action: plan.SetTpgEnabled) -> None:
        self._tpg(action.iqn).enable = action.enabled

    @_apply.register
    def _(self, action: plan.AddPortal) -> None:
        rtslib_fb.NetworkPortal(self._tpg(action.iqn), _bracket(action.address), action.port, mode="any")

    @_apply.register
    def _(self, action: plan.RemovePortal) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.NetworkPortal(
                self._tpg(action.iqn), _bracket(action.address), action.port, mode="lookup"
            ).delete()

    @_apply.register
    def _(self, action: plan.AddLun) -> None:
        tpg = self._tpg(action.iqn)
        existing = next((lun for lun in tpg.luns if lun.lun == action.lun), None)
        if existing is not None:
            if existing.storage_object.name == action.storage_object:
                return
            raise RTSLibError(f"LUN {action.lun} exists with backstore {existing.storage_object.name}")
        so = _lookup_storage_object(action.storage_object)
        if so is None:
            raise RTSLibError(f"backstore {action.storage_object} does not exist")
        rtslib_fb.LUN(tpg, lun=action.lun, storage_object=so)

    @_apply.register
    def _(self, action: plan.RemoveLun) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.LUN(self._tpg(action.iqn), lun=action.lun).delete()

    @_apply.register
    def _(self, action: plan.AddAcl) -> None:
        rtslib_fb.NodeACL(self._tpg(action.iqn), action.initiator, mode="any")

    @_apply.register
    def _(self, action: plan.RemoveAcl) -> None:
        with contextlib.suppress(RTSLibNotInCFSError):
            rtslib_fb.NodeACL(self._tpg(action.iqn), action.initiator, mode="lookup").delete()

    @_apply.register
    def _(self, action: plan.SetAclAuth) -> None:
        acl = rtslib_fb.NodeACL(self._tpg(action.iqn), action.initiator, mode="lookup")
        auth = action.auth or Chap()
        acl.chap_userid = auth.user
        acl.chap_password = auth.secret
        acl.chap_mutual_userid = auth.mutual_user
        acl.chap_mutual_password = auth.mutual_secret
        # Per-ACL enforcement (Linux ≥ 5.19): the TPG-wide switch would also force CHAP on
        # the target's other initiators.
        acl.set_attribute("authentication", "1" if action.auth else "0")

    @_apply.register
    def _(self, action: plan.SetDiscoveryAuth) -> None:
        fabric = self.fabric
        auth = action.auth or Chap()
        fabric.discovery_userid = auth.user
        fabric.discovery_password = auth.secret
        fabric.discovery_mutual_userid = auth.mutual_user
        fabric.discovery_mutual_password = auth.mutual_secret
        fabric.discovery_enable_auth = action.auth is not None

    @_apply.register
    def _(self, action: plan.MapLun) -> None:
        acl = rtslib_fb.NodeACL(self._tpg(action.iqn), action.initiator, mode="lookup")
        want = action.mapped_lun
        for existing in acl.mapped_luns:
            if existing.mapped_lun == want.mapped_lun:
                if existing.tpg_lun.lun == want.tpg_lun and bool(existing.write_protect) == want.write_protect:
                    return
                raise RTSLibError(f"mapped LUN {want.mapped_lun} exists with other settings")
        rtslib_fb.MappedLUN(acl, want.mapped_lun, want.tpg_lun, want.write_protect)

    @_apply.register
    def _(self, action: plan.UnmapLun) -> None:
        try:
            acl = rtslib_fb.NodeACL(self._tpg(action.iqn), action.initiator, mode="lookup")
            rtslib_fb.MappedLUN(acl, action.mapped_lun).delete()
        except RTSLibNotInCFSError:
            pass


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


def _read_statistic(statistics: str, name: str) -> str:
    fd = os.open(f"{statistics}/{name}", os.O_RDONLY)
    try:
        return os.read(fd, 4096).decode(errors="replace").strip()
    finally:
        os.close(fd)


def _totals_unchanged(statistics: str, last: LoginCounters) -> bool:
    # login_fails is LIO's sum of the failure counters (and of redirects, which applianced
    # never configures): counters only grow, so equal totals mean nothing happened.
    fails = last.authorize_fails + last.authenticate_fails + last.negotiate_fails + last.other_fails
    return (
        int(_read_statistic(statistics, "iscsi_login_stats/accepts")) == last.accepts
        and int(_read_statistic(statistics, "iscsi_tgt_attr/login_fails")) == fails
    )


def _read_login_counters(statistics: str) -> LoginCounters:
    def read(name: str) -> str:
        return _read_statistic(statistics, name)

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


def _lookup_storage_object(name: str) -> rtslib_fb.StorageObject | None:
    # Disk names are unique across kinds, so a name is looked up in both backends.
    for backstore in (rtslib_fb.FileIOStorageObject, rtslib_fb.BlockStorageObject):
        try:
            return backstore(name)
        except RTSLibNotInCFSError:
            continue
    return None


def _read_acl_auth(acl: rtslib_fb.NodeACL) -> Chap | None:
    if acl.get_attribute("authentication") != "1":
        return None
    return Chap(acl.chap_userid, acl.chap_password, acl.chap_mutual_userid, acl.chap_mutual_password)


def _bracket(address: str) -> str:
    # rtslib wants IPv6 portal addresses in brackets, as configfs names them.
    return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address


def _unbracket(address: str) -> str:
    return address[1:-1] if address.startswith("[") else address


def _describe(action: plan.Action) -> str:
    # repr() of a dataclass leaves out CHAP secrets (field(repr=False)), so the description
    # is safe to log and to send to the caller.
    return repr(action)
