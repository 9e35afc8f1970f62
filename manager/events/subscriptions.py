"""Subscriptions: who receives the tasks' outbound events, and how they are told apart.

Each has a URL, optionally the event types and the owner (UserId) it takes, and a
signing secret of its own, returned once (on creation and on rotation) and otherwise
only ever kept sealed (manager/events/secrets.py). After a rotation the old secret
keeps signing beside the new one for ROTATION_OVERLAP, so receivers can switch
without losing a request (Standard Webhooks: several signatures in one header).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.clock import iso
from manager.errors import Conflict, Invalid, NotFound
from manager.events.health import Health
from manager.events.secrets import Sealer, new_secret
from manager.events.sending import park, unpark
from manager.models import Subscription
from manager.stored_text import check_storable, reason_problem
from manager.vocabulary import EventType

MAX_URL_LENGTH = 2048
MAX_OWNER_LENGTH = 256
ROTATION_OVERLAP = timedelta(hours=24)
# The most subscriptions: every matching one costs each change a row.
MAX_SUBSCRIPTIONS = 100


@dataclass(frozen=True)
class WithSecret:
    """A subscription and its new secret, to be shown once."""

    subscription: Subscription
    secret: str


def check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise Invalid("invalid_url", "url is required: the http(s) URL to send events to")
    url = url.strip()
    if len(url) > MAX_URL_LENGTH:
        raise Invalid("invalid_url", f"url must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url) or not url.isascii():
        raise Invalid("invalid_url", "url must be ASCII without spaces or control characters")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise Invalid("invalid_url", "url must be an http:// or https:// URL with a host")
    if parsed.fragment or parsed.username or parsed.password:
        raise Invalid("invalid_url", "url must not have a fragment or credentials")
    try:
        parsed.port  # noqa: B018 - it raises on a port outside 0-65535
    except ValueError:
        raise Invalid("invalid_url", "url has an invalid port") from None
    return url


def check_event_types(types: Any) -> str | None:
    """The types as stored (",a,b,"), or None for every type."""
    if types is None:
        return None
    if isinstance(types, str) or not isinstance(types, Iterable):
        raise Invalid("invalid_event_types", "event_types must be a list of event types")
    chosen = []
    known = {str(t) for t in EventType}
    for kind in types:
        if not isinstance(kind, str) or kind not in known:
            raise Invalid(
                "invalid_event_types",
                f"event_types: {kind!r} is not one of {', '.join(sorted(known))}",
            )
        if kind not in chosen:
            chosen.append(kind)
    if not chosen:
        raise Invalid("invalid_event_types", "event_types must name at least one type")
    return "," + ",".join(chosen) + ","


def event_types_of(sub: Subscription) -> list[str] | None:
    return None if sub.event_types is None else sub.event_types.strip(",").split(",")


def check_owner(owner: Any) -> str | None:
    if owner is None:
        return None
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER_LENGTH:
        raise Invalid("invalid_owner", f"owner must be a UserId of 1 to {MAX_OWNER_LENGTH} chars")
    return check_storable("owner", owner, "invalid_owner")


def check_description(description: Any) -> str | None:
    if description is None:
        return None
    if not isinstance(description, str):
        raise Invalid("invalid_description", "description must be a string")
    problem = reason_problem(description)
    if problem is not None:
        raise Invalid("invalid_description", f"description {problem}")
    return description


def create_subscription(
    session: Session,
    sealer: Sealer,
    *,
    url: Any,
    event_types: Any = None,
    owner: Any = None,
    description: Any = None,
    now: datetime,
) -> WithSecret:
    """Store a new subscription; its secret is returned here and never again."""
    sub = Subscription(
        url=check_url(url),
        event_types=check_event_types(event_types),
        owner=check_owner(owner),
        description=check_description(description),
        created_at=now,
    )
    secret = new_secret()
    sub.secret_encrypted = sealer.seal(secret)
    if len(list_subscriptions(session)) >= MAX_SUBSCRIPTIONS:
        raise Conflict(
            "too_many_subscriptions", f"at most {MAX_SUBSCRIPTIONS} subscriptions may exist"
        )
    session.add(sub)
    session.flush()
    return WithSecret(sub, secret)


def list_subscriptions(session: Session) -> list[Subscription]:
    return list(session.scalars(select(Subscription).order_by(Subscription.id)))


def get_subscription(session: Session, subscription_id: int) -> Subscription:
    sub = session.get(Subscription, subscription_id)
    if sub is None:
        raise no_such_subscription(subscription_id)
    return sub


def no_such_subscription(subscription_id: int) -> NotFound:
    return NotFound("subscription_not_found", f"no subscription {subscription_id}")


def disable_subscription(
    session: Session, subscription_id: int, *, reason: str, now: datetime
) -> Subscription:
    """Stop sending to it; what is pending waits, and goes out if it is enabled again."""
    sub = get_subscription(session, subscription_id)
    if sub.disabled_at is None:
        sub.disabled_at = now
        sub.disabled_reason = reason
        park(session.connection(), sub.id)
    return sub


def enable_subscription(session: Session, subscription_id: int, *, now: datetime) -> Subscription:
    """Send to it again, starting with what is pending."""
    sub = get_subscription(session, subscription_id)
    if sub.disabled_at is not None:
        unpark(session.connection(), sub.id, now)
    sub.disabled_at = None
    sub.disabled_reason = None
    sub.failing_since = None
    return sub


def rotate_secret(
    session: Session, sealer: Sealer, subscription_id: int, *, now: datetime
) -> WithSecret:
    """A new secret, returned once; the old one signs beside it for ROTATION_OVERLAP."""
    sub = get_subscription(session, subscription_id)
    secret = new_secret()
    sub.previous_secret_encrypted = sub.secret_encrypted
    sub.previous_secret_until = now + ROTATION_OVERLAP
    sub.secret_encrypted = sealer.seal(secret)
    return WithSecret(sub, secret)


def subscription_json(
    sub: Subscription, *, now: datetime, health: Health | None = None
) -> dict[str, Any]:
    """A subscription as the API serves it (with how its sends fare, when given): never
    its secret."""
    overlap = sub.previous_secret_until is not None and sub.previous_secret_until > now
    shown = {
        "id": sub.id,
        "url": sub.url,
        "event_types": event_types_of(sub),
        "owner": sub.owner,
        "description": sub.description,
        "created_at": iso(sub.created_at),
        "enabled": sub.disabled_at is None,
        "disabled_at": iso(sub.disabled_at),
        "disabled_reason": sub.disabled_reason,
        "failing_since": iso(sub.failing_since),
        "last_success_at": iso(sub.last_success_at),
        "previous_secret_until": iso(sub.previous_secret_until) if overlap else None,
    }
    if health is not None:
        shown["health"] = health.json(now)
    return shown
