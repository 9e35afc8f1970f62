"""Read-side helpers shared by the API, the CLI and the dashboard."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from manager.callbacks.history import stored_run
from manager.callbacks.rules import Ending
from manager.errors import Invalid, NotFound
from manager.models import (
    STOP_STATES,
    TASK_STATUSES,
    Delivery,
    StopAttempt,
    StopBatch,
    StopRequest,
    Task,
    TaskRun,
)
from manager.vocabulary import StopState

MAX_PAGE = 500
HISTORY_LIMIT = 1000


@dataclass(frozen=True)
class TaskFilter:
    status: str | None = None
    owner: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    app_id: int | None = None


# The times the API accepts: room on either side for the reports' day arithmetic, and
# nothing ZEGOCLOUD could have sent is outside.
EARLIEST = datetime(1970, 1, 1)
LATEST = datetime(9000, 1, 1)


def is_number(raw: str) -> bool:
    """ASCII digits only: str.isdigit() also takes "²", which int() refuses."""
    return raw.isascii() and raw.isdigit()


def parse_time(name: str, raw: str | None) -> datetime | None:
    """ISO 8601 or Unix seconds, as naive UTC; a bad value is a 400 naming the parameter."""
    if raw is None or raw == "":
        return None
    try:
        if is_number(raw):
            parsed = datetime.fromtimestamp(int(raw), UTC)
        else:
            parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if parsed.tzinfo is not None:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError, OSError):
        raise Invalid("invalid_parameter", f"{name} must be ISO 8601 or Unix seconds") from None
    if not EARLIEST <= parsed <= LATEST:
        raise Invalid(
            "invalid_parameter",
            f"{name} must be from {EARLIEST.date().isoformat()} to {LATEST.date().isoformat()}",
        )
    return parsed


def parse_range(
    since_raw: str | None, until_raw: str | None
) -> tuple[datetime | None, datetime | None]:
    """since and until, each checked by parse_time, until later than since."""
    since = parse_time("since", since_raw)
    until = parse_time("until", until_raw)
    if since is not None and until is not None and until <= since:
        raise Invalid("invalid_parameter", "until must be later than since")
    return since, until


def parse_status(raw: str | None) -> str | None:
    if raw in (None, ""):
        return None
    if raw not in TASK_STATUSES:
        raise Invalid("invalid_parameter", f"status must be one of {', '.join(TASK_STATUSES)}")
    return raw


def parse_limit(raw: str | None, default: int = 50, maximum: int = MAX_PAGE) -> int:
    """A page size from 1 to `maximum`; a bad value is a 400 naming `limit`."""
    if raw in (None, ""):
        return default
    assert raw is not None  # noqa: S101
    if not is_number(raw) or not 1 <= int(raw) <= maximum:
        raise Invalid("invalid_parameter", f"limit must be an integer from 1 to {maximum}")
    return int(raw)


def encode_cursor(task_pk: int) -> str:
    return base64.urlsafe_b64encode(str(task_pk).encode()).decode().rstrip("=")


def decode_cursor(raw: str | None) -> int | None:
    if raw in (None, ""):
        return None
    assert raw is not None  # noqa: S101
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        if not is_number(text) or not 0 < int(text) < 2**63:  # a task's id
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


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat() + "Z"


def task_json(task: Task) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "app_id": task.app_id,
        "owner": task.owner,
        "status": task.status,
        "stop_reason": task.stop_reason,
        "sequence": task.max_seq,
        "runs": task.runs,
        "input": task.input,
        "outputs": task.outputs,
        "first_seen_at": iso(task.first_seen_at),
        "started_at": iso(task.started_at),
        "ended_at": iso(task.ended_at),
        "updated_at": iso(task.updated_at),
        "last_delivery_at": iso(task.last_delivery_at),
    }


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


def run_end(run: TaskRun) -> Ending | None:
    """How the run ended, or None while it is still going."""
    return stored_run(run).ending


def run_seconds(run: TaskRun, now: datetime) -> int | None:
    """Whole seconds from the run's start to its end (to `now` while it is going),
    never negative; None when its start is unknown."""
    if run.started_at is None:
        return None
    span = (run.ended_at or now) - run.started_at
    # Rounded half up, as the reports round their seconds.
    return max((span + timedelta(microseconds=500_000)) // timedelta(seconds=1), 0)


def run_json(run: TaskRun, now: datetime) -> dict[str, Any]:
    end = run_end(run)
    return {
        "run": run.run_no,
        "owner": run.owner,
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "ended": None if end is None else str(end),
        "seconds": run_seconds(run, now),
    }


def delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "received_at": iso(d.received_at),
        "event": d.event,
        "user_id": d.user_id,
        "sequence": d.sequence,
        "status": d.status,
        "stop_reason": d.stop_reason,
        "timestamp": d.zego_timestamp,
        "verdict": d.verdict,
        "reason": d.reason,
    }


def stop_request_json(
    stop: StopRequest, task_id: str, attempts: list[StopAttempt] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": stop.id,
        "task_id": task_id,
        "state": stop.state,
        "sequence": stop.sequence,
        "user_id": stop.user_id,
        "requested_by": stop.requested_by,
        "reason": stop.reason,
        "force": stop.force,
        "batch_id": stop.batch_id,
        "created_at": iso(stop.created_at),
        "attempts": stop.attempts,
        "next_attempt_at": iso(stop.next_attempt_at) if stop.state == StopState.QUEUED else None,
        # Why a queued stop has not gone out, when an operator may need to act.
        "wait_reason": stop.wait_reason if stop.state == StopState.QUEUED else None,
        "completed_at": iso(stop.completed_at),
        "zego": {
            "code": stop.last_code,
            "message": stop.last_message,
            "request_id": stop.last_request_id,
        },
    }
    if attempts is not None:
        body["attempt_log"] = [
            {
                "attempted_at": iso(a.attempted_at),
                "sequence": a.sequence,
                "outcome": a.outcome,
                "http_status": a.http_status,
                "code": a.code,
                "message": a.message,
                "request_id": a.request_id,
                "elapsed_ms": a.elapsed_ms,
                "worker": a.worker,
            }
            for a in attempts
        ]
    return body


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
