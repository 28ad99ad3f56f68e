"""Recently seen initiators: who logged in to this node's targets, who was refused, and why.

LIO keeps login statistics per target (counters since the target was made, plus the name
and address of its last failed login), lists logged-in sessions in its ACLs, and logs
the name of an initiator it refuses for not being in the ACL. A sampler reads them every
few seconds, turns counter increases into sightings and keeps them, per node, for seven
days in a JSON file next to the state file. The file also keeps the last counter values
and kernel log position, so a daemon restart counts nothing twice.

Names are only ever taken from what the kernel reports: when several logins fall into
one sample and the kernel named only the last, the others are counted without a name.

The same kernel log records what each login negotiated (kernel/negotiation.py): the
sampler keeps the newest values of every initiator that still has a session, in the
same file, for the target's ``Sessions``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from applianced.iscsi.kernel import negotiation
from applianced.iscsi.kernel.model import LoginActivity, LoginCounters, LogPosition, Session, TargetSessions
from applianced.state import Config, write_private_file

log = logging.getLogger(__name__)

FILE_NAME = "initiators.json"
FORMAT_VERSION = 1
WINDOW = 7 * 24 * 3600.0
SAMPLE_INTERVAL = 5.0
# Reading a target's sessions costs more than its counters (bench/seen_sample.py): they are
# read for the targets with new logins, and every few minutes for all, to show that
# logged-in initiators are still there.
SESSION_REFRESH = 300.0

LOGGED_IN = "logged-in"
REFUSED = "refused"
# Why a login was refused.
NOT_IN_ACL = "not-in-acl"
CHAP = "chap"
NEGOTIATION = "negotiation"
OTHER = "other"

COUNTERS = ("accepts", "authorize_fails", "authenticate_fails", "negotiate_fails", "other_fails")
NOT_AUTHORIZED = re.compile(r"iSCSI Initiator Node: (\S+) is not authorized to access iSCSI target portal group: \d+\.")
# Logged once for every failed login on any target (iscsi_target_login_sess_out).
LOGIN_FAILED = "iSCSI Login negotiation failed."


class LoginSource(Protocol):
    """The part of the kernel adapter the sampler reads.

    ``login_activity`` may return ``known`` (the counters it returned with ``position``)
    again for targets whose login totals did not move, to keep a sample cheap.
    """

    def login_activity(
        self, targets: Iterable[str], position: LogPosition | None, known: Mapping[str, LoginCounters]
    ) -> LoginActivity: ...

    def sessions(self, target_iqn: str) -> TargetSessions: ...


@dataclass(frozen=True)
class Sighting:
    """Logins of one kind seen in one sample; an empty ``initiator`` means the kernel did not name them."""

    target: str
    initiator: str
    address: str
    outcome: str
    reason: str = ""
    count: int = 1


@dataclass(frozen=True)
class SeenInitiator:
    """An initiator's logins of one outcome on one target of one node, with their last address."""

    node: str
    target: str
    initiator: str
    address: str
    outcome: str
    reason: str
    count: int
    first_seen: float
    last_seen: float

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.node, self.target, self.initiator, self.outcome, self.reason)


# -- turning counter increases into sightings ----------------------------------------------


def increase(before: LoginCounters | None, now: LoginCounters) -> LoginCounters:
    """What LIO counted since ``before``: all of ``now`` when the target was made anew meanwhile."""
    if before is None or any(getattr(now, name) < getattr(before, name) for name in COUNTERS):
        return now
    return dataclasses.replace(now, **{name: getattr(now, name) - getattr(before, name) for name in COUNTERS})


