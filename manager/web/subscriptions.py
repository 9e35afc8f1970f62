"""Subscriptions API: /api/subscriptions (bearer token).

Who receives the tasks' outbound events (manager/events/): create, list, disable,
enable, rotate the signing secret, read the delivery log, replay. A secret is in the
answer that made it (creation, rotation) and in no other.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from flask import Blueprint, g, request

from manager.clock import utcnow
from manager.db import begin_write
from manager.errors import Invalid
from manager.events.health import Health, health_by_subscription, health_of
from manager.events.log import deliveries
from manager.events.replay import replay
from manager.events.secrets import Sealer
from manager.events.subscriptions import (
    WithSecret,
    create_subscription,
    disable_subscription,
    enable_subscription,
    get_subscription,
    list_subscriptions,
    rotate_secret,
    subscription_json,
)
from manager.params import MAX_PAGE, is_number, parse_limit, parse_time
from manager.services import get_session, get_settings
from manager.tasks.queries import MAX_ROW_ID
from manager.vocabulary import SendState, values
from manager.web.auth import require_token
from manager.web.bodies import json_object, reason_of
from manager.web.openapi import documented, integer_query, json_answer, json_body, or_empty, query
from manager.web.schemas import enum

bp = Blueprint("subscriptions", __name__, url_prefix="/api/subscriptions")

# subscriptions.id is an Integer: a larger id is no route at all (404), rather than a
# number PostgreSQL refuses to compare (503).
ONE = f"/<int(min=1, max={MAX_ROW_ID}):subscription_id>"
SUBSCRIPTION_ID = {"subscription_id": {"description": "the subscription's id"}}
# event_sends.id is a BigInteger: a cursor past it is no page this API issued.
MAX_SEND_ID = 2**63 - 1
DEFAULT_LIMIT = parse_limit(None)


@bp.post("")
@documented(
    "Subscribe a URL to the tasks' outbound events",
    description=(
        "The answer holds the subscription's signing secret, which is not shown again. "
        "Nothing is sent until `manager worker` sends the events that follow."
    ),
    body=json_body("SubscriptionBody", required=True),
    responses={
        201: json_answer("Created, with its secret.", "SubscriptionWithSecret"),
        400: "Invalid",
        409: json_answer("There are as many subscriptions as may be.", "Error"),
        503: "Unavailable",
    },
)
@require_token
def create() -> tuple[dict[str, Any], int]:
    body = json_object()
    session = get_session()
    begin_write(session)
    made = create_subscription(
        session,
        _sealer(),
        url=body.get("url"),
        event_types=body.get("event_types"),
        owner=body.get("owner"),
        description=body.get("description"),
        now=utcnow(),
    )
    session.commit()
    return _with_secret(made), 201


@bp.get("", endpoint="list")
@documented(
    "Every subscription, with how its sends fare",
    responses={200: json_answer("The subscriptions.", "SubscriptionList"), 503: "Unavailable"},
)
@require_token
def list_all() -> dict[str, Any]:
    session = get_session()
    health = health_by_subscription(session.connection())
    now = utcnow()
    return {
        "subscriptions": [
            subscription_json(sub, now=now, health=health.get(sub.id, Health()))
            for sub in list_subscriptions(session)
        ]
    }


@bp.get(ONE)
@documented(
    "A subscription, with how its sends fare",
    path_parameters=SUBSCRIPTION_ID,
    responses={
        200: json_answer("The subscription.", "SubscriptionWithHealth"),
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def detail(subscription_id: int) -> dict[str, Any]:
    session = get_session()
    sub = get_subscription(session, subscription_id)
    return subscription_json(sub, now=utcnow(), health=health_of(session.connection(), sub.id))


@bp.post(f"{ONE}/disable")
@documented(
    "Stop sending to a subscription; what is pending waits",
    description="Disabling a disabled subscription changes nothing.",
    path_parameters=SUBSCRIPTION_ID,
    body=json_body("DisableBody", required=False, description="Optional."),
    responses={
        200: json_answer("The subscription, disabled.", "Subscription"),
        400: "Invalid",
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def disable(subscription_id: int) -> dict[str, Any]:
    reason = reason_of(json_object()) or f"disabled by {g.operator}"
    session = get_session()
    begin_write(session)
    now = utcnow()
    sub = disable_subscription(session, subscription_id, reason=reason, now=now)
    session.commit()
    return subscription_json(sub, now=now)


@bp.post(f"{ONE}/enable")
@documented(
    "Send to a subscription again, starting with what is pending",
    path_parameters=SUBSCRIPTION_ID,
    responses={
        200: json_answer("The subscription, enabled.", "Subscription"),
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def enable(subscription_id: int) -> dict[str, Any]:
    session = get_session()
    begin_write(session)
    sub = enable_subscription(session, subscription_id, now=utcnow())
    session.commit()
    return subscription_json(sub, now=utcnow())


@bp.post(f"{ONE}/rotate-secret", endpoint="rotate_secret")
@documented(
    "Give a subscription a new signing secret",
    description=(
        "The answer holds the new secret, which is not shown again; the old one keeps "
        "signing beside it until previous_secret_until."
    ),
    path_parameters=SUBSCRIPTION_ID,
    responses={
        200: json_answer("The subscription, with its new secret.", "SubscriptionWithSecret"),
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def rotate(subscription_id: int) -> dict[str, Any]:
    session = get_session()
    begin_write(session)
    made = rotate_secret(session, _sealer(), subscription_id, now=utcnow())
    session.commit()
    return _with_secret(made)


@bp.get(f"{ONE}/deliveries", endpoint="deliveries")
@documented(
    "A subscription's delivery log, newest first, a page at a time",
    path_parameters=SUBSCRIPTION_ID,
    parameters=[
        query("state", or_empty(enum(SendState)), "only the sends in this state"),
        integer_query("limit", 1, MAX_PAGE, f"page size, {DEFAULT_LIMIT} unless given"),
        query("cursor", {"type": "string"}, "the next_cursor of the page before"),
    ],
    responses={
        200: json_answer("A page of sends, each with its attempts.", "EventSendPage"),
        400: "Invalid",
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def delivery_log(subscription_id: int) -> dict[str, Any]:
    args = request.args
    state = _state(args.get("state"))
    limit = parse_limit(args.get("limit"))
    before = _cursor(args.get("cursor"))
    session = get_session()
    get_subscription(session, subscription_id)
    # One more than the page, to know whether another follows.
    rows = deliveries(
        session.connection(), subscription_id, limit=limit + 1, before=before, state=state
    )
    page = rows[:limit]
    more = len(rows) > limit
    return {"deliveries": page, "next_cursor": str(page[-1]["id"]) if more else None}


@bp.post(f"{ONE}/replay", endpoint="replay")
@documented(
    "Send a subscription's events since a time again, with their webhook-ids",
    description=(
        "Every send of an event written at or after `since` that is no longer pending "
        "(delivered, or given up on) is pending again, due now."
    ),
    path_parameters=SUBSCRIPTION_ID,
    body=json_body("ReplayBody", required=True),
    responses={
        200: json_answer("How many sends are pending again.", "ReplayAnswer"),
        400: "Invalid",
        404: "NotFound",
        503: "Unavailable",
    },
)
@require_token
def replay_since(subscription_id: int) -> dict[str, Any]:
    since = _since(json_object().get("since"))
    session = get_session()
    begin_write(session)
    replayed = replay(session.connection(), subscription_id, since=since, now=utcnow())
    session.commit()
    return {"replayed": replayed.count}


# -- helpers ------------------------------------------------------------------------------


def _sealer() -> Sealer:
    return Sealer(get_settings().subscription_keys)


def _with_secret(made: WithSecret) -> dict[str, Any]:
    return {**subscription_json(made.subscription, now=utcnow()), "secret": made.secret}


def _since(raw: Any) -> datetime:
    """`since` from a JSON body: a time as the query parameters take it, or Unix seconds
    as a number; required."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if raw is not None and not isinstance(raw, str):
        raise Invalid("invalid_parameter", "since must be ISO 8601 or Unix seconds")
    since = parse_time("since", raw)
    if since is None:
        raise Invalid("invalid_parameter", "since is required: ISO 8601 or Unix seconds")
    return since


def _state(raw: str | None) -> SendState | None:
    if raw in (None, ""):
        return None
    if raw not in values(SendState):
        raise Invalid("invalid_parameter", f"state must be one of {', '.join(values(SendState))}")
    return SendState(raw)


def _cursor(raw: str | None) -> int | None:
    """The id of the last send of the page before; the next page's are below it."""
    if raw in (None, ""):
        return None
    assert raw is not None  # noqa: S101
    # The length first: int() refuses a string of thousands of digits with ValueError.
    if not is_number(raw) or len(raw) > len(str(MAX_SEND_ID)) or not 0 < int(raw) <= MAX_SEND_ID:
        raise Invalid("invalid_parameter", "cursor is not one this API issued")
    return int(raw)
