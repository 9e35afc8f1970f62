"""Replay: a subscription's events sent again, with their original webhook-ids.

Every send of the subscription's events written since a time that is no longer
pending (delivered, or given up on) is pending again, due now; the lines keep their
order (manager/events/sending.py), and the retry window runs from the replay.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select, update

from manager.events.sending import NEVER
from manager.events.subscriptions import no_such_subscription
from manager.models import Event, EventSend, Subscription
from manager.vocabulary import SendState


@dataclass(frozen=True)
class Replayed:
    count: int  # sends pending again
    disabled: bool  # the subscription is disabled: they wait until it is enabled


def replay(conn: Connection, subscription_id: int, *, since: datetime, now: datetime) -> Replayed:
    """The sends pending again (parked, if the subscription is disabled); NotFound when
    there is no such subscription."""
    found = conn.execute(
        select(Subscription.disabled_at).where(Subscription.id == subscription_id)
    ).first()
    if found is None:
        raise no_such_subscription(subscription_id)
    disabled = found.disabled_at is not None
    result = conn.execute(
        update(EventSend)
        .where(
            EventSend.subscription_id == subscription_id,
            EventSend.state != SendState.PENDING.value,
            EventSend.event_id.in_(select(Event.id).where(Event.created_at >= since)),
        )
        .values(
            state=SendState.PENDING.value,
            next_attempt_at=NEVER if disabled else now,
            replayed_at=now,
            completed_at=None,
            claimed_until=None,
        )
    )
    return Replayed(result.rowcount, disabled)
