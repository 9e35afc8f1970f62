"""One vocabulary: the values a task's status, a delivery's verdict, a stop request's
state, the reason it waits, an outbound event's type and its sending state can take.

The models' check constraints, the CLI's choices, the API's checks and the code all
use these; each is a StrEnum, so a value compares and serialises as its text. An
attempt's outcome is ZEGOCLOUD's answer classified (manager/zego/client.py: Outcome).
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Verdict(StrEnum):
    """What became of a callback delivery."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    REJECTED = "rejected"


class StopState(StrEnum):
    QUEUED = "queued"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class WaitReason(StrEnum):
    """Why a queued stop has not gone out, when an operator may need to act."""

    RATE_LIMIT = "rate_limit"  # no share of the ZEGOCLOUD rate limit came in time
    ZEGO_UNREACHABLE = "zego_unreachable"  # the last attempt got no answer


class EventType(StrEnum):
    """What an outbound event says happened to a task (manager/callbacks/outbound.py)."""

    TASK_STARTED = "task.started"
    TASK_UPDATED = "task.updated"
    TASK_STOPPING = "task.stopping"
    TASK_STOPPED = "task.stopped"
    TASK_FAILED = "task.failed"
    RUN_ENDED = "run.ended"
    TASK_REVISED = "task.revised"


class SendState(StrEnum):
    """Where one event stands with one subscription."""

    PENDING = "pending"  # to be sent, or sent again after a failed attempt
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up on: no 2xx within the retry window


def values(kind: type[StrEnum]) -> tuple[str, ...]:
    """The texts of an enum's members, in order (for check constraints and choices)."""
    return tuple(member.value for member in kind)
