"""Replay: a subscription's events sent again, with their original webhook-ids.

Every send of the subscription's events written since a time that is no longer
pending (delivered, or given up on) is pending again, due now; the lines keep their
order (manager/events/sending.py), and the retry window runs from the replay.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, select, update

from manager.events.sending import NEVER
from manager.models import Event, EventSend, Subscription
from manager.vocabulary import SendState


def replay(conn: Connection, subscription_id: int, *, since: datetime, now: datetime) -> int:
    """How many sends are pending again (parked, if the subscription is disabled)."""
    disabled = conn.execute(
        select(Subscription.disabled_at).where(Subscription.id == subscription_id)
    ).scalar()
    result = conn.execute(
        update(EventSend)
        .where(
            EventSend.subscription_id == subscription_id,
            EventSend.state != SendState.PENDING.value,
            EventSend.event_id.in_(select(Event.id).where(Event.created_at >= since)),
        )
        .values(
            state=SendState.PENDING.value,
            next_attempt_at=now if disabled is None else NEVER,
            replayed_at=now,
            completed_at=None,
            claimed_until=None,
        )
    )
    return result.rowcount
