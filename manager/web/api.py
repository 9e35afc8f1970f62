"""Operator API: /api/tasks and /api/stops (bearer token)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, request

from .. import get_dispatcher, get_session, get_settings
from ..db import begin_write
from ..dispatch import stop_task_now
from ..errors import ApiError
from ..lifecycle import utcnow
from ..models import StopBatch
from ..queries import (
    TaskFilter,
    batch_json,
    decode_cursor,
    delivery_json,
    encode_cursor,
    find_task,
    list_tasks,
    parse_limit,
    parse_range,
    parse_status,
    stop_request_json,
    task_deliveries,
    task_json,
    task_stop_requests,
)
from ..stopping import BulkSelection, create_batch
from .auth import require_token

# The API waits this long for a rate slot before leaving the stop to the worker.
FIRST_ATTEMPT_MAX_WAIT = 2.0

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/tasks")
@require_token
def tasks() -> dict[str, Any]:
    args = request.args
    since, until = parse_range(args.get("since"), args.get("until"))
    flt = TaskFilter(
        status=parse_status(args.get("status")),
        owner=args.get("owner") or None,
        since=since,
        until=until,
        app_id=get_settings().zego_app_id,
    )
    rows, next_pk = list_tasks(
        get_session(), flt, parse_limit(args.get("limit")), decode_cursor(args.get("cursor"))
    )
    return {
        "tasks": [task_json(t) for t in rows],
        "next_cursor": None if next_pk is None else encode_cursor(next_pk),
    }


@bp.get("/tasks/<task_id>")
@require_token
def task_detail(task_id: str) -> dict[str, Any]:
    session = get_session()
    task = find_task(session, task_id, get_settings().zego_app_id)
    return {
        "task": task_json(task),
        "deliveries": [delivery_json(d) for d in task_deliveries(session, task)],
        "stop_requests": task_stop_requests(session, task),
    }


@bp.post("/tasks/<task_id>/stop")
@require_token
def stop_task(task_id: str) -> tuple[dict[str, Any], int]:
    """Store the stop, then make the first attempt here; retries are the worker's."""
    reason = _reason(_json_body())
    force = request.args.get("force", "").lower() in ("1", "true", "yes")
    stop, created = stop_task_now(
        get_session(),
        get_dispatcher(),
        task_id,
        app_id=get_settings().zego_app_id,
        requested_by=g.operator,
        reason=reason,
        force=force,
        max_wait=FIRST_ATTEMPT_MAX_WAIT,
    )
    body = {"stop_request": stop_request_json(stop, task_id), "created": created}
    if stop.state == "succeeded":
        return body, 200
    if stop.state == "queued":
        return body, 202
    message = f"ZEGOCLOUD refused the stop: {stop.last_code} {stop.last_message}"
    error = {
        "code": "zego_refused",
        "message": message,
        "zego_code": stop.last_code,
        "zego_message": stop.last_message,
        "request_id": stop.last_request_id,
    }
    return {"error": error, **body}, 502


@bp.post("/stops")
@require_token
def bulk_stop() -> tuple[dict[str, Any], int]:
    body = _json_body()
    selection = BulkSelection.from_json(body)
    session = get_session()
    begin_write(session)
    batch, skipped = create_batch(
        session,
        selection,
        requested_by=g.operator,
        reason=_reason(body),
        app_id=get_settings().zego_app_id,
        now=utcnow(),
    )
    session.commit()
    return {"batch": batch_json(session, batch), "skipped": skipped}, 202


@bp.get("/stops/<int:batch_id>")
@require_token
def batch_detail(batch_id: int) -> dict[str, Any]:
    session = get_session()
    batch = session.get(StopBatch, batch_id)
    if batch is None:
        raise ApiError(404, "unknown_batch", f"no stop batch {batch_id}")
    return {"batch": batch_json(session, batch, with_items=True)}


def _json_body() -> dict[str, Any]:
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", "the body must be a JSON object")
    return body


def _reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str) or len(reason) > 500:
        raise ApiError(400, "invalid_body", "reason must be a string of at most 500 characters")
    return reason
