"""An in-memory stand-in for LIO, for unit tests and the D-Bus tier on the host.

It gives each plan action the meaning LIO gives it, refuses what LIO refuses (a LUN on a
missing backstore, a mapping to a missing LUN), and can be told to fail on one kind of
action to exercise roll-back. With a file it outlives the daemon process, as the kernel
does, and logs every action so that tests can count what a restart changed. It proves
logic only; what LIO really does is proven in the VM tier.

Login activity (counters, kernel log lines, sessions, boot id) is set by tests directly,
or, for a daemon in another process, written to ``<kernel file>.activity.json``, which
is read again on every sample.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from applianced.errors import KernelError
from applianced.iscsi.kernel import plan
from applianced.iscsi.kernel.model import (
    DEVICE_NODE_DIR,
    DISK_DEVICE_PREFIX,
    DiskDevice,
    KernelConfig,
    KernelTarget,
    LoginActivity,
    LoginCounters,
    LogPosition,
    MappedLun,
    NodeAcl,
    Session,
    StorageObject,
    TargetSessions,
)
from applianced.iscsi.kernel.negotiation import is_negotiation_line
from applianced.state import Chap

# Set in the daemon's environment to make the fake refuse one action type ("AddAcl"), or
# crash on it with an unforeseen exception ("crash:AddAcl").
FAIL_ENV = "APPLIANCED_FAKE_KERNEL_FAIL"
# Set to a number of seconds that each sessions() read takes, so that a test can act while
# a property read is in progress.
SLOW_SESSIONS_ENV = "APPLIANCED_FAKE_KERNEL_SLOW_SESSIONS"


class FakeKernel:
    def __init__(self, path: Path | None = None, fail_on: str | None = None, sessions_delay: float = 0.0) -> None:
        self.path = path
        self.fail_on = fail_on
        self.sessions_delay = sessions_delay
        self.storage_objects: dict[str, StorageObject] = {}
        # Disk devices by disk name; only their names and tables, as device-mapper has them.
        self.disk_devices: dict[str, DiskDevice] = {}
        self.targets: dict[str, KernelTarget] = {}
        self.session_list: list[Session] = []
        self.discovery_auth: Chap | None = None
        self.applied: list[plan.Action] = []
        # The target each sessions() call read, so that tests can count the reads.
        self.session_reads: list[str] = []
        self.opened = False
        self.boot_id = "boot-1"
        self.login_counters: dict[str, LoginCounters] = {}
        # Kernel log messages; a message's sequence number is its index.
        self.kernel_log: list[str] = []
        # LIO's saved persistent reservations by unit serial: files beside the state file, as
        # LIO has them under its dbroot, so that a test can write them as LIO would.
        self.reservations: dict[str, str] = {}

    def open(self) -> None:
        self.opened = True
        if self.path and self.path.exists():
            self._load()

    # -- Kernel protocol --------------------------------------------------------------

    def observe(
        self, storage_objects: Iterable[str], targets: Iterable[str], disk_devices: Mapping[str, DiskDevice]
    ) -> KernelConfig:
        names = list(storage_objects)
        return KernelConfig(
            storage_objects={n: self.storage_objects[n] for n in names if n in self.storage_objects},
            targets={iqn: self.targets[iqn] for iqn in targets if iqn in self.targets},
            discovery_auth=self.discovery_auth,
            disk_devices={n: self.disk_devices[n] for n in names if n in self.disk_devices},
        )

    def snapshot(self) -> KernelConfig:
        return KernelConfig(
            dict(self.storage_objects), dict(self.targets), self.discovery_auth, dict(self.disk_devices)
        )

    def sessions(self, target_iqn: str) -> TargetSessions:
        time.sleep(self.sessions_delay)
        self._load_activity()
        self.session_reads.append(target_iqn)
        sessions = tuple(s for s in self.session_list if s.target_iqn == target_iqn)
        return TargetSessions(sessions, len(sessions))

    def saved_reservations(self, serials: Iterable[str]) -> dict[str, str]:
        return {serial: self._saved_reservations(serial) for serial in serials}

    def _saved_reservations(self, serial: str) -> str:
        path = self.reservations_file(serial)
        if path is None:
            return self.reservations.get(serial, "")
        return path.read_text() if path.exists() else ""

    def keep_reservations(self, serial: str, saved: str) -> None:
        path = self.reservations_file(serial)
        if path is None:
            self.reservations[serial] = saved
        elif saved:
            path.parent.mkdir(exist_ok=True)
            path.write_text(saved)
        else:
            path.unlink(missing_ok=True)

    def reservations_file(self, serial: str) -> Path | None:
        return self.path.with_suffix(".pr") / f"aptpl_{serial}" if self.path else None

    def login_activity(
        self, targets: Iterable[str], position: LogPosition | None, known: Mapping[str, LoginCounters]
    ) -> LoginActivity:
        self._load_activity()
        counters = {iqn: self.login_counters.get(iqn, LoginCounters()) for iqn in targets if iqn in self.targets}
        if position is None:
            start = len(self.kernel_log)
        else:
            start = position.seq + 1 if position.boot_id == self.boot_id else 0
        lines = tuple(m for m in self.kernel_log[start:] if m.startswith("iSCSI ") or is_negotiation_line(m))
        return LoginActivity(self.boot_id, counters, lines, LogPosition(self.boot_id, len(self.kernel_log) - 1))

    def _load_activity(self) -> None:
        path = self.path.with_suffix(".activity.json") if self.path else None
        if path is None or not path.exists():
            return
        data = json.loads(path.read_text())
        self.boot_id = data.get("boot_id", self.boot_id)
        self.login_counters = {iqn: LoginCounters(**c) for iqn, c in data.get("counters", {}).items()}
        self.kernel_log = data.get("log", [])
        self.session_list = [
            Session(s["target_iqn"], s["initiator"], "LOGGED_IN", tuple(s["addresses"]))
            for s in data.get("sessions", [])
        ]

    def apply(self, actions: Sequence[plan.Action]) -> None:
        try:
            for action in actions:
                kind = type(action).__name__
                if self.fail_on == kind:
                    raise KernelError(f"injected failure on {kind}")
                if self.fail_on == f"crash:{kind}":
                    raise RuntimeError(f"injected crash on {kind}")
                self._apply(action)
                self.applied.append(action)
        finally:
            self._save()

    def _apply(self, action: plan.Action) -> None:
        match action:
            case plan.CreateDiskDevice(device=device) | plan.ReloadDiskDevice(device=device):
                self.disk_devices[_disk_of(device.name)] = device
            case plan.RemoveDiskDevice(name=name):
                disk = _disk_of(name)
                if any(so.path == self.disk_devices[disk].node for so in self.storage_objects.values()):
                    raise KernelError(f"device {name} is in use by a backstore")
                self.disk_devices.pop(disk, None)
            case plan.CreateStorageObject(storage_object=so):
                if self.storage_objects.get(so.name, so) != so:
                    raise KernelError(f"backstore {so.name} exists with other settings")
                if (
                    so.plugin == "block"
                    and so.path.startswith(DEVICE_NODE_DIR)
                    and not any(d.node == so.path for d in self.disk_devices.values())
                ):
                    raise KernelError(f"device {so.path} does not exist")
                self.storage_objects[so.name] = so
            case plan.GrowStorageObject(name=name, size=size):
                so = self.storage_objects[name]
                if size < so.size:
                    raise KernelError("backstores only grow")
                self.storage_objects[name] = dataclasses.replace(so, size=size)
            case plan.DeleteStorageObject(name=name):
                if any(name in t.luns.values() for t in self.targets.values()):
                    raise KernelError(f"backstore {name} is in use by a LUN")
                self.storage_objects.pop(name, None)
            case plan.CreateTarget(iqn=iqn):
                self.targets.setdefault(iqn, KernelTarget(iqn=iqn, enabled=False))
            case plan.DeleteTarget(iqn=iqn):
                self.targets.pop(iqn, None)
            case plan.SetTpgAttributes(iqn=iqn, attributes=attributes):
                self._update(iqn, attributes={**self._target(iqn).attributes, **dict(attributes)})
            case plan.SetTpgParameters(iqn=iqn, parameters=parameters):
                self._update(iqn, parameters={**self._target(iqn).parameters, **dict(parameters)})
            case plan.SetTpgEnabled(iqn=iqn, enabled=enabled):
                self._update(iqn, enabled=enabled)
            case plan.AddPortal(iqn=iqn, address=address, port=port):
                self._update(iqn, portals=self._target(iqn).portals | {(address, port)})
            case plan.RemovePortal(iqn=iqn, address=address, port=port):
                self._update(iqn, portals=self._target(iqn).portals - {(address, port)})
            case plan.AddLun(iqn=iqn, lun=lun, storage_object=name):
                if name not in self.storage_objects:
                    raise KernelError(f"backstore {name} does not exist")
                luns = self._target(iqn).luns
                if luns.get(lun, name) != name:
                    raise KernelError(f"LUN {lun} exists with another backstore")
                self._update(iqn, luns={**luns, lun: name})
            case plan.RemoveLun(iqn=iqn, lun=lun):
                target = self._target(iqn)
                acls = {
                    i: dataclasses.replace(a, mapped_luns=frozenset(m for m in a.mapped_luns if m.tpg_lun != lun))
                    for i, a in target.acls.items()
                }
                self._update(iqn, luns={k: v for k, v in target.luns.items() if k != lun}, acls=acls)
            case plan.AddAcl(iqn=iqn, initiator=initiator):
                acls = self._target(iqn).acls
                self._update(iqn, acls={initiator: NodeAcl(initiator), **acls})
            case plan.RemoveAcl(iqn=iqn, initiator=initiator):
                self._update(iqn, acls={k: v for k, v in self._target(iqn).acls.items() if k != initiator})
            case plan.SetAclAuth(iqn=iqn, initiator=initiator, auth=auth):
                target = self._target(iqn)
                if initiator not in target.acls:
                    raise KernelError(f"ACL {initiator} does not exist")
                acl = dataclasses.replace(target.acls[initiator], auth=auth)
                self._update(iqn, acls={**target.acls, initiator: acl})
            case plan.SetDiscoveryAuth(auth=auth):
                self.discovery_auth = auth
            case plan.MapLun(iqn=iqn, initiator=initiator, mapped_lun=mapped):
                target = self._target(iqn)
                if mapped.tpg_lun not in target.luns or initiator not in target.acls:
                    raise KernelError("mapping to a missing LUN or ACL")
                acl = target.acls[initiator]
                if any(m.mapped_lun == mapped.mapped_lun and m != mapped for m in acl.mapped_luns):
                    raise KernelError(f"mapped LUN {mapped.mapped_lun} exists with other settings")
                new_acl = dataclasses.replace(acl, mapped_luns=acl.mapped_luns | {mapped})
                self._update(iqn, acls={**target.acls, initiator: new_acl})
            case plan.UnmapLun(iqn=iqn, initiator=initiator, mapped_lun=number):
                target = self._target(iqn)
                acl = target.acls.get(initiator)
                if acl is not None:
                    kept = dataclasses.replace(
                        acl, mapped_luns=frozenset(m for m in acl.mapped_luns if m.mapped_lun != number)
                    )
                    self._update(iqn, acls={**target.acls, initiator: kept})
            case _:
                raise TypeError(f"unknown action {action!r}")

    def _target(self, iqn: str) -> KernelTarget:
        try:
            return self.targets[iqn]
        except KeyError:
            raise KernelError(f"target {iqn} does not exist") from None

    def _update(self, iqn: str, **changes: Any) -> None:
        self.targets[iqn] = dataclasses.replace(self._target(iqn), **changes)

    # -- persistence across daemon processes ------------------------------------------

    def wipe(self) -> None:
        """Forget everything, as a reboot does to LIO."""
        self.storage_objects.clear()
        self.disk_devices.clear()
        self.targets.clear()
        self.discovery_auth = None
        self._save()

    def _save(self) -> None:
        if not self.path:
            return
        data = {
            "storage_objects": [dataclasses.asdict(so) for so in self.storage_objects.values()],
            "disk_devices": [dataclasses.asdict(d) for d in self.disk_devices.values()],
            "targets": [_target_to_json(t) for t in self.targets.values()],
            "sessions": [dataclasses.asdict(s) for s in self.session_list],
            "discovery_auth": _auth_to_json(self.discovery_auth),
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)
        with self.path.with_suffix(".log").open("a") as log:
            for action in self.applied:
                log.write(type(action).__name__ + "\n")
        self.applied.clear()

    def _load(self) -> None:
        data = json.loads(self.path.read_text())
        self.storage_objects = {so["name"]: StorageObject(**so) for so in data["storage_objects"]}
        devices = (DiskDevice(**d) for d in data.get("disk_devices", []))
        self.disk_devices = {_disk_of(d.name): d for d in devices}
        self.targets = {t["iqn"]: _target_from_json(t) for t in data["targets"]}
        self.session_list = [
            Session(**{**s, "addresses": tuple(s["addresses"]), "portals": tuple(s.get("portals", ()))})
            for s in data.get("sessions", [])
        ]
        self.discovery_auth = _auth_from_json(data.get("discovery_auth"))


def _disk_of(device_name: str) -> str:
    return device_name.removeprefix(DISK_DEVICE_PREFIX)


def _target_to_json(target: KernelTarget) -> dict[str, Any]:
    return {
        "iqn": target.iqn,
        "enabled": target.enabled,
        "attributes": dict(target.attributes),
        "parameters": dict(target.parameters),
        "portals": sorted(target.portals),
        "luns": {str(k): v for k, v in target.luns.items()},
        "acls": {
            i: {"mapped_luns": [dataclasses.asdict(m) for m in a.mapped_luns], "auth": _auth_to_json(a.auth)}
            for i, a in target.acls.items()
        },
    }


def _target_from_json(data: dict[str, Any]) -> KernelTarget:
    return KernelTarget(
        iqn=data["iqn"],
        enabled=data["enabled"],
        attributes=data["attributes"],
        parameters=data["parameters"],
        portals=frozenset((a, p) for a, p in data["portals"]),
        luns={int(k): v for k, v in data["luns"].items()},
        acls={
            i: NodeAcl(i, frozenset(MappedLun(**m) for m in a["mapped_luns"]), _auth_from_json(a["auth"]))
            for i, a in data["acls"].items()
        },
    )


def _auth_to_json(auth: Chap | None) -> dict[str, str] | None:
    return dataclasses.asdict(auth) if auth else None


def _auth_from_json(data: dict[str, str] | None) -> Chap | None:
    return Chap(**data) if data else None
