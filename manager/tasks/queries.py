"""Finding and listing tasks, their runs, deliveries and stop requests."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from manager.clock import iso
from manager.errors import Invalid, NotFound
from manager.models import (
    STOP_STATES,
    Delivery,
    StopAttempt,
    StopBatch,
    StopRequest,
    Task,
    TaskRun,
)
from manager.params import is_number
from manager.tasks.shapes import stop_request_json
from manager.vocabulary import StopState

HISTORY_LIMIT = 1000


@dataclass(frozen=True)
class TaskFilter:
    status: str | None = None
    owner: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    app_id: int | None = None


def encode_cursor(task_pk: int) -> str:
    return base64.urlsafe_b64encode(str(task_pk).encode()).decode().rstrip("=")


# tasks.id (and stop_batches.id) are Integers: PostgreSQL will not compare them with a
# larger number, so a larger id is no row of ours.
MAX_ROW_ID = 2**31 - 1


def decode_cursor(raw: str | None) -> int | None:
    if raw in (None, ""):
        return None
    assert raw is not None  # noqa: S101
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        if not is_number(text) or not 0 < int(text) <= MAX_ROW_ID:  # a task's id
            raise ValueError(text)
        return int(text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise Invalid("invalid_parameter", "cursor is not one this API issued") from None


def task_query(flt: TaskFilter) -> Select[Any]:
    query = select(Task)
    if flt.app_id is not None:
        query = query.where(Task.app_id == flt.app_id)
    if flt.status:
        query = query.where(Task.status == flt.status)
    if flt.owner:
        query = query.where(Task.owner == flt.owner)
    if flt.since:
        query = query.where(Task.first_seen_at >= flt.since)
    if flt.until:
        query = query.where(Task.first_seen_at < flt.until)
    return query


def list_tasks(
    session: Session, flt: TaskFilter, limit: int, cursor: int | None
) -> tuple[list[Task], int | None]:
    """Newest first; returns the page and the cursor of the next one (None at the end)."""
    query = task_query(flt).order_by(Task.id.desc()).limit(limit + 1)
    if cursor is not None:
        query = query.where(Task.id < cursor)
    rows: list[Task] = list(session.execute(query).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].id if more and rows else None)


def find_task(session: Session, task_id: str, app_id: int | None) -> Task:
    query = select(Task).where(Task.task_id == task_id)
    if app_id is not None:
        query = query.where(Task.app_id == app_id)
    task = session.execute(query.order_by(Task.id).limit(1)).scalar_one_or_none()
    if task is None:
        raise NotFound("unknown_task", f"no task {task_id!r}")
    return task


def task_deliveries(session: Session, task: Task, limit: int = HISTORY_LIMIT) -> list[Delivery]:
    """The task's latest deliveries, newest first."""
    query = (
        select(Delivery)
        .where(Delivery.task_pk == task.id)
        .order_by(Delivery.id.desc())
        .limit(limit)
    )
    return list(session.execute(query).scalars())


def task_runs(session: Session, task: Task, limit: int | None = None) -> list[TaskRun]:
    """The task's runs in run_no order: all of them, or only the latest `limit`."""
    query = select(TaskRun).where(TaskRun.task_pk == task.id)
    if limit is None:
        return list(session.execute(query.order_by(TaskRun.run_no)).scalars())
    latest = session.execute(query.order_by(TaskRun.run_no.desc()).limit(limit)).scalars()
    return list(reversed(list(latest)))


def count_runs(session: Session, task: Task) -> int:
    query = select(func.count()).select_from(TaskRun).where(TaskRun.task_pk == task.id)
    return int(session.execute(query).scalar_one())


def task_stop_requests(session: Session, task: Task) -> list[dict[str, Any]]:
    stops = list(
        session.execute(
            select(StopRequest)
            .where(StopRequest.task_pk == task.id)
            .order_by(StopRequest.id.desc())
        ).scalars()
    )
    attempts: dict[int, list[StopAttempt]] = {s.id: [] for s in stops}
    if stops:
        for attempt in session.execute(
            select(StopAttempt)
            .where(StopAttempt.stop_request_id.in_(attempts))
            .order_by(StopAttempt.id)
        ).scalars():
            attempts[attempt.stop_request_id].append(attempt)
    return [stop_request_json(s, task.task_id, attempts[s.id]) for s in stops]


def batch_json(session: Session, batch: StopBatch, with_items: bool = False) -> dict[str, Any]:
    counts = dict(
        session.execute(
            select(StopRequest.state, func.count())
            .where(StopRequest.batch_id == batch.id)
            .group_by(StopRequest.state)
        ).all()
    )
    body: dict[str, Any] = {
        "id": batch.id,
        "created_at": iso(batch.created_at),
        "requested_by": batch.requested_by,
        "reason": batch.reason,
        "selector": batch.selector,
        "total": batch.total,
        "progress": {state: counts.get(state, 0) for state in STOP_STATES},
        "done": counts.get(StopState.QUEUED, 0) == 0,
    }
    if with_items:
        rows = session.execute(
            select(StopRequest, Task.task_id)
            .join(Task, Task.id == StopRequest.task_pk)
            .where(StopRequest.batch_id == batch.id)
            .order_by(StopRequest.id)
        ).all()
        body["items"] = [stop_request_json(stop, task_id) for stop, task_id in rows]
    return body
