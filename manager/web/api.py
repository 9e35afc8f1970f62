"""Operator API: /api/tasks (bearer token)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from .. import get_session, get_settings
from ..queries import (
    TaskFilter,
    decode_cursor,
    delivery_json,
    encode_cursor,
    find_task,
    list_tasks,
    parse_limit,
    parse_status,
    parse_time,
    task_deliveries,
    task_json,
)
from .auth import require_token

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.get("/tasks")
@require_token
def tasks() -> dict[str, Any]:
    args = request.args
    flt = TaskFilter(
        status=parse_status(args.get("status")),
        owner=args.get("owner") or None,
        since=parse_time("since", args.get("since")),
        until=parse_time("until", args.get("until")),
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
        "stop_requests": [],
    }