def refusals(increases: Mapping[str, LoginCounters], kernel_log: Sequence[str] | None) -> list[Sighting]:
    """The refused logins behind each target's counter increases, named where the kernel named them.

    ``kernel_log`` holds the iSCSI lines the kernel logged while the counters rose (None:
    the log is not readable here). LIO counts every failed login once as a negotiation
    failure when it drops the connection, besides the reason it answered with: outside the
    ACL (authorize_fails), CHAP (authenticate_fails), or unacceptable parameters, which
    count a second time in negotiate_fails. An initiator that gives up mid-login counts
    only once. So what negotiate_fails adds beyond the answered reasons is one or two per
    failed negotiation, and the log, with one "negotiation failed" line per failed login,
    settles it when only one target has such failures.
    """
    reasons = {
        iqn: {
            NOT_IN_ACL: d.authorize_fails,
            CHAP: d.authenticate_fails,
            OTHER: d.other_fails,
            NEGOTIATION: max(0, d.negotiate_fails - d.authorize_fails - d.authenticate_fails - d.other_fails),
        }
        for iqn, d in increases.items()
    }
    unsettled = [iqn for iqn, counts in reasons.items() if counts[NEGOTIATION]]
    answered = sum(counts[NOT_IN_ACL] + counts[CHAP] + counts[OTHER] for counts in reasons.values())
    for iqn in unsettled:
        left = reasons[iqn][NEGOTIATION]
        count = (left + 1) // 2  # the fewest failed logins that explain the counters
        if kernel_log is not None and len(unsettled) == 1:
            count = min(left, max(count, kernel_log.count(LOGIN_FAILED) - answered))
        reasons[iqn][NEGOTIATION] = count

    # A refusal outside the ACL is the one LIO logs with the initiator's name, and the one
    # its statistics leave unnamed. The log does not say which target, so names are only
    # used when they can belong to one target alone, or when they are all the same.
    denied = [m.group(1) for m in map(NOT_AUTHORIZED.fullmatch, kernel_log or ()) if m]
    outside = {iqn: counts[NOT_IN_ACL] for iqn, counts in reasons.items() if counts[NOT_IN_ACL]}

    def denied_names(iqn: str) -> list[str]:
        if len(outside) == 1 and len(denied) == outside[iqn]:
            return denied
        if len(set(denied)) == 1 and len(denied) >= sum(outside.values()):
            return denied[:1] * outside[iqn]
        return []

    sightings = []
    for iqn, counts in reasons.items():
        last = increases[iqn]
        # LIO keeps the name and address of the target's last failed login only: they tell
        # of a reason only when no other reason occurred in the sample.
        happened = [reason for reason, count in counts.items() if count]
        for reason in happened:
            known = happened == [reason]
            if reason == NOT_IN_ACL:
                names = denied_names(iqn)
            else:
                names = [last.last_fail_name] if known and last.last_fail_name else []
            sightings += _refused(iqn, reason, counts[reason], names, last.last_fail_address if known else "")
    return sightings


def _refused(target: str, reason: str, count: int, names: list[str], address: str) -> list[Sighting]:
    """``count`` refusals, the last ones named ``names`` (oldest first), the very last from ``address``."""
    names = names[-count:]
    named = Counter(names)
    sightings = [
        Sighting(target, name, address if name == names[-1] else "", REFUSED, reason, n) for name, n in named.items()
    ]
    unnamed = count - len(names)
    if unnamed:
        sightings.append(Sighting(target, "", "" if names else address, REFUSED, reason, unnamed))
    return sightings


def session_snapshot(sessions: Iterable[Session]) -> dict[str, Counter[tuple[str, str]]]:
    """Sessions as (initiator, addresses) counts per target IQN."""
    snapshot: dict[str, Counter[tuple[str, str]]] = {}
    for session in sessions:
        key = (session.initiator, ",".join(session.addresses))
        snapshot.setdefault(session.target_iqn, Counter())[key] += 1
    return snapshot


