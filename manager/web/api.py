"""Operator API: /api/tasks and /api/stops (bearer token)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, g, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import PathConverter

from manager.clock import utcnow
from manager.db import begin_write
from manager.errors import Invalid, NotFound
from manager.models import StopBatch
from manager.params import parse_limit, parse_range, parse_status
from manager.services import get_dispatcher, get_session, get_settings
from manager.stops.bulk import BulkSelection, create_batch
from manager.stops.dispatch import stop_task_now
from manager.stored_text import check_storable, reason_problem
from manager.tasks.queries import (
    TaskFilter,
    batch_json,
    decode_cursor,
    encode_cursor,
    find_task,
    list_tasks,
    task_deliveries,
    task_runs,
    task_stop_requests,
)
from manager.tasks.shapes import delivery_json, run_json, stop_request_json, task_json
from manager.vocabulary import StopState
from manager.web.auth import require_token

# ?force= spellings, compared in lower case; anything else is a 400 rather than false.
FORCE_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


class TaskIdConverter(PathConverter):
    """A task id in a URL: may hold slashes, even a leading or doubled one, as callbacks
    accept them. Its routes also set merge_slashes=False, so that "/api/tasks//x" is
    task "/x" rather than a redirect to task "x"."""

    regex = ".+?"
    part_isolating = False


bp = Blueprint("api", __name__, url_prefix="/api")


@bp.record_once
def _register_converter(state: BlueprintSetupState) -> None:
    # Before the routes below are added: a rule looks its converter up when it is bound.
    state.app.url_map.converters["task_id"] = TaskIdConverter


@bp.get("/tasks")
@require_token
def tasks() -> dict[str, Any]:
    args = request.args
    since, until = parse_range(args.get("since"), args.get("until"))
    owner = args.get("owner") or None
    flt = TaskFilter(
        status=parse_status(args.get("status")),
        owner=None if owner is None else check_storable("owner", owner),
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


# A task id may end in "/stop", so the methods tell the routes apart: GET
# /api/tasks/a/stop is task "a/stop", POST to it stops task "a".
@bp.get("/tasks/<task_id:task_id>", merge_slashes=False)
@require_token
def task_detail(task_id: str) -> dict[str, Any]:
    """The task's state, every run of it, its deliveries and its stop requests."""
    session = get_session()
    task = find_task(session, _task_id(task_id), get_settings().zego_app_id)
    now = utcnow()
    return {
        "task": task_json(task),
        "runs": [run_json(run, now) for run in task_runs(session, task)],
        "deliveries": [delivery_json(d) for d in task_deliveries(session, task)],
        "stop_requests": task_stop_requests(session, task),
    }


@bp.post("/tasks/<task_id:task_id>/stop", merge_slashes=False)
@require_token
def stop_task(task_id: str) -> tuple[dict[str, Any], int]:
    """Store the stop, then make the first attempt here; retries are the worker's."""
    task_id = _task_id(task_id)
    reason = _reason(_json_body())
    force = _force(request.args.get("force"))
    stop, created = stop_task_now(
        get_session(),
        get_dispatcher(),
        task_id,
        app_id=get_settings().zego_app_id,
        requested_by=g.operator,
        reason=reason,
        force=force,
    )
    body = {"stop_request": stop_request_json(stop, task_id), "created": created}
    if stop.state == StopState.SUCCEEDED:
        return body, 200
    if stop.state == StopState.QUEUED:
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
    _check_selector_text(body)
    selection = BulkSelection.from_json(body)
    reason = _reason(body)
    session = get_session()
    begin_write(session)
    batch, skipped = create_batch(
        session,
        selection,
        requested_by=g.operator,
        reason=reason,
        app_id=get_settings().zego_app_id,
        now=utcnow(),
    )
    session.commit()
    # With its per-task stop requests, as GET /api/stops/<id> shows them (SPEC 3.3).
    return {"batch": batch_json(session, batch, with_items=True), "skipped": skipped}, 202


@bp.get("/stops/<int:batch_id>")
@require_token
def batch_detail(batch_id: int) -> dict[str, Any]:
    session = get_session()
    batch = session.get(StopBatch, batch_id)
    if batch is None:
        raise NotFound("unknown_batch", f"no stop batch {batch_id}")
    return {"batch": batch_json(session, batch, with_items=True)}


def _json_body() -> dict[str, Any]:
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise Invalid("invalid_body", "the body must be a JSON object")
    return body


def _reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise Invalid("invalid_body", "reason must be a string")
    problem = reason_problem(reason)
    if problem is not None:
        raise Invalid("invalid_body", f"reason {problem}")
    return reason


def _task_id(task_id: str) -> str:
    return check_storable("task_id", task_id, "invalid_task_id")


def _force(raw: str | None) -> bool:
    if raw is None:
        return False
    if raw.lower() not in FORCE_VALUES:
        # "?force" alone, or a typo, is a 400: read as false it would quietly not force.
        spellings = ", ".join(FORCE_VALUES)
        raise Invalid("invalid_parameter", f"force must be one of {spellings} (any case)")
    return FORCE_VALUES[raw.lower()]


def _check_selector_text(body: dict[str, Any]) -> None:
    """Refuse unstorable task ids and owners before BulkSelection sees them; their types
    are its to check."""
    ids = body.get("task_ids")
    if isinstance(ids, list):
        for i, task_id in enumerate(ids):
            if isinstance(task_id, str):
                check_storable(f"task_ids[{i}]", task_id, "invalid_body")
    owner = body.get("owner")
    if isinstance(owner, str):
        check_storable("owner", owner, "invalid_body")
