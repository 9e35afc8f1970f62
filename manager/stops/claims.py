"""Claiming due stop requests under a lease, settling those whose task ended, giving back."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import (
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from manager.callbacks.rules import ENDED
from manager.models import StopRequest, Task
from manager.stops.policy import RetryPolicy
from manager.stops.requests import Job
from manager.vocabulary import StopState


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
            StopRequest.state == StopState.QUEUED,
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
                StopRequest.state == StopState.QUEUED,
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
            .values(
                state=StopState.SUCCEEDED, completed_at=now, claimed_until=None, claimed_by=None
            )
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
            StopRequest.state == StopState.QUEUED,
            StopRequest.claimed_by == claimant,
        )
        .values(claimed_until=None, claimed_by=None, wait_reason=reason)
        .execution_options(synchronize_session=False)
    )
