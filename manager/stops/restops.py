"""Tasks left stopping: found, and stopped again (at most MAX_RESTOPS times per spell)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import (
    func,
    or_,
    select,
)
from sqlalchemy.orm import Session

from manager.models import StopRequest, Task
from manager.sqlutil import insert_ignore
from manager.stops.requests import QUEUED_ONLY
from manager.vocabulary import StopState, TaskStatus

RESTOP_AFTER = timedelta(seconds=120)
MAX_RESTOPS = 3
RESTOP_BY = "worker"


def stuck_stopping(session: Session, now: datetime, limit: int = 100) -> list[Task]:
    """Tasks still `stopping` long after ZEGO accepted the stop, with nothing queued.

    A task's updated_at is when it became stopping (the stuck report shows it), so the
    wait for the next re-stop runs from the last stop request's end instead, and only
    the re-stops since it became stopping count towards MAX_RESTOPS.
    """
    queued_or_recent = select(StopRequest.id).where(
        StopRequest.task_pk == Task.id,
        or_(
            StopRequest.state == StopState.QUEUED,
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
                Task.status == TaskStatus.STOPPING,
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
        state=StopState.QUEUED,
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
