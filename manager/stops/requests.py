"""Stop requests: storing them, one at a time, and giving each attempt its Sequence.

Every function in stops/ takes a Session and never commits: the caller owns the
transaction. The order is always: store (commit), then call ZEGOCLOUD outside
any transaction, then record the answer (commit)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    Boolean,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.orm import Session

from manager.callbacks.rules import ENDED
from manager.errors import Conflict
from manager.models import StopRequest, Task
from manager.stops.policy import RetryPolicy
from manager.vocabulary import StopState, TaskStatus, WaitReason

# The predicate of the partial unique index (one queued request per task), as a
# literal: PostgreSQL infers the ON CONFLICT target from it, which a bound parameter
# would defeat.
QUEUED_ONLY = literal_column("state = 'queued'", Boolean)
# What each of models.WAIT_REASONS means, as the CLI and the dashboard say it.
WAIT_REASON_TEXT: dict[str, str] = {
    WaitReason.RATE_LIMIT: "no share of the ZEGOCLOUD rate limit came in time",
    WaitReason.ZEGO_UNREACHABLE: "ZEGOCLOUD did not answer the last attempt",
}


@dataclass(frozen=True)
class Job:
    """What one attempt needs, read before the call so no session is held during it."""

    stop_request_id: int
    task_id: str
    user_id: str
    sequence: int
    attempts_before: int


def lock_task(session: Session, task_pk: int) -> Task:
    return session.execute(
        select(Task)
        .where(Task.id == task_pk)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one()


def request_stop(
    session: Session,
    task: Task,
    *,
    requested_by: str,
    reason: str | None,
    force: bool,
    claimant: str,
    policy: RetryPolicy,
    now: datetime,
) -> tuple[StopRequest, bool]:
    """The task's stop in flight, or a new one claimed by `claimant`; True when new.

    The task row is locked first, so two operators stopping at once are serialised
    by the database: the second finds the first's request and gets it back.
    """
    task = lock_task(session, task.id)
    queued = session.execute(
        select(StopRequest).where(
            StopRequest.task_pk == task.id, StopRequest.state == StopState.QUEUED
        )
    ).scalar_one_or_none()
    if queued is not None:
        return queued, False
    if task.status == TaskStatus.STOPPING and not force:
        latest = latest_stop_request(session, task.id)
        if latest is not None and latest.state == StopState.SUCCEEDED:
            return latest, False
    if task.status in ENDED and not force:
        raise Conflict("already_stopped", f"task {task.task_id!r} is already {task.status}")
    if task.owner is None:
        raise Conflict("owner_unknown", "no start callback has named this task's owner yet")
    stop = StopRequest(
        task_pk=task.id,
        state=StopState.QUEUED,
        user_id=task.owner,
        requested_by=requested_by,
        reason=reason,
        force=force,
        created_at=now,
        attempts=0,
        next_attempt_at=now,
        claimed_until=now + policy.lease,
        claimed_by=claimant,
    )
    session.add(stop)
    session.flush()
    return stop, True


@dataclass(frozen=True)
class QueueState:
    """The stop queue at a glance: what waits, by wait_reason (None: its turn or its
    retry), how many of those a process holds to send now, and the oldest's age."""

    waiting: dict[str | None, int]
    in_flight: int
    oldest_age: float


def queue_state(session: Session, now: datetime) -> QueueState:
    """Read in one query: the figures /metrics shows, the same from every process."""
    in_flight = func.count().filter(StopRequest.claimed_until > now)
    rows = session.execute(
        select(StopRequest.wait_reason, func.count(), in_flight, func.min(StopRequest.created_at))
        .where(StopRequest.state == StopState.QUEUED)
        .group_by(StopRequest.wait_reason)
    ).all()
    oldest = min((row[3] for row in rows), default=None)
    return QueueState(
        waiting={reason: count for reason, count, _, _ in rows},
        in_flight=sum(row[2] for row in rows),
        oldest_age=0.0 if oldest is None else max(0.0, (now - oldest).total_seconds()),
    )


def latest_stop_request(session: Session, task_pk: int) -> StopRequest | None:
    return session.execute(
        select(StopRequest)
        .where(StopRequest.task_pk == task_pk)
        .order_by(StopRequest.id.desc())
        .limit(1)
    ).scalar_one_or_none()


def allocate_sequence(session: Session, task_pk: int) -> int:
    """The next Sequence of the task, above every one seen or sent: one atomic UPDATE."""
    sequence: int = session.execute(
        update(Task)
        .where(Task.id == task_pk)
        .values(max_seq=Task.max_seq + 1)
        .returning(Task.max_seq)
    ).scalar_one()
    return sequence


def prepare_attempt(session: Session, stop: StopRequest) -> Job:
    """Give the attempt its own Sequence; the caller commits before sending."""
    sequence = allocate_sequence(session, stop.task_pk)
    stop.sequence = sequence
    task_id = session.execute(select(Task.task_id).where(Task.id == stop.task_pk)).scalar_one()
    return Job(stop.id, task_id, stop.user_id, sequence, stop.attempts)
