"""The task state rules of SPEC 3.2: apply one verified callback to its task.

Concurrency: the nonce ledger and the duplicate key are unique constraints
claimed with INSERT … ON CONFLICT DO NOTHING, and the task row is locked
(SELECT … FOR UPDATE on PostgreSQL; SQLite transactions start with BEGIN
IMMEDIATE) before the ordering rules read it. Locks are always taken in the
order nonce, task, event key, so concurrent deliveries cannot deadlock, and
the result is the same as some serial order.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import CallbackNonce, Delivery, Task
from .sqlutil import insert_ignore
from .zego.callbacks import STATUS_STARTED, Callback, CallbackError

# Ranks are doubled so that our own stop request fits between update and stop (2.5).
RANK_STARTED = 2
RANK_UPDATED = 4
RANK_STOP_REQUEST = 5
RANK_STOPPED = 6

ACTIVE = ("running", "stopping")
ENDED = ("stopped", "failed")
NO_POSITION = -1  # below any Sequence: a missing Sequence counts as 0


@dataclass(frozen=True)
class Outcome:
    verdict: str
    reason: str | None
    task_pk: int
    delivery_id: int


def utc_from_timestamp(ts: int) -> datetime:
    """ZEGOCLOUD's Unix seconds as the naive UTC datetime stored everywhere."""
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def event_rank(cb: Callback) -> int:
    if cb.is_stop:
        return RANK_STOPPED
    return RANK_STARTED if cb.status == STATUS_STARTED else RANK_UPDATED


def apply_callback(
    session: Session,
    cb: Callback,
    *,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
) -> Outcome:
    """Record one verified delivery and move its task if it is the newest. Never commits."""
    retransmission = _claim_nonce(session, cb, received_at)
    task = _lock_task(session, cb, received_at)

    delivery = Delivery(
        received_at=received_at,
        verdict="applied",
        task_pk=task.id,
        remote_addr=remote_addr,
        body_size=body_size,
        raw_body=raw_body,
        **cb.audit_fields(),
    )
    key = cb.event_key()
    claimed = not retransmission and insert_ignore(
        session, Delivery, {"event_key": key, **_delivery_values(delivery)}, ["event_key"]
    )
    if not claimed:
        delivery.verdict = "duplicate"
        delivery.reason = "same_nonce" if retransmission else "same_event"
        session.add(delivery)
        task.last_delivery_at = received_at
        session.flush()
        return Outcome(delivery.verdict, delivery.reason, task.id, delivery.id)

    verdict, reason = apply_to_task(task, cb, received_at)
    delivery_id = session.execute(
        select(Delivery.id).where(Delivery.event_key == key)
    ).scalar_one()
    if verdict != "applied":
        session.execute(
            Delivery.__table__.update()
            .where(Delivery.id == delivery_id)
            .values(verdict=verdict, reason=reason)
        )
    session.flush()
    return Outcome(verdict, reason, task.id, delivery_id)


def _delivery_values(delivery: Delivery) -> dict[str, object]:
    columns = Delivery.__table__.columns.keys()
    return {
        c: getattr(delivery, c)
        for c in columns
        if c not in ("id", "event_key") and getattr(delivery, c) is not None
    }


def _claim_nonce(session: Session, cb: Callback, received_at: datetime) -> bool:
    """Claim (Timestamp, Nonce); True when this exact body was seen with it already.

    ZEGO's signature does not cover the body, so a captured signature could be
    replayed with a forged body; the same pair with different content is refused.
    """
    digest = cb.body_digest()
    values = {
        "zego_timestamp": cb.timestamp,
        "nonce": cb.nonce,
        "body_sha256": digest,
        "seen_at": received_at,
    }
    if insert_ignore(session, CallbackNonce, values, ["zego_timestamp", "nonce"]):
        return False
    seen = session.execute(
        select(CallbackNonce.body_sha256).where(
            CallbackNonce.zego_timestamp == cb.timestamp, CallbackNonce.nonce == cb.nonce
        )
    ).scalar_one()
    if seen != digest:
        raise CallbackError(
            409,
            "nonce_reused",
            "this Timestamp and Nonce were already used with a different body",
            cb.audit_fields(),
        )
    return True


