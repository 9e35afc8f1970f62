"""Which outbound events a change of a task emits, and the body each is sent with.

Every path that moves a task (the webhook's callbacks, our accepted stops, `manager
rebuild`) passes its `Change` here before writing it back; manager/callbacks/outbox.py
writes what comes back in the same transaction, and manager/events/ sends it.

- Nothing changed (a duplicate, or a stale callback with nothing newer): no event. A
  callback stale for the task's state may still bring the newest details (input and
  outputs are their own register): that is a `task.updated`.
- A run that had ended changed, or went (`Change.rewrote`, a late delivery): one
  `task.revised`.
- Otherwise one event for where the task now is: `task.started` when a new run began,
  `task.stopping`, `task.stopped` or `task.failed` when its status became that, else
  `task.updated` (a newer update, the owner named, details).
- And one `run.ended` for each run that ended with this change, with its duration and
  how it ended, before the task's own event.

Each event takes the next of the task's versions (`tasks.version`), so a consumer that
keeps the body with the highest version per task keeps the task as it now is, whatever
order or duplicates reach it. The body is Standard Webhooks' shape: `type`,
`timestamp`, `data` (the version, the task's snapshot after the change, and the run
for `run.ended`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from manager.callbacks.deliveries import Details
from manager.callbacks.history import Change, TaskState
from manager.callbacks.rules import Run, TaskStatus
from manager.clock import iso, whole_seconds
from manager.vocabulary import EventType

_ON_STATUS = {
    TaskStatus.STOPPING: EventType.TASK_STOPPING,
    TaskStatus.STOPPED: EventType.TASK_STOPPED,
    TaskStatus.FAILED: EventType.TASK_FAILED,
}


@dataclass(frozen=True, slots=True)
class Emitted:
    """One event of a change: its version, its type and the body to send, as sent."""

    version: int
    type: EventType
    body: str


def pass_on(
    task: TaskState, change: Change, *, at: datetime, details: Details | None = None
) -> list[Emitted]:
    """The events `change` emits, and `task.version` moved past them.

    `task` is the row before the change (its registers outside the fold already moved,
    as deliveries.settle does); `details` the callback's input and outputs if they are
    the task's now; `at` when the change happened (the event's timestamp).
    """
    if not change.changed and details is None:
        return []
    kinds: list[tuple[EventType, tuple[int, Run] | None]] = [
        (EventType.RUN_ENDED, (number, run)) for number, run in _ended_now(task, change)
    ]
    kinds.append((_task_event(task, change), None))
    snapshot = _snapshot(task, change, details)
    emitted = []
    for kind, run in kinds:
        task.version += 1
        data: dict[str, Any] = {"version": task.version, "task": snapshot}
        if run is not None:
            data["run"] = _run(*run, owner=change.history.owner)
        body = {"type": str(kind), "timestamp": iso(at), "data": data}
        emitted.append(Emitted(task.version, kind, json.dumps(body, separators=(",", ":"))))
    return emitted


def _task_event(task: TaskState, change: Change) -> EventType:
    after = change.history
    if change.rewrote:
        return EventType.TASK_REVISED
    if after.run_count > task.runs and after.status == TaskStatus.RUNNING:
        return EventType.TASK_STARTED
    if after.status != task.status:
        return _ON_STATUS.get(after.status, EventType.TASK_UPDATED)
    return EventType.TASK_UPDATED


def _ended_now(task: TaskState, change: Change) -> list[tuple[int, Run]]:
    """The runs this change ended: new ones that ended, or the last one, then open."""
    return [
        (number, run)
        for number, run in change.runs
        if run.ended_at is not None
        and (number > task.runs or (number == task.runs and task.ended_at is None))
    ]


def _snapshot(task: TaskState, change: Change, details: Details | None) -> dict[str, Any]:
    """The task after the change: the lifecycle fields `GET /api/tasks/<id>` serves."""
    after = change.history
    last = after.last_run
    task_input, outputs = (task.input, task.outputs) if details is None else details
    return {
        "task_id": task.task_id,
        "app_id": task.app_id,
        "owner": after.owner,
        "status": str(after.status),
        "stop_reason": None if last is None else last.stop_reason,
        "sequence": task.max_seq,
        "runs": after.run_count,
        "input": task_input,
        "outputs": outputs,
        "started_at": None if last is None else iso(last.started_at),
        "ended_at": None if last is None else iso(last.ended_at),
    }


def _run(number: int, run: Run, *, owner: str | None) -> dict[str, Any]:
    """An ended run as `GET /api/tasks/<id>` lists it."""
    seconds = None
    if run.started_at is not None and run.ended_at is not None:
        seconds = whole_seconds(run.started_at, run.ended_at)
    return {
        "run": number,
        "owner": owner,
        "started_at": iso(run.started_at),
        "ended_at": iso(run.ended_at),
        "ended": None if run.ending is None else str(run.ending),
        "seconds": seconds,
    }
