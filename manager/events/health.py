"""How the subscriptions fare: their sends by state and the oldest pending, per
subscription (the API and the dashboard) and in all (the metrics' gauges)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select

from manager.clock import iso
from manager.events.sending import PENDING_SINCE
from manager.models import EventSend, Subscription
from manager.vocabulary import SendState


@dataclass(frozen=True)
class Health:
    pending: int = 0
    delivered: int = 0
    failed: int = 0
    oldest_pending_at: datetime | None = None

    def json(self, now: datetime) -> dict[str, Any]:
        oldest = self.oldest_pending_at
        return {
            "pending": self.pending,
            "delivered": self.delivered,
            "failed": self.failed,
            "oldest_pending_at": iso(oldest),
            "oldest_pending_seconds": None
            if oldest is None
            else max(round((now - oldest).total_seconds()), 0),
        }


def health_by_subscription(
    conn: Connection, subscription_id: int | None = None
) -> dict[int, Health]:
    """Every subscription's sends by state, or one's (those with no sends are absent)."""
    counts: dict[int, dict[str, Any]] = {}
    query = select(
        EventSend.subscription_id,
        EventSend.state,
        func.count(),
        func.min(PENDING_SINCE),
    ).group_by(EventSend.subscription_id, EventSend.state)
    if subscription_id is not None:
        query = query.where(EventSend.subscription_id == subscription_id)
    rows = conn.execute(query)
    for sub_id, state, count, oldest in rows:
        entry = counts.setdefault(sub_id, {})
        entry[state] = count
        if state == SendState.PENDING:
            entry["oldest_pending_at"] = oldest
    return {sub_id: Health(**entry) for sub_id, entry in counts.items()}


def health_of(conn: Connection, subscription_id: int) -> Health:
    """One subscription's sends by state."""
    return health_by_subscription(conn, subscription_id).get(subscription_id, Health())


@dataclass(frozen=True)
class Outbox:
    """The outbox in all: for the metrics, read at scrape time, the same on every host."""

    pending: int
    oldest_pending_at: datetime | None
    enabled: int
    disabled: int
    failing: int  # enabled, but every attempt failing since `failing_since`


def outbox_state(conn: Connection) -> Outbox:
    pending, oldest = conn.execute(
        select(func.count(), func.min(PENDING_SINCE)).where(
            EventSend.state == SendState.PENDING.value
        )
    ).one()
    enabled = Subscription.disabled_at.is_(None)
    subs = conn.execute(
        select(
            func.count().filter(enabled),
            func.count().filter(~enabled),
            func.count().filter(enabled, Subscription.failing_since.is_not(None)),
        )
    ).one()
    return Outbox(pending, oldest, subs[0] or 0, subs[1] or 0, subs[2] or 0)