def logins(
    accepts: Mapping[str, int],
    before: Mapping[str, Counter[tuple[str, str]]],
    now: Mapping[str, Counter[tuple[str, str]]],
) -> list[Sighting]:
    """Sightings of logged-in initiators: each new session takes one counted login.

    Every initiator with a session is seen again (count 0 when its login was counted
    before). Logins that left no new session (a session that came and went between two
    samples, a reconnect) are counted without a name.
    """
    sightings = []
    for iqn in sorted(set(accepts) | set(now)):
        left = accepts.get(iqn, 0)
        present = now.get(iqn, Counter())
        new = present - before.get(iqn, Counter())
        addresses: dict[str, set[str]] = {}
        for initiator, address in present:
            addresses.setdefault(initiator, set()).update(a for a in address.split(",") if a)
        for initiator in sorted(addresses):
            counted = min(left, sum(n for (name, _), n in new.items() if name == initiator))
            left -= counted
            address = ",".join(sorted(addresses[initiator]))
            sightings.append(Sighting(iqn, initiator, address, LOGGED_IN, "", counted))
        if left:
            sightings.append(Sighting(iqn, "", "", LOGGED_IN, "", left))
    return sightings


# -- the sampler and its file ----------------------------------------------------------------


class SeenInitiators:
    """Samples the kernel (``sample``, blocking) and keeps the sightings of the last seven days."""

    def __init__(
        self,
        kernel: LoginSource,
        path: Path,
        config: Callable[[], Config],
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kernel = kernel
        self.path = path
        self._config = config
        self._clock = clock
        self._monotonic = monotonic
        # Only the sampling thread uses what follows, except _records (under _lock).
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str, str, str, str], SeenInitiator] = {}
        self._loaded = False
        self._boot_id: str | None = None
        self._counters: dict[str, LoginCounters] = {}
        self._sessions: dict[str, Counter[tuple[str, str]]] = {}
        self._log_position: LogPosition | None = None
        self._sessions_read: float | None = None
        self._negotiated: dict[tuple[str, str], dict[str, str]] = {}  # under _lock

    def negotiated(self, target_iqn: str, initiator: str) -> dict[str, str]:
        """What the initiator's newest session with the target negotiated at login (empty: unknown)."""
        with self._lock:
            return dict(self._negotiated.get((target_iqn, initiator), {}))

    def recent(self) -> list[SeenInitiator]:
        """The sightings of the last seven days, most recent first."""
        since = self._clock() - WINDOW
        with self._lock:
            records = [r for r in self._records.values() if r.last_seen >= since]
        return sorted(records, key=lambda r: (-r.last_seen, r.target, r.initiator))

    async def run(self, interval: float = SAMPLE_INTERVAL) -> None:
        """Sample until cancelled; a failed sample is logged and the next one tried."""
        failing = False
        while True:
            try:
                await asyncio.to_thread(self.sample)
                failing = False
            except Exception:
                # The watch must outlive any one bad reading (a target deleted mid-read).
                if not failing:
                    log.warning("could not sample iSCSI logins; retrying every %g s", interval, exc_info=True)
                failing = True
            await asyncio.sleep(interval)

    def sample(self) -> None:
        """Read the kernel once and record what happened since the last reading."""
        if not self._loaded:
            self.load()
        config = self._config()
        targets = sorted(target.iqn for target in config.targets.values())
        activity = self.kernel.login_activity(targets, self._log_position, self._counters)
        baseline = self._counters
        if activity.boot_id != self._boot_id:
            # LIO and the kernel log began anew with this boot, and its sessions are gone;
            # without any earlier reading, what LIO counted so far is history, not news.
            baseline = dict(activity.counters) if self._boot_id is None else {}
            self._sessions = {}
            with self._lock:
                self._negotiated = {}
        increases = {
            iqn: increase(baseline.get(iqn), now) for iqn, now in activity.counters.items() if now != baseline.get(iqn)
        }
        kernel_log = activity.log if activity.log_position is not None else None
        sightings = refusals(increases, kernel_log)
        accepts = {iqn: d.accepts for iqn, d in increases.items() if d.accepts}
        now = self._monotonic()
        refresh = self._sessions_read is None or now - self._sessions_read >= SESSION_REFRESH
        read = targets if refresh else sorted(accepts)
        if read:
            sessions = session_snapshot(s for iqn in read for s in self.kernel.sessions(iqn).sessions)
            sightings += logins(accepts, self._sessions, sessions)
            kept = {} if refresh else {iqn: c for iqn, c in self._sessions.items() if iqn not in read}
            self._sessions = kept | sessions
            if refresh:
                self._sessions_read = now
        changed = self._keep_negotiated(negotiation.parse(activity.log), read)
        changed |= self._record(config.node_id, sightings, self._clock())
        changed |= activity.boot_id != self._boot_id or dict(activity.counters) != self._counters
        self._boot_id, self._counters, self._log_position = (
            activity.boot_id,
            dict(activity.counters),
            activity.log_position,
        )
        if changed:
            self._save()

    def _keep_negotiated(self, learnt: Mapping[tuple[str, str], dict[str, str]], read: Sequence[str]) -> bool:
        """Take up what logins negotiated; forget it for initiators left without a session.

        Sessions are only known for the targets just ``read``, and what was learnt in this
        sample is kept even so: LIO logs it a moment before it lists the new session.
        """
        with self._lock:
            before = self._negotiated
            present = {(iqn, initiator) for iqn in read for initiator, _ in self._sessions.get(iqn, ())}
            kept = {key: values for key, values in before.items() if key[0] not in read or key in present}
            self._negotiated = kept | dict(learnt)
            return self._negotiated != before

    def _record(self, node: str, sightings: Sequence[Sighting], when: float) -> bool:
        changed = False
        with self._lock:
            for s in sightings:
                key = (node, s.target, s.initiator, s.outcome, s.reason)
                old = self._records.get(key)
                if old is None:
                    self._records[key] = SeenInitiator(
                        node, s.target, s.initiator, s.address, s.outcome, s.reason, s.count, when, when
                    )
                else:
                    self._records[key] = dataclasses.replace(
                        old, count=old.count + s.count, address=s.address or old.address, last_seen=when
                    )
                changed = True
            for key in [k for k, r in self._records.items() if r.last_seen < when - WINDOW]:
                del self._records[key]
                changed = True
        return changed

    # -- the file --------------------------------------------------------------------------

    def load(self) -> None:
        """Take up the kept sightings and counter values (a missing or broken file: none)."""
        self._loaded = True
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {data.get('version')!r} is not {FORMAT_VERSION}")
            records = [SeenInitiator(**item) for item in data["records"]]
            counters = {iqn: LoginCounters(**values) for iqn, values in data["counters"].items()}
            sessions = {iqn: Counter({(i, a): n for i, a, n in items}) for iqn, items in data["sessions"].items()}
            position = LogPosition(**data["log_position"]) if data["log_position"] else None
            boot_id = data["boot_id"]
            negotiated = {(t, i): dict(values) for t, i, values in data.get("negotiated", [])}
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring %s, which cannot be read: %s", self.path, exc)
            return
        with self._lock:
            self._records = {r.key: r for r in records}
            self._negotiated = negotiated
        self._counters, self._sessions, self._log_position, self._boot_id = counters, sessions, position, boot_id

    def _save(self) -> None:
        with self._lock:
            records = [dataclasses.asdict(r) for r in self._records.values()]
            negotiated = [[t, i, values] for (t, i), values in sorted(self._negotiated.items())]
        data: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "boot_id": self._boot_id,
            "log_position": dataclasses.asdict(self._log_position) if self._log_position else None,
            "counters": {iqn: dataclasses.asdict(c) for iqn, c in self._counters.items()},
            "sessions": {iqn: [[i, a, n] for (i, a), n in c.items()] for iqn, c in self._sessions.items()},
            "records": records,
            "negotiated": negotiated,
        }
        try:
            write_private_file(self.path, json.dumps(data, indent=1, sort_keys=True).encode() + b"\n")
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc.strerror)
