"""What a session negotiated at login, read from LIO's debug messages in the kernel log.

LIO does not show negotiated values in configfs. At the end of every successful login,
``iscsi_post_login_handler`` prints them with pr_debug: first the connection's (digests,
data segment lengths) in ``iscsi_set_connection_parameters``, then, for a new session,
the session's (names, bursts, R2T, error recovery) in ``iscsi_set_session_parameters``,
each block between dashed lines. They reach the log only when dynamic debug enables
those two functions; the flags ``ft`` prefix each message with the printing task's id
and the function's name, so that blocks of logins handled at the same time by different
tasks can be told apart, and the messages from any other text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CONNECTION = "iscsi_set_connection_parameters"
SESSION = "iscsi_set_session_parameters"
# The dynamic debug query that makes LIO print them (idempotent; flags as explained above).
DEBUG_QUERIES = tuple(f"file iscsi_target_parameters.c func {function} +pft" for function in (CONNECTION, SESSION))
LINE = re.compile(rf"(?:\[(\d+)\] )?({CONNECTION}|{SESSION}): (.*)")
# What names a session rather than describing what it negotiated.
IDENTITY = frozenset(
    ("InitiatorName", "InitiatorAlias", "TargetName", "TargetAlias", "TargetPortalGroupTag", "SessionType")
)


def is_negotiation_line(message: str) -> bool:
    return LINE.match(message) is not None


def parse(lines: Iterable[str]) -> dict[tuple[str, str], dict[str, str]]:
    """Negotiated values per (target IQN, initiator IQN) of the normal sessions logged in ``lines``.

    A later login of the same pair wins. Discovery sessions, and logins whose blocks are
    incomplete (the log wrapped, or the daemon started in between), are left out.
    """
    found: dict[tuple[str, str], dict[str, str]] = {}
    open_blocks: dict[tuple[str, str], dict[str, str]] = {}
    connections: dict[str, dict[str, str]] = {}  # per task, the connection block it printed last
    for line in lines:
        match = LINE.fullmatch(line)
        if match is None:
            continue
        task, function, text = match.group(1) or "", match.group(2), match.group(3).strip()
        key, colon, value = text.partition(":")
        if colon:
            if (task, function) in open_blocks:
                open_blocks[task, function][key.strip()] = value.strip()
            continue
        if not text or set(text) != {"-"}:
            continue  # a remark such as "Set MRDSL from InitiatorRecvDataSegmentLength"
        block = open_blocks.pop((task, function), None)
        if not block:
            open_blocks[task, function] = {}  # a block begins (or an empty one began again)
        elif function == CONNECTION:
            connections[task] = block
        else:
            values = connections.pop(task, {}) | block
            target, initiator = values.get("TargetName"), values.get("InitiatorName")
            if values.get("SessionType") == "Normal" and target and initiator:
                found[target, initiator] = {k: v for k, v in values.items() if k not in IDENTITY}
    return found
