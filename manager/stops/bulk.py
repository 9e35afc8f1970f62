"""Bulk stops: a batch of stop requests for tasks named, an owner's, or every running one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    DateTime,
    String,
    Table,
    literal,
    select,
)
from sqlalchemy.orm import Session

from manager.errors import Invalid
from manager.models import StopBatch, StopRequest, Task
from manager.sqlutil import insert_for
from manager.stops.requests import QUEUED_ONLY
from manager.vocabulary import StopState, TaskStatus

MAX_BULK_TASKS = 10_000
_requests_table = cast(Table, StopRequest.__table__)
_requests = _requests_table.c


@dataclass(frozen=True)
class BulkSelection:
    task_ids: tuple[str, ...] | None = None
    owner: str | None = None
    all_running: bool = False

    @classmethod
    def from_json(cls, body: Any) -> BulkSelection:
        if not isinstance(body, dict):
            raise Invalid("invalid_body", "the body must be a JSON object")
        # null and false mean "left out"; 0 and 0.0 equal False in Python but are given.
        given = [
            k
            for k in ("task_ids", "owner", "all_running")
            if body.get(k) is not None and body.get(k) is not False
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
        literal(StopState.QUEUED.value),
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
        query = query.where(Task.owner == selection.owner, Task.status == TaskStatus.RUNNING)
    else:
        query = query.where(Task.status == TaskStatus.RUNNING)
    rows = session.execute(query.order_by(Task.id)).all()

    skipped: dict[str, str] = {}
    if selection.task_ids is not None:
        known = {r.task_id for r in rows}
        skipped.update({t: "unknown_task" for t in selection.task_ids if t not in known})
    eligible: dict[int, str] = {}
    for row in rows:
        if row.status != TaskStatus.RUNNING:
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
