"""Recording attempts: ZEGOCLOUD's answers, in batches, and the tasks they move on."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Table,
    bindparam,
    func,
    select,
)
from sqlalchemy.orm import Session

from manager.callbacks.accepted_stops import apply_accepted_stops
from manager.models import Delivery, StopAttempt, StopRequest, Task
from manager.stops.policy import RetryPolicy
from manager.stops.requests import Job
from manager.vocabulary import StopState, WaitReason
from manager.zego.client import BAD_INPUT, Outcome, ZegoReply


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
            # one was taken before the attempt waited for a unit of the rate limit, and a
            # callback has since brought the same or a higher Sequence: the next attempt
            # takes a new one, above it.
            reply = replace(reply, outcome=Outcome.RETRYABLE)
        count = job.attempts_before + 1
        state = policy.next_state(reply.outcome, count)
        retry_at = (
            now + timedelta(seconds=policy.delay(count, rng)) if state == StopState.QUEUED else None
        )
        attempts.append(_attempt_row(job, reply, worker, now))
        requests.append(_request_row(job, reply, state, count, now, retry_at))
        if state == StopState.SUCCEEDED:
            stopping.append((job.stop_request_id, job.sequence))
        states.append(state)
    session.execute(_INSERT_ATTEMPT, attempts)
    session.execute(_UPDATE_REQUEST, requests)
    if stopping:
        _apply_accepted(session, stopping, now)
    return states


def _attempt_row(job: Job, reply: ZegoReply, worker: str, now: datetime) -> dict[str, Any]:
    return {
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


def _request_row(
    job: Job,
    reply: ZegoReply,
    state: str,
    attempts: int,
    now: datetime,
    retry_at: datetime | None,
) -> dict[str, Any]:
    """The request after the answer, for _UPDATE_REQUEST."""
    # No answer at all (refused connection, timeout): the operator may have to act.
    unreachable = state == StopState.QUEUED and reply.http_status is None and reply.code is None
    return {
        "b_id": job.stop_request_id,
        "b_sent_seq": job.sequence,
        "b_state": state,
        "b_attempts": attempts,
        "b_code": reply.code,
        "b_message": reply.message,
        "b_request_id": reply.request_id,
        "b_completed_at": None if state == StopState.QUEUED else now,
        "b_next_attempt_at": retry_at,
        "b_wait_reason": WaitReason.ZEGO_UNREACHABLE if unreachable else None,
    }


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
        _requests.state == StopState.QUEUED,
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
