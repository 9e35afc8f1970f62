"""Tasks, runs, deliveries and stop requests as JSON: the shapes the API serves and the
CLI prints."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from manager.callbacks.history import stored_run
from manager.callbacks.rules import Ending
from manager.clock import iso, whole_seconds
from manager.models import (
    Delivery,
    StopAttempt,
    StopRequest,
    Task,
    TaskRun,
)
from manager.vocabulary import StopState


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
        "version": task.version,
    }


def run_end(run: TaskRun) -> Ending | None:
    """How the run ended, or None while it is still going."""
    return stored_run(run).ending


def run_seconds(run: TaskRun, now: datetime) -> int | None:
    """Whole seconds from the run's start to its end (to `now` while it is going),
    never negative; None when its start is unknown."""
    if run.started_at is None:
        return None
    return whole_seconds(run.started_at, run.ended_at or now)


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
