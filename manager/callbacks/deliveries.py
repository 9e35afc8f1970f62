"""A delivery's own record, on every path that takes a callback.

Its row in `deliveries` (`delivery_row`) and the claim of its (Timestamp, Nonce) in
the nonce ledger (`nonce_claim`); a nonce seen before is a retransmission of the same
body or refused (`check_retransmission`), and is recorded as a duplicate
(`record_duplicate`). A delivery that its task's rules took is settled: its verdict,
and the task's registers outside the fold (`settle`: the latest Sequence, the last
delivery, the newest input and outputs). `Outcome` is what the webhook answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.dialects import sqlite

from manager.callbacks.history import IS_EVENT, Change, TaskState, event_of
from manager.callbacks.rules import FAILED_ON_ITS_OWN
from manager.models import CallbackNonce, Delivery, Task
from manager.vocabulary import Verdict
from manager.zego.callbacks import Callback, CallbackError


class ReplayedCallback(CallbackError):
    """A (Timestamp, Nonce) pair seen before, with a different body: a replay, refused."""


# ZEGOCLOUD retries a callback 5 times within about 62 s (zego-reference.md §6.2); twice
# that, to be safe, tells a resend of a failure stop from another failure.
RESEND_SPAN = timedelta(seconds=120)


@dataclass(frozen=True)
class Outcome:
    verdict: str
    reason: str | None
    task_pk: int
    delivery_id: int
    refolded: bool | None = None  # None: a duplicate, which changes nothing


Details = tuple[Any, Any]  # a task's (input, outputs)


def delivery_row(
    cb: Callback,
    task_pk: int,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
    verdict: str,
    reason: str | None,
) -> dict[str, Any]:
    """The delivery's row, without an event key (a duplicate has none)."""
    return {
        **cb.audit_fields(),
        "received_at": received_at,
        "task_pk": task_pk,
        "remote_addr": remote_addr,
        "body_size": body_size,
        "raw_body": raw_body,
        "event_key": None,
        "verdict": verdict,
        "reason": reason,
    }


def nonce_claim(cb: Callback, received_at: datetime, digest: str) -> dict[str, Any]:
    """The parameters of a claim of the callback's (Timestamp, Nonce)."""
    return {
        "zego_timestamp": cb.timestamp,
        "nonce": cb.nonce,
        "body_sha256": digest,
        "seen_at": received_at,
    }


def settle(
    task: TaskState, cb: Callback, change: Change, received_at: datetime
) -> tuple[str, str | None, Details | None]:
    """The delivery's verdict, and the task's registers outside the fold, moved on."""
    task.max_seq = max(task.max_seq, cb.sequence)
    task.last_delivery_at = received_at
    if change.changed:
        task.updated_at = received_at
    details = None if cb.is_stop else newer_details(task, cb)
    if change.changed:
        return Verdict.APPLIED, None, details
    return Verdict.STALE, "older_than_state", details


def newer_details(task: TaskState, cb: Callback) -> Details | None:
    """The callback's input and outputs, if they are the task's now: they come from the
    newest start/update that carries them, whatever its verdict (a max-register keyed
    by (Sequence, rank), so arrival order cannot matter). They are not in the fold:
    deliveries keep them only in the raw body. Only a change is written, so the hot
    path never reads them back."""
    if cb.input is None and cb.outputs is None:
        return None
    position = event_of(cb).position
    if (
        task.details_seq is None
        or task.details_rank is None
        or position
        > (
            task.details_seq,
            task.details_rank,
        )
    ):
        task.details_seq, task.details_rank = position
        return (cb.input, cb.outputs)
    return None


def record_duplicate(
    conn: Connection, task: TaskState, delivery: dict[str, Any]
) -> Callable[[], Outcome]:
    conn.execute(_TOUCH_TASK, {"task_pk": task.id, "last_delivery_at": delivery["received_at"]})
    delivery_id = conn.execute(_INSERT_DELIVERY, delivery).scalar_one()
    result = Outcome(Verdict.DUPLICATE, delivery["reason"], task.id, delivery_id)
    return lambda: result


def another_failure(conn: Connection, task_pk: int, cb: Callback) -> bool:
    """Whether this StopReason 1 stop is another failure of a key already recorded.

    ZEGOCLOUD's own stops often carry Sequence 0, so a task that fails in two runs sends
    the same key twice. A resend comes within ZEGOCLOUD's retry span (about 62 s), so
    a failure further than RESEND_SPAN from every recorded one of its key is new: it
    is recorded under its key at its Timestamp, whichever of the two came first.
    """
    recorded = (
        conn.execute(
            _FAILURE_TIMES,
            {"task_pk": task_pk, "sequence": cb.sequence, "event": cb.event, "status": cb.status},
        )
        .scalars()
        .all()
    )
    span = RESEND_SPAN.total_seconds()
    return bool(recorded) and all(abs(ts - cb.timestamp) > span for ts in recorded)


def check_retransmission(conn: Connection, cb: Callback, digest: str) -> None:
    """The (Timestamp, Nonce) was seen: the same body again is a retransmission, else refused.

    ZEGO's signature does not cover the body, so a captured signature could be
    replayed with a forged body; the same pair with different content is refused.
    """
    seen = conn.execute(
        _SEEN_DIGEST, {"zego_timestamp": cb.timestamp, "nonce": cb.nonce}
    ).scalar_one()
    if seen != digest:
        raise ReplayedCallback(
            "nonce_reused",
            "this Timestamp and Nonce were already used with a different body",
            cb.audit_fields(),
        )


# --- statements, built once ---------------------------------------------------------

_TASKS = cast(Table, Task.__table__)
_DELIVERIES = cast(Table, Delivery.__table__)
_NONCES = cast(Table, CallbackNonce.__table__)
DELIVERY_COLUMNS = tuple(c.name for c in _DELIVERIES.columns if c.name != "id")

# SQLite (and any other backend but PostgreSQL, whose statements do both in one).
CLAIM_NONCE = (
    sqlite.insert(_NONCES)
    .values({c: bindparam(c) for c in ("zego_timestamp", "nonce", "body_sha256", "seen_at")})
    .on_conflict_do_nothing()
    .returning(_NONCES.c.nonce)
)
INSERT_DELIVERY_IGNORE = (
    sqlite.insert(_DELIVERIES)
    .values({c: bindparam(c) for c in DELIVERY_COLUMNS})
    .on_conflict_do_nothing(index_elements=[_DELIVERIES.c.event_key])
    .returning(_DELIVERIES.c.id)
)

# Every backend.
_FAILURE_TIMES = select(_DELIVERIES.c.zego_timestamp).where(
    _DELIVERIES.c.task_pk == bindparam("task_pk"),
    _DELIVERIES.c.event == bindparam("event"),
    _DELIVERIES.c.sequence == bindparam("sequence"),
    _DELIVERIES.c.status.is_not_distinct_from(bindparam("status")),  # Status is optional
    _DELIVERIES.c.stop_reason == FAILED_ON_ITS_OWN,
    IS_EVENT,
)
_SEEN_DIGEST = select(_NONCES.c.body_sha256).where(
    _NONCES.c.zego_timestamp == bindparam("zego_timestamp"),
    _NONCES.c.nonce == bindparam("nonce"),
)
_TOUCH_TASK = (
    update(_TASKS)
    .where(_TASKS.c.id == bindparam("task_pk"))
    .values(last_delivery_at=bindparam("last_delivery_at"))
)
_INSERT_DELIVERY = (
    insert(_DELIVERIES)
    .values({c: bindparam(c) for c in DELIVERY_COLUMNS})
    .returning(_DELIVERIES.c.id)
)
