"""The stuck report (SPEC 3.4): tasks stopping for over STOPPING_GRACE without a stop
callback, and running tasks gone silent, longest stuck first.

The rows are yielded from a server-side cursor: iterate them while the session is open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import Task
from manager.reports.dialect import ts
from manager.reports.queries import stream
from manager.stops.restops import RESTOP_AFTER
from manager.vocabulary import TaskStatus

# A task is stuck stopping once the worker would stop it again: one rule, one constant.
STOPPING_GRACE = RESTOP_AFTER
# A running task is stuck after a day without a delivery, unless asked otherwise.
DEFAULT_SILENT_FOR = 86400
# Why a task is stuck.
NO_STOP_CALLBACK = "no_stop_callback"  # stopping, and no stop callback came
NO_DELIVERY = "no_delivery"  # running, and silent


@dataclass(frozen=True)
class StuckTask:
    """One stuck task: what it is stuck in, since when, and why."""

    task_id: str
    owner: str | None
    status: str
    since: datetime
    reason: str


def stuck(
    session: Session,
    now: datetime | None = None,
    silent_for: int = DEFAULT_SILENT_FOR,
    owner: str | None = None,
) -> Iterator[StuckTask]:
    """Tasks stopping for over 120 s without a stop callback, and running ones gone silent.

    Longest stuck first. `since` is when the task became stopping (its updated_at), or its
    last delivery.
    """
    now = now or utcnow()
    stopping_since = Task.updated_at
    running_since = func.coalesce(Task.last_delivery_at, Task.updated_at)
    is_stopping, is_silent = _stuck_conditions(now, silent_for)
    since = case((Task.status == TaskStatus.STOPPING, stopping_since), else_=running_since)
    query = select(Task.task_id, Task.owner, Task.status, since.label("since")).where(
        or_(is_stopping, is_silent)
    )
    if owner is not None:
        query = query.where(Task.owner == owner)
    query = query.order_by(since.asc(), Task.task_id.asc())
    for task_id, task_owner, status, since_at in stream(session, query):
        reason = NO_STOP_CALLBACK if status == TaskStatus.STOPPING else NO_DELIVERY
        yield StuckTask(task_id, task_owner, status, _naive(since_at), reason)


def stuck_counts(
    session: Session, now: datetime | None = None, silent_for: int = DEFAULT_SILENT_FOR
) -> dict[str, int]:
    """How many tasks are stuck, by reason (no_stop_callback, no_delivery): the report's
    rule, counted in one query."""
    is_stopping, is_silent = _stuck_conditions(now or utcnow(), silent_for)
    stopping, silent = session.execute(
        select(
            func.count().filter(is_stopping),
            func.count().filter(is_silent),
        ).where(or_(is_stopping, is_silent))
    ).one()
    return {NO_STOP_CALLBACK: stopping, NO_DELIVERY: silent}


def _stuck_conditions(now: datetime, silent_for: int) -> tuple[Any, Any]:
    """(stuck stopping, stuck running): the two conditions of the report."""
    silent_cutoff = ts(now - timedelta(seconds=silent_for))
    is_stopping = and_(
        Task.status == TaskStatus.STOPPING, Task.updated_at < ts(now - STOPPING_GRACE)
    )
    is_silent = and_(
        Task.status == TaskStatus.RUNNING,
        or_(
            Task.last_delivery_at < silent_cutoff,
            and_(Task.last_delivery_at.is_(None), Task.updated_at < silent_cutoff),
        ),
    )
    return is_stopping, is_silent


def _naive(value: Any) -> datetime:
    # SQLite hands back the stored string when a CASE hides the column type.
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)
