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

from sqlalchemy import select, update
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
    delivery_id = session.execute(select(Delivery.id).where(Delivery.event_key == key)).scalar_one()
    if verdict != "applied":
        session.execute(
            update(Delivery)
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
    position = (cb.sequence, event_rank(cb))
    at = utc_from_timestamp(cb.timestamp)

    task.max_seq = max(task.max_seq, cb.sequence)
    task.last_delivery_at = now
    if cb.is_stop:
        applied = _apply_stop(task, cb, position, at)
    else:
        _remember_details(task, cb, position)
        applied = _apply_start(task, cb, position, at)
    if applied:
        task.updated_at = now
        return "applied", None
    return "stale", "older_than_state"


def _is_fresh(task: Task) -> bool:
    return task.state_seq == NO_POSITION and task.state_rank == 0


def _apply_stop(task: Task, cb: Callback, position: tuple[int, int], at: datetime) -> bool:
    current = (task.state_seq, task.state_rank)
    fresh = _is_fresh(task)
    active = task.status in ACTIVE
    # ZEGO documents neither the Sequence of its own stops nor that it echoes ours,
    # so a stop may also end the run by Sequence or, for StopReason 1, by Timestamp.
    by_sequence = active and task.run_start_seq is not None and cb.sequence >= task.run_start_seq
    by_time = (
        active and cb.stop_reason == 1 and task.started_at is not None and at >= task.started_at
    )
    if not (fresh or position > current or by_sequence or by_time):
        return False
    if fresh:
        task.runs = 1  # the stop proves that a run existed, even if its start never came
    task.status = "failed" if cb.stop_reason == 1 else "stopped"
    task.stop_reason = cb.stop_reason
    task.ended_at = at
    # Starts above end_seq come after this stop. A stop placed by its Timestamp alone
    # covers everything the run had seen.
    placed_by_time = by_time and not by_sequence and not position > current
    task.end_seq = max(cb.sequence, current[0]) if placed_by_time else cb.sequence
    task.state_seq, task.state_rank = max(position, (current[0], RANK_STOPPED))
    return True


def _apply_start(task: Task, cb: Callback, position: tuple[int, int], at: datetime) -> bool:
    current = (task.state_seq, task.state_rank)
    fresh = _is_fresh(task)
    ended = task.status in ENDED
    # A TranscodeStarted above the Sequence of the stop that ended the run is a new
    # run, even when that stop was placed above it by the Sequence-or-Timestamp rule.
    restart = (
        ended
        and cb.status == STATUS_STARTED
        and task.end_seq is not None
        and cb.sequence > task.end_seq
    )
    # An automatic stop (StopReason 1) ends every start that is not later than it.
    failed_after = task.status == "failed" and task.ended_at is not None and at <= task.ended_at

    if not fresh and (position > current or restart) and failed_after:
        # Arrival in order would have applied this start and then the failure on top.
        task.end_seq = max(task.end_seq or NO_POSITION, cb.sequence)
        task.state_seq, task.state_rank = max(current, (cb.sequence, RANK_STOPPED))
    elif fresh or position > current or restart:
        if fresh or ended or cb.status == STATUS_STARTED:
            task.runs += 1
            if fresh:
                task.run_floor_seq = NO_POSITION
            elif ended and task.end_seq is not None:
                task.run_floor_seq = task.end_seq
            else:
                task.run_floor_seq = max(task.run_floor_seq, cb.sequence - 1)
            task.run_start_seq, task.run_start_rank = position
            task.started_at = at
            task.ended_at = None
            task.stop_reason = None
            task.end_seq = None
        task.status = "running"
        task.state_seq, task.state_rank = max(position, (current[0], RANK_UPDATED))
        return True

    _place_in_run(task, cb, position, at)
    return False


def _place_in_run(task: Task, cb: Callback, position: tuple[int, int], at: datetime) -> None:
    """A late start still tells when the current run began; the status stays as it is.

    The run begins at its latest TranscodeStarted (an earlier one belongs to an
    earlier run), or, where none has come, at its earliest update.
    """
    if cb.sequence <= task.run_floor_seq:
        return  # an earlier run
    if task.status in ENDED and task.end_seq is not None and cb.sequence > task.end_seq:
        return  # after the end of this run, yet not a start of a new one
    start = (
        None
        if task.run_start_seq is None or task.run_start_rank is None
        else (task.run_start_seq, task.run_start_rank)
    )
    begun_by_start = start is not None and start[1] == RANK_STARTED
    if cb.status == STATUS_STARTED and (start is None or position > start):
        if begun_by_start:
            task.runs += 1  # a restart we had not heard of
    elif start is not None and (begun_by_start or position >= start):
        return
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
