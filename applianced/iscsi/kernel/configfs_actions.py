"""Carries out the plan actions that build and configure LIO objects, by writing configfs.

A restore after a reboot is nothing but these actions: backstores, targets, TPG values,
portals, LUNs, ACLs, CHAP and mapped LUNs, ten to twenty configfs operations per target.
Through rtslib-fb 2.2 each operation cost several milliseconds of Python under emulation on
top of the kernel's own work (bench/README.md); here each is one system call. The writes
are the ones rtslib makes, in its order, and the objects look the same to rtslib and
targetcli afterwards (tests/vm/test_lio_backend.py). Removals stay with rtslib
(``rtslib_actions.py``), whose recursive deletes know LIO's teardown order.

Each action is idempotent: it looks at what LIO holds before it changes anything, so a
plan interrupted by a crash can simply be run again. A half-made object left by a crash
reads as an object with other settings (``configfs.py``), which the plan replaces.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from collections.abc import Sequence
from functools import singledispatchmethod
from pathlib import Path

from applianced.errors import KernelError
from applianced.iscsi.kernel import configfs, plan
from applianced.iscsi.kernel.model import REGISTRATION_START, StorageObject
from applianced.state import Chap

log = logging.getLogger(__name__)

# The HBA directory prefix of each backstore plugin applianced uses.
HBA_PREFIXES = {plugin: prefix for prefix, plugin in configfs.BACKSTORE_DIRS.items()}
# rtslib-fb and targetcli take this lock while they pick a new HBA index; so does this module,
# so that a backstore made by targetcli at the same moment never takes the same directory.
HBA_INDEX_LOCK = "/var/run/rtslib_backstore.lock"


class Conflict(Exception):
    """LIO holds an object of that name with settings the plan did not expect."""


class ConfigfsActions:
    """Builds LIO objects for one ``apply`` run; what it caches is valid only within the run."""

    def __init__(self) -> None:
        # Backstore name -> (plugin, directory), listed on first need.
        self._backstores: dict[str, tuple[str, str]] | None = None
        # Indexes of the HBA directories in core/, listed on first need.
        self._hba_indexes: set[int] | None = None

    def apply(self, actions: Sequence[plan.Action]) -> None:
        for action in actions:
            try:
                self._apply(action)
            except (Conflict, OSError, ValueError) as exc:
                raise KernelError(f"LIO refused {plan.describe(action)}: {exc}") from exc
            if log.isEnabledFor(logging.DEBUG):
                log.debug("applied %s", plan.describe(action))

    def _known_backstores(self) -> dict[str, tuple[str, str]]:
        if self._backstores is None:
            self._backstores = configfs.backstores()
        return self._backstores

    @singledispatchmethod
    def _apply(self, action: plan.Action) -> None:
        raise TypeError(f"no configfs handler for {action!r}")

    @_apply.register
    def _(self, action: plan.CreateStorageObject) -> None:
        want = action.storage_object
        found = self._known_backstores().get(want.name)
        if found is not None:
            if configfs.storage_object(want.name, *found) == want:
                return
            raise Conflict(f"backstore {want.name} exists with other settings")
        if want.plugin == "fileio" and not os.path.isfile(want.path):
            # LIO would create the file, empty, and initiators would read zeros where their
            # data was (a disk directory whose file system did not mount, say).
            raise Conflict(f"the disk file {want.path} is missing or not a regular file")
        hba = self._make_hba(HBA_PREFIXES[want.plugin])
        path = f"{hba}/{want.name}"
        os.mkdir(path)
        self._known_backstores()[want.name] = (want.plugin, path)
        _configure_storage_object(path, want)

    @_apply.register
    def _(self, action: plan.GrowStorageObject) -> None:
        plugin, path = self._backstore(action.name)
        if plugin != "fileio":
            raise Conflict(f"backstore {action.name} is not a file")
        # fileio reads its size from fd_dev_size on every READ CAPACITY, and the control
        # file accepts a new value on a live device.
        if configfs.storage_object(action.name, plugin, path).size < action.size:
            configfs.write(f"{path}/control", f"fd_dev_size={action.size}")

    @_apply.register
    def _(self, action: plan.CreateTarget) -> None:
        # The first target's directory registers the iSCSI fabric (its module is loaded).
        for path in (configfs.ISCSI, f"{configfs.ISCSI}/{action.iqn}", _tpg(action.iqn)):
            _make_dir(path)

    @_apply.register
    def _(self, action: plan.SetTpgAttributes) -> None:
        _write_changed(_tpg(action.iqn), "attrib", action.attributes)

    @_apply.register
    def _(self, action: plan.SetTpgParameters) -> None:
        _write_changed(_tpg(action.iqn), "param", action.parameters)

    @_apply.register
    def _(self, action: plan.SetTpgEnabled) -> None:
        configfs.write(f"{_tpg(action.iqn)}/enable", "1" if action.enabled else "0")

    @_apply.register
    def _(self, action: plan.AddPortal) -> None:
        _make_dir(f"{_tpg(action.iqn)}/np/{configfs.portal_name(action.address, action.port)}")

    @_apply.register
    def _(self, action: plan.AddLun) -> None:
        path = f"{_tpg(action.iqn)}/lun/lun_{action.lun}"
        if os.path.isdir(path):
            existing = configfs.lun(path)
            if existing == action.storage_object:
                return
            raise Conflict(f"LUN {action.lun} exists with backstore {existing or '(none)'}")
        _plugin, backstore = self._backstore(action.storage_object)
        os.mkdir(path)
        os.symlink(backstore, f"{path}/{_link_name()}")

    @_apply.register
    def _(self, action: plan.AddAcl) -> None:
        _make_dir(f"{_tpg(action.iqn)}/acls/{action.initiator}")

    @_apply.register
    def _(self, action: plan.SetAclAuth) -> None:
        acl = f"{_tpg(action.iqn)}/acls/{action.initiator}"
        _write_chap(f"{acl}/auth", action.auth or Chap())
        # Per-ACL enforcement (Linux ≥ 5.19): the TPG-wide switch would also force CHAP on
        # the target's other initiators.
        configfs.write(f"{acl}/attrib/authentication", "1" if action.auth else "0")

    @_apply.register
    def _(self, action: plan.SetDiscoveryAuth) -> None:
        _make_dir(configfs.ISCSI)
        path = f"{configfs.ISCSI}/discovery_auth"
        _write_chap(path, action.auth or Chap())
        configfs.write(f"{path}/enforce_discovery_auth", "1" if action.auth else "0")

    @_apply.register
    def _(self, action: plan.MapLun) -> None:
        tpg = _tpg(action.iqn)
        acl = f"{tpg}/acls/{action.initiator}"
        want = action.mapped_lun
        path = f"{acl}/lun_{want.mapped_lun}"
        if os.path.isdir(path):
            if configfs.mapped_lun(acl, want.mapped_lun) == want:
                return
            raise Conflict(f"mapped LUN {want.mapped_lun} exists with other settings")
        lun = f"{tpg}/lun/lun_{want.tpg_lun}"
        if not os.path.isdir(lun):
            raise Conflict(f"LUN {want.tpg_lun} does not exist")
        os.mkdir(path)
        os.symlink(lun, f"{path}/{_link_name()}")
        configfs.write(f"{path}/write_protect", "1" if want.write_protect else "0")

    def _make_hba(self, prefix: str) -> str:
        """Make a new HBA directory (``core/fileio_7``) at the lowest index no HBA uses.

        core/ is listed once per run, not once per backstore (a restore makes hundreds), and
        again only when the directory turns out to exist: another tool made it meanwhile.
        An index another tool took under the other prefix may then be used twice (fileio_3
        and iblock_3), which LIO and rtslib accept: the directory names differ.
        """
        with Path(HBA_INDEX_LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for _ in range(2):
                if self._hba_indexes is None:
                    self._hba_indexes = _hba_indexes()
                index = min(set(range(len(self._hba_indexes) + 1)) - self._hba_indexes)
                path = f"{configfs.CORE}/{prefix}_{index}"
                try:
                    os.mkdir(path)
                except FileExistsError:
                    self._hba_indexes = None
                    continue
                self._hba_indexes.add(index)
                return path
            raise Conflict(f"{path} appeared twice while it was being made")

    def _backstore(self, name: str) -> tuple[str, str]:
        found = self._known_backstores().get(name)
        if found is None:
            raise Conflict(f"backstore {name} does not exist")
        return found


def _configure_storage_object(path: str, want: StorageObject) -> None:
    """Configure and enable a new backstore directory, with rtslib's writes in rtslib's order."""
    if want.plugin == "block":
        # iblock opens the device exclusively: a mounted or held device is refused.
        configfs.write(f"{path}/control", f"udev_path={want.path},readonly=0")
    else:
        configfs.write(f"{path}/control", f"fd_dev_name={want.path},fd_dev_size={want.size}")
        if want.write_back:
            configfs.write(f"{path}/attrib/emulate_write_cache", "1")
            configfs.write(f"{path}/control", "fd_buffered_io=1")
    configfs.write(f"{path}/udev_path", want.path)
    configfs.write(f"{path}/enable", "1")
    configfs.write(f"{path}/wwn/vpd_unit_serial", want.serial)
    _restore_persistent_reservations(path, want.serial)


def _restore_persistent_reservations(path: str, serial: str) -> None:
    """Hand a new backstore the registrations that initiators made persistent (APTPL).

    LIO saves them in a file whenever they change (``configfs.reservations_file``), but reads
    them back only when they are written to the device's ``pr/res_aptpl_metadata``, one
    registration per write. This is what rtslib does for every backstore it makes. After a
    failover the file is the one the former active node's LIO saved (``Failover``).
    """
    try:
        words = configfs.reservations_file(serial).read_text().split()
    except OSError:
        return
    registration: list[str] | None = None
    for word in words:
        if word.startswith(REGISTRATION_START):
            registration = []
        elif word.startswith("PR_REG_END:"):
            if registration:
                configfs.write(f"{path}/pr/res_aptpl_metadata", ",".join(registration))
            registration = None
        elif registration is not None:
            registration.append(word)


def _hba_indexes() -> set[int]:
    # Every HBA counts, of any plugin and empty or not: rtslib takes one index space too.
    suffixes = (name.rpartition("_")[2] for name in os.listdir(configfs.CORE))
    return {int(suffix) for suffix in suffixes if suffix.isdigit()}


def _tpg(iqn: str) -> str:
    return configfs.tpg_path(iqn, configfs.TPG_TAG)


def _link_name() -> str:
    # rtslib names a LUN's link by a random "alias" of 10 characters; LIO ignores the name.
    return uuid.uuid4().hex[-10:]


def _make_dir(path: str) -> None:
    if not os.path.isdir(path):
        os.mkdir(path)


def _write_changed(tpg: str, kind: str, values: tuple[tuple[str, str], ...]) -> None:
    """Write only the TPG values that differ: a new TPG already has most of them."""
    have = configfs.tpg_values(tpg, kind, (name for name, _ in values))
    for name, value in values:
        if have[name] != value:
            configfs.write(f"{tpg}/{kind}/{name}", value)


def _write_chap(directory: str, chap: Chap) -> None:
    # LIO clears a credential when it is written as "NULL", the way it shows one unset.
    values = (chap.user, chap.secret, chap.mutual_user, chap.mutual_secret)
    for name, value in zip(configfs.AUTH_FILES, values, strict=True):
        configfs.write(f"{directory}/{name}", value or "NULL")