def _lock_task(session: Session, cb: Callback, now: datetime) -> Task:
    insert_ignore(
        session,
        Task,
        {
            "app_id": cb.app_id,
            "task_id": cb.task_id,
            "status": "running",  # placeholder: a new task always applies its first delivery
            "state_seq": NO_POSITION,
            "state_rank": 0,
            "max_seq": NO_POSITION,
            "runs": 0,
            "run_floor_seq": NO_POSITION,
            "first_seen_at": now,
            "updated_at": now,
        },
        ["app_id", "task_id"],
    )
    return session.execute(
        select(Task)
        .where(Task.app_id == cb.app_id, Task.task_id == cb.task_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()


def apply_to_task(task: Task, cb: Callback, now: datetime) -> tuple[str, str | None]:
    """Apply the ordering rules to a locked task; returns (verdict, reason)."""
    rank = event_rank(cb)
    position = (cb.sequence, rank)
    current = (task.state_seq, task.state_rank)
    at = utc_from_timestamp(cb.timestamp)
    fresh = task.state_seq == NO_POSITION and task.state_rank == 0

    task.max_seq = max(task.max_seq, cb.sequence)
    task.last_delivery_at = now
    if not cb.is_stop:
        _remember_details(task, cb, position)

    if cb.is_stop:
        verdict = _apply_stop(task, cb, position, current, at, fresh)
    else:
        verdict = _apply_start(task, cb, position, current, at, fresh)
    if verdict[0] == "applied":
        task.updated_at = now
    return verdict


def _apply_stop(
    task: Task,
    cb: Callback,
    position: tuple[int, int],
    current: tuple[int, int],
    at: datetime,
    fresh: bool,
) -> tuple[str, str | None]:
    newest = position > current
    # ZEGO documents neither the Sequence of its own stops nor that it echoes ours.
    ends_run = task.status in ACTIVE and (
        (task.run_start_seq is not None and cb.sequence >= task.run_start_seq)
        or (cb.stop_reason == 1 and task.started_at is not None and at >= task.started_at)
    )
    if not (fresh or newest or ends_run):
        return "stale", "older_than_state"
    if fresh:
        task.runs = 1  # the stop proves that a run existed, even if its start never came
    task.status = "failed" if cb.stop_reason == 1 else "stopped"
    task.stop_reason = cb.stop_reason
    task.ended_at = at
    task.state_seq, task.state_rank = max(position, (current[0], RANK_STOPPED))
    return "applied", None


def _apply_start(
    task: Task,
    cb: Callback,
    position: tuple[int, int],
    current: tuple[int, int],
    at: datetime,
    fresh: bool,
) -> tuple[str, str | None]:
    # An automatic stop (StopReason 1) ends every start that is not later than it.
    failed_after = (
        task.status == "failed" and task.ended_at is not None and at <= task.ended_at
    )
    if position > current and failed_after:
        # Arrival in order would have applied this start and then the failure on top.
        task.state_seq, task.state_rank = cb.sequence, RANK_STOPPED
    elif fresh or position > current:
        begins_run = fresh or task.status in ENDED or cb.status == STATUS_STARTED
        if begins_run:
            task.runs += 1
            task.run_floor_seq = NO_POSITION if fresh else current[0]
            task.run_start_seq, task.run_start_rank = position
            task.started_at = at
            task.ended_at = None
            task.stop_reason = None
        task.status = "running"
        task.state_seq, task.state_rank = position
        return "applied", None

    _backfill_run_start(task, cb, position, at)
    return "stale", "older_than_state"


def _backfill_run_start(task: Task, cb: Callback, position: tuple[int, int], at: datetime) -> None:
    """A late start of the current run still tells when that run began.

    The status stays as it is; only the run's start time moves to the earliest
    start or update of the run, which is what arrival in order would have given.
    """
    if cb.sequence <= task.run_floor_seq:
        return  # belongs to an earlier run
    earliest = (
        None
        if task.run_start_seq is None or task.run_start_rank is None
        else (task.run_start_seq, task.run_start_rank)
    )
    if earliest is None or position < earliest:
        task.run_start_seq, task.run_start_rank = position
        task.started_at = at


def _remember_details(task: Task, cb: Callback, position: tuple[int, int]) -> None:
    """Owner, input and outputs come from the newest start/update, whatever its verdict.

    Each is a max-register keyed by (Sequence, rank), so the result does not depend
    on arrival order; Details count only where a delivery carries them.
    """
    if _newer(position, task.owner_seq, task.owner_rank):
        task.owner_seq, task.owner_rank = position
        task.owner = cb.user_id
    if (cb.input is not None or cb.outputs is not None) and _newer(
        position, task.details_seq, task.details_rank
    ):
        task.details_seq, task.details_rank = position
        task.input = cb.input
        task.outputs = cb.outputs


def _newer(position: tuple[int, int], seq: int | None, rank: int | None) -> bool:
    return seq is None or rank is None or position > (seq, rank)
