"""How the JSON API reads a request's body: one rule for every route that takes one."""

from __future__ import annotations

from typing import Any

from flask import request

from manager.errors import Invalid
from manager.stored_text import reason_problem


def json_object() -> dict[str, Any]:
    """The body as a JSON object; none at all reads as an empty one."""
    if not request.get_data():
        return {}
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise Invalid("invalid_body", "the body must be a JSON object")
    return body


def reason_of(body: dict[str, Any]) -> str | None:
    """The body's `reason`: an operator's prose, stored with what it explains."""
    reason = body.get("reason")
    if reason is None:
        return None
    if not isinstance(reason, str):
        raise Invalid("invalid_body", "reason must be a string")
    problem = reason_problem(reason)
    if problem is not None:
        raise Invalid("invalid_body", f"reason {problem}")
    return reason
