"""Stop requests: storing them, Sequence allocation, claiming work, and the retry policy.

Every function takes a Session and never commits: the caller owns the
transaction. The order is always: store (commit), then call ZEGOCLOUD outside
any transaction, then record the answer (commit).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    DateTime,
    String,
    Table,
    bindparam,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from manager.callbacks.accepted_stops import apply_accepted_stops
from manager.callbacks.rules import ENDED
from manager.errors import Conflict, Invalid
from manager.models import Delivery, StopAttempt, StopBatch, StopRequest, Task
from manager.sqlutil import insert_for, insert_ignore
from manager.zego.client import BAD_INPUT, ZegoReply

RESTOP_AFTER = timedelta(seconds=120)
MAX_RESTOPS = 3
RESTOP_BY = "worker"
MAX_BULK_TASKS = 10_000
# What each of models.WAIT_REASONS means, as the CLI and the dashboard say it.
WAIT_REASON_TEXT = {
    "rate_limit": "no share of the ZEGOCLOUD rate limit came in time",
    "zego_unreachable": "ZEGOCLOUD did not answer the last attempt",
}
# The predicate of the partial unique index, as a literal: PostgreSQL infers the
# ON CONFLICT target from it, which a bound parameter would defeat.
QUEUED_ONLY = literal_column("state = 'queued'", Boolean)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_delay: float = 2.0
    max_delay: float = 300.0
    lease: timedelta = timedelta(seconds=120)

    def delay(self, attempts: int, rng: random.Random) -> float:
        """Exponential backoff with jitter: half fixed, half random, capped."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** max(0, attempts - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


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
        select(StopRequest).where(StopRequest.task_pk == task.id, StopRequest.state == "queued")
    ).scalar_one_or_none()
    if queued is not None:
        return queued, False
    if task.status == "stopping" and not force:
        latest = latest_stop_request(session, task.id)
        if latest is not None and latest.state == "succeeded":
            return latest, False
    if task.status in ENDED and not force:
        raise Conflict("already_stopped", f"task {task.task_id!r} is already {task.status}")
    if task.owner is None:
        raise Conflict("owner_unknown", "no start callback has named this task's owner yet")
    stop = StopRequest(
        task_pk=task.id,
        state="queued",
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


def queued_by_wait_reason(session: Session) -> dict[str | None, int]:
    """How many stop requests are queued, by wait_reason (None: no reason to give)."""
    rows = session.execute(
        select(StopRequest.wait_reason, func.count())
        .where(StopRequest.state == "queued")
        .group_by(StopRequest.wait_reason)
    )
    return {reason: count for reason, count in rows}


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


def claim_due(
    session: Session, *, claimant: str, limit: int, policy: RetryPolicy, now: datetime
) -> list[Job]:
    """Claim queued requests whose time has come and whose lease is free.

    FOR UPDATE SKIP LOCKED lets several workers claim side by side on PostgreSQL;
    the lease keeps a request theirs after the commit, and expires if they crash.
    Each claimed request gets its attempt's Sequence in the same transaction.
    Requests whose task has ended meanwhile are settled first, not sent.
    """
    settle_ended(session, now)
    rows = session.execute(
        select(StopRequest.id, StopRequest.task_pk, StopRequest.user_id, StopRequest.attempts)
        .where(
            StopRequest.state == "queued",
            StopRequest.next_attempt_at <= now,
            or_(StopRequest.claimed_until.is_(None), StopRequest.claimed_until < now),
        )
        .order_by(StopRequest.next_attempt_at, StopRequest.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not rows:
        return []
    # One queued request per task (a unique index), so each task is bumped once.
    allocated = {
        task_pk: (task_id, sequence)
        for task_pk, task_id, sequence in session.execute(
            update(Task)
            .where(Task.id.in_([r.task_pk for r in rows]))
            .values(max_seq=Task.max_seq + 1)
            .returning(Task.id, Task.task_id, Task.max_seq)
        )
    }
    jobs = [
        Job(r.id, allocated[r.task_pk][0], r.user_id, allocated[r.task_pk][1], r.attempts)
        for r in rows
    ]
    session.execute(
        update(StopRequest),
        [
            {
                "id": j.stop_request_id,
                "sequence": j.sequence,
                "claimed_until": now + policy.lease,
                "claimed_by": claimant,
            }
            for j in jobs
        ],
    )
    return jobs


def settle_ended(session: Session, now: datetime) -> int:
    """Queued stops whose task has ended since they were asked for: nothing is left to
    stop, so they succeed without another call; how many.

    A retry whose earlier attempt timed out but reached ZEGOCLOUD would otherwise stop
    a task that no longer exists and be recorded as failed (zego-reference.md, open
    question 18). A forced stop of a task that had already ended when it was asked for
    is still sent, as asked. The request keeps its last ZEGOCLOUD answer, if any.
    """
    ended_since_asked = select(Task.id).where(
        Task.id == StopRequest.task_pk,
        Task.status.in_(ENDED),
        Task.updated_at >= StopRequest.created_at,
    )
    # Locked as claim_due locks (SKIP LOCKED): workers settling side by side neither
    # wait on each other's rows nor take them in different orders.
    ids = list(
        session.execute(
            select(StopRequest.id)
            .where(
                StopRequest.state == "queued",
                or_(StopRequest.claimed_until.is_(None), StopRequest.claimed_until < now),
                ended_since_asked.exists(),
            )
            .with_for_update(skip_locked=True, of=StopRequest)
        ).scalars()
    )
    if ids:
        session.execute(
            update(StopRequest)
            .where(StopRequest.id.in_(ids))
            .values(state="succeeded", completed_at=now, claimed_until=None, claimed_by=None)
            .execution_options(synchronize_session=False)
        )
    return len(ids)


def release(
    session: Session, stop_request_ids: Sequence[int], claimant: str, reason: str | None = None
) -> None:
    """Give claimed requests back to the queue, saying why they wait (`reason`, one of
    WAIT_REASONS) when it is worth an operator's attention.

    Only while the claim is still the caller's: after its lease expired another
    process may hold the request, and clearing that claim would let a third send it.
    """
    if not stop_request_ids:
        return
    session.execute(
        update(StopRequest)
        .where(
            StopRequest.id.in_(stop_request_ids),
            StopRequest.state == "queued",
            StopRequest.claimed_by == claimant,
        )
        .values(claimed_until=None, claimed_by=None, wait_reason=reason)
        .execution_options(synchronize_session=False)
    )


def record_attempts(
    session: Session,
    results: Sequence[tuple[Job, ZegoReply]],
    *,
    worker: str,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random,
) -> list[str]:
    """Store attempts and move their requests (and on success their tasks) on.

    Returns each request's new state. Every attempt is stored, but a request moves on
    only while it is still in the attempt's hands (queued, with the attempt's
    Sequence): an answer that comes after its lease expired and another process sent
    the stop again must not undo that process's outcome. A few executemany
    statements, whatever the number of results: the worker records in batches.
    """
    if not results:
        return []
    overtaken = _overtaken(session, [job for job, reply in results if reply.code == BAD_INPUT])
    attempts, requests, stopping, states = [], [], [], []
    for job, reply in results:
        if job.stop_request_id in overtaken:
            # ZEGOCLOUD refuses a Sequence not above one it has seen (110200002). This
            # one was taken before the attempt waited for its rate slot, and a callback
            # has since brought the same or a higher Sequence: the next attempt takes a
            # new one, above it.
            reply = replace(reply, outcome="retryable")
        attempts.append(
            {
                "stop_request_id": job.stop_request_id,
                "attempted_at": now,
                "sequence": job.sequence,
                "outcome": reply.outcome,
                "http_status": reply.http_status,
                "code": reply.code,
                "message": reply.message,
                "request_id": reply.request_id,
                "elapsed_ms": reply.elapsed_ms,
                "worker": worker,
            }
        )
        count = job.attempts_before + 1
        next_attempt_at = None
        if reply.outcome == "success":
            state = "succeeded"
            stopping.append((job.stop_request_id, job.sequence))
        elif reply.outcome == "permanent" or count >= policy.max_attempts:
            state = "failed"
        else:
            state = "queued"
            next_attempt_at = now + timedelta(seconds=policy.delay(count, rng))
        states.append(state)
        # No answer at all (refused connection, timeout): the operator may have to act.
        unreachable = state == "queued" and reply.http_status is None and reply.code is None
        requests.append(
            {
                "b_id": job.stop_request_id,
                "b_sent_seq": job.sequence,
                "b_state": state,
                "b_attempts": count,
                "b_code": reply.code,
                "b_message": reply.message,
                "b_request_id": reply.request_id,
                "b_completed_at": None if state == "queued" else now,
                "b_next_attempt_at": next_attempt_at,
                "b_wait_reason": "zego_unreachable" if unreachable else None,
            }
        )
    session.execute(_INSERT_ATTEMPT, attempts)
    session.execute(_UPDATE_REQUEST, requests)
    if stopping:
        _apply_accepted(session, stopping, now)
    return states


def _apply_accepted(session: Session, accepted: Sequence[tuple[int, int]], now: datetime) -> None:
    """Each accepted stop (request id, Sequence) is an event of its task: the rules move
    the task on (to stopping, unless a newer callback says otherwise)."""
    task_of: dict[int, int] = {
        stop_id: task_pk
        for stop_id, task_pk in session.execute(
            select(StopRequest.id, StopRequest.task_pk).where(
                StopRequest.id.in_([stop_id for stop_id, _ in accepted])
            )
        )
    }
    stops = [(task_of[stop_id], sequence) for stop_id, sequence in accepted]
    apply_accepted_stops(session.connection(), stops, now)


def _overtaken(session: Session, jobs: Sequence[Job]) -> set[int]:
    """The jobs' requests whose task has recorded a delivery with a Sequence at or above
    the attempt's: one that came after the Sequence was taken, which was above all."""
    overtaken = set()
    for job in jobs:
        newer = session.execute(
            select(Delivery.id)
            .join(StopRequest, StopRequest.task_pk == Delivery.task_pk)
            .where(StopRequest.id == job.stop_request_id, Delivery.sequence >= job.sequence)
            .limit(1)
        ).first()
        if newer is not None:
            overtaken.add(job.stop_request_id)
    return overtaken


_requests_table = cast(Table, StopRequest.__table__)
_tasks_table = cast(Table, Task.__table__)
_requests = _requests_table.c
_tasks = _tasks_table.c
_INSERT_ATTEMPT = cast(Table, StopAttempt.__table__).insert()
_UPDATE_REQUEST = (
    _requests_table.update()
    .where(
        _requests.id == bindparam("b_id"),
        _requests.state == "queued",
        _requests.sequence == bindparam("b_sent_seq"),
    )
    .values(
        state=bindparam("b_state"),
        attempts=bindparam("b_attempts"),
        last_code=bindparam("b_code"),
        last_message=bindparam("b_message"),
        last_request_id=bindparam("b_request_id"),
        completed_at=bindparam("b_completed_at"),
        next_attempt_at=func.coalesce(bindparam("b_next_attempt_at"), _requests.next_attempt_at),
        claimed_until=None,
        claimed_by=None,
        wait_reason=bindparam("b_wait_reason"),
    )
)


def stuck_stopping(session: Session, now: datetime, limit: int = 100) -> list[Task]:
    """Tasks still `stopping` long after ZEGO accepted the stop, with nothing queued.

    A task's updated_at is when it became stopping (the stuck report shows it), so the
    wait for the next re-stop runs from the last stop request's end instead, and only
    the re-stops since it became stopping count towards MAX_RESTOPS.
    """
    queued_or_recent = select(StopRequest.id).where(
        StopRequest.task_pk == Task.id,
        or_(
            StopRequest.state == "queued",
            func.coalesce(StopRequest.completed_at, StopRequest.created_at) >= now - RESTOP_AFTER,
        ),
    )
    restops = (
        select(func.count(StopRequest.id))
        .where(
            StopRequest.task_pk == Task.id,
            StopRequest.requested_by == RESTOP_BY,
            StopRequest.created_at >= Task.updated_at,
        )
        .scalar_subquery()
    )
    return list(
        session.execute(
            select(Task)
            .where(
                Task.status == "stopping",
                Task.updated_at < now - RESTOP_AFTER,
                ~queued_or_recent.exists(),
                restops < MAX_RESTOPS,
            )
            .limit(limit)
        ).scalars()
    )


def queue_restop(session: Session, task: Task, now: datetime) -> bool:
    """Queue one more stop for a stuck task, for the workers to send; True if queued."""
    stop = StopRequest(
        task_pk=task.id,
        state="queued",
        user_id=task.owner or "",
        requested_by=RESTOP_BY,
        reason=f"no stop callback within {int(RESTOP_AFTER.total_seconds())} s",
        force=True,
        created_at=now,
        attempts=0,
        next_attempt_at=now,
    )
    values = {c: getattr(stop, c) for c in StopRequest.__table__.columns.keys() if c != "id"}
    queued_only = QUEUED_ONLY
    # The task's updated_at stays when it became stopping: stuck_stopping waits from
    # this request's end before it looks again.
    return insert_ignore(session, StopRequest, values, ["task_pk"], index_where=queued_only)


@dataclass(frozen=True)
class BulkSelection:
    task_ids: tuple[str, ...] | None = None
    owner: str | None = None
    all_running: bool = False

    @classmethod
    def from_json(cls, body: Any) -> BulkSelection:
        if not isinstance(body, dict):
            raise Invalid("invalid_body", "the body must be a JSON object")
        given = [
            k for k in ("task_ids", "owner", "all_running") if body.get(k) not in (None, False)
        ]
        if len(given) != 1:
            raise Invalid("invalid_body", "give exactly one of task_ids, owner, all_running")
        if given == ["task_ids"]:
            ids = body["task_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
                raise Invalid("invalid_body", "task_ids must be a non-empty list of strings")
            if len(ids) > MAX_BULK_TASKS:
                raise Invalid("invalid_body", f"task_ids holds at most {MAX_BULK_TASKS}")
            return cls(task_ids=tuple(dict.fromkeys(ids)))
        if given == ["owner"]:
            if not isinstance(body["owner"], str):
                raise Invalid("invalid_body", "owner must be a string")
            return cls(owner=body["owner"])
        if body["all_running"] is not True:
            raise Invalid("invalid_body", "all_running must be true")
        return cls(all_running=True)

    def as_json(self) -> dict[str, Any]:
        if self.task_ids is not None:
            return {"task_ids": list(self.task_ids)}
        if self.owner is not None:
            return {"owner": self.owner}
        return {"all_running": True}


def _queue_stops(
    session: Session,
    batch_id: int,
    task_pks: list[int],
    requested_by: str,
    reason: str | None,
    now: datetime,
) -> set[int]:
    """One queued stop request per task, in one INSERT … SELECT whatever their number,
    skipping tasks that have one queued already; the tasks that got one."""
    if not task_pks:
        return set()
    columns = ["task_pk", "batch_id", "state", "user_id", "requested_by", "reason"]
    columns += ["force", "created_at", "attempts", "next_attempt_at"]
    source = select(
        Task.id,
        literal(batch_id),
        literal("queued"),
        Task.owner,
        literal(requested_by),
        literal(reason, String),
        literal(False),
        literal(now, DateTime),
        literal(0),
        literal(now, DateTime),
    ).where(Task.id.in_(task_pks))
    insert = insert_for(session.get_bind().dialect.name)
    statement = (
        insert(_requests_table)
        .from_select(columns, source)
        .on_conflict_do_nothing(index_elements=["task_pk"], index_where=QUEUED_ONLY)
        .returning(_requests.task_pk)
    )
    return set(session.execute(statement).scalars())


def create_batch(
    session: Session,
    selection: BulkSelection,
    *,
    requested_by: str,
    reason: str | None,
    app_id: int | None,
    now: datetime,
) -> tuple[StopBatch, dict[str, str]]:
    """Queue a stop for every selected running task; returns the batch and skipped tasks."""
    query = select(Task.id, Task.task_id, Task.status, Task.owner)
    if app_id is not None:
        query = query.where(Task.app_id == app_id)
    if selection.task_ids is not None:
        query = query.where(Task.task_id.in_(selection.task_ids))
    elif selection.owner is not None:
        query = query.where(Task.owner == selection.owner, Task.status == "running")
    else:
        query = query.where(Task.status == "running")
    rows = session.execute(query.order_by(Task.id)).all()

    skipped: dict[str, str] = {}
    if selection.task_ids is not None:
        known = {r.task_id for r in rows}
        skipped.update({t: "unknown_task" for t in selection.task_ids if t not in known})
    eligible: dict[int, str] = {}
    for row in rows:
        if row.status != "running":
            skipped[row.task_id] = f"task is {row.status}"
        elif row.owner is None:
            skipped[row.task_id] = "owner_unknown"
        else:
            eligible[row.id] = row.task_id
    batch = StopBatch(
        created_at=now,
        requested_by=requested_by,
        reason=reason,
        selector=selection.as_json(),
        total=0,
    )
    session.add(batch)
    session.flush()
    queued = _queue_stops(session, batch.id, list(eligible), requested_by, reason, now)
    skipped.update(
        {
            task_id: "a stop is already queued"
            for pk, task_id in eligible.items()
            if pk not in queued
        }
    )
    batch.total = len(queued)
    session.flush()
    return batch, skipped
