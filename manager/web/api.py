"""Operator API: /api/tasks and /api/stops (bearer token)."""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, g, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import PathConverter

from manager.clock import utcnow
from manager.db import begin_write
from manager.errors import Invalid, NotFound
from manager.models import TASK_STATUSES, StopBatch
from manager.params import MAX_PAGE, parse_limit, parse_range, parse_status
from manager.services import get_dispatcher, get_session, get_settings
from manager.stops.bulk import BulkSelection, create_batch
from manager.stops.dispatch import stop_task_now
from manager.stored_text import check_storable
from manager.tasks.queries import (
    MAX_ROW_ID,
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
from manager.web.bodies import json_object, reason_of
from manager.web.openapi import (
    OWNER,
    SINCE,
    UNTIL,
    documented,
    integer_query,
    json_answer,
    json_body,
    or_empty,
    query,
)

# ?force= spellings, compared in lower case; anything else is a 400 rather than false.
FORCE_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _any_case(text: str) -> str:
    """A regular expression that matches `text` in any case."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in text)


# ?force= as the OpenAPI document states it.
FORCE_PATTERN = f"^(?:{'|'.join(map(_any_case, FORCE_VALUES))})$"
DEFAULT_LIMIT = parse_limit(None)
TASK_ID = {"task_id": {"description": "the task's TaskId; may hold slashes"}}


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
@documented(
    "List tasks, newest first, a page at a time",
    parameters=[
        query("status", or_empty({"enum": list(TASK_STATUSES)}), "only tasks in it"),
        OWNER,
        {**SINCE, "description": "first seen at or after this time; " + SINCE["description"]},
        {**UNTIL, "description": "first seen before this time"},
        integer_query("limit", 1, MAX_PAGE, f"page size, {DEFAULT_LIMIT} unless given"),
        query("cursor", {"type": "string"}, "the next_cursor of the page before"),
    ],
    responses={
        200: json_answer("A page of tasks.", "TaskPage"),
        400: "Invalid",
        503: "Unavailable",
    },
)
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
@documented(
    "A task: its state, runs, deliveries and stop requests",
    path_parameters=TASK_ID,
    responses={
        200: json_answer("The task.", "TaskDetail"),
        400: "Invalid",
        404: "NotFound",
        503: "Unavailable",
    },
)
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
@documented(
    "Stop a task through StopCloudTranscode",
    description=(
        "Stores the stop request with the next Sequence, then sends it as the task's "
        "owner. A stop already in flight for the task is returned, not repeated."
    ),
    path_parameters=TASK_ID,
    parameters=[
        query(
            "force",
            {"type": "string", "pattern": FORCE_PATTERN},
            f"stop a stopped or failed task too; {', '.join(FORCE_VALUES)}, any case",
        )
    ],
    body=json_body("StopBody", required=False, description="Optional."),
    responses={
        200: json_answer("ZEGOCLOUD accepted it: the task is stopping.", "StopAnswer"),
        202: json_answer("Queued: the worker retries it.", "StopAnswer"),
        400: "Invalid",
        404: "NotFound",
        409: json_answer("The task is stopped or failed already, or has no owner.", "Error"),
        502: json_answer("ZEGOCLOUD refused it for good.", "ZegoRefusal"),
        503: "Unavailable",
    },
)
@require_token
def stop_task(task_id: str) -> tuple[dict[str, Any], int]:
    """Store the stop, then make the first attempt here; retries are the worker's."""
    task_id = _task_id(task_id)
    reason = reason_of(json_object())
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
@documented(
    "Stop many tasks: these, an owner's running ones, or every running one",
    description="Queues a stop request per task; the worker sends them within the rate limit.",
    body=json_body("BulkStopBody", required=True),
    responses={
        202: json_answer("The batch, with its stop requests.", "BulkStopAnswer"),
        400: "Invalid",
        503: "Unavailable",
    },
)
@require_token
def bulk_stop() -> tuple[dict[str, Any], int]:
    body = json_object()
    _check_selector_text(body)
    selection = BulkSelection.from_json(body)
    reason = reason_of(body)
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


# An id no batch can have (stop_batches.id is an Integer) is no route at all, rather
# than a number the database cannot compare.
@bp.get(f"/stops/<int(min=1, max={MAX_ROW_ID}):batch_id>")
@documented(
    "A bulk stop and its stop requests",
    path_parameters={"batch_id": {"description": "the batch's id"}},
    responses={
        200: json_answer("The batch.", "BatchAnswer"),
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def batch_detail(batch_id: int) -> dict[str, Any]:
    session = get_session()
    batch = session.get(StopBatch, batch_id)
    if batch is None:
        raise NotFound("unknown_batch", f"no stop batch {batch_id}")
    return {"batch": batch_json(session, batch, with_items=True)}


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
