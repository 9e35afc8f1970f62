"""The outbox's rules, in SQL: what may be sent now, and what an attempt's answer makes of it.

- **Order**: a pending send is due only at the head of its line, the pending sends
  of one (subscription, task): no earlier version of the task is pending for that
  subscription. A later version is never sent before an earlier one is delivered or
  given up on; different tasks go out side by side.
- **Claims**: due sends are claimed under a lease (`claimed_until`), locked with SKIP
  LOCKED on PostgreSQL, so several workers never send one at once; a worker killed
  mid-send leaves its claims to expire, and they go out again, with the same
  `webhook-id`. An answer counts only for the claim it answers (`attempts`).
- **Disabled subscriptions**: their pending sends are parked (due at NEVER), so that
  the claim's walk over what is due, in time order, never meets them, however many
  there are; enabling one makes them due now.
- **Retries** (`RetryPolicy`): exponential backoff with jitter, for GIVE_UP_AFTER
  from when the send was written (or replayed); then it is failed, and the line moves
  on. A subscription whose every attempt has failed for DISABLE_AFTER, or that
  answered 410 Gone, is disabled, and says why.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, and_, bindparam, exists, func, insert, or_, select, update
from sqlalchemy.orm import aliased

from manager.clock import iso
from manager.models import Event, EventAttempt, EventSend, Subscription, Task
from manager.vocabulary import SendState

# When a parked send is due: after every real time.
NEVER = datetime(9999, 12, 31)
GIVE_UP_AFTER = timedelta(days=3)
DISABLE_AFTER = timedelta(days=3)
# Standard Webhooks: a receiver answering 410 Gone wants no more.
GONE = 410
MAX_ANSWER = 512  # characters of an answer kept in the delivery log
MAX_ERROR = 256


def webhook_id(event_id: int) -> str:
    """An event's webhook-id: the same on every attempt and replay, and to every
    subscription, so that a receiver can drop what it has already seen."""
    return f"evt_{event_id}"


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed send is tried again: `first` after the first failure, doubling up
    to `longest`, each wait between half and all of that (jitter, so that a receiver
    coming back is not met by every retry at once); given up after `give_up_after`."""

    first: float = 5.0
    longest: float = 3600.0
    give_up_after: timedelta = GIVE_UP_AFTER
    disable_after: timedelta = DISABLE_AFTER

    def delay(self, attempts: int, rng: random.Random) -> float:
        ceiling = min(self.first * 2 ** max(attempts - 1, 0), self.longest)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


@dataclass(frozen=True)
class Claimed:
    """A send claimed to go out now: what to send, where, and with which secrets."""

    send_id: int
    attempt: int
    subscription_id: int
    url: str
    sealed_secrets: tuple[str, ...]  # the current secret first, then one still in overlap
    event_id: int
    event_type: str
    task_id: str
    version: int
    body: str
    since: datetime  # written or replayed: the retry window runs from here

    @property
    def webhook_id(self) -> str:
        return webhook_id(self.event_id)


@dataclass(frozen=True)
class Answer:
    """What one attempt came back with: an HTTP status, or an error and no status."""

    claimed: Claimed
    at: datetime
    elapsed_ms: int
    status: int | None = None
    answer: str | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class Recorded:
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    disabled: tuple[int, ...] = ()


_PENDING = SendState.PENDING.value
# Since when a send has been pending: written, or replayed. The retry window runs from
# here, and the oldest pending's age is counted from here (a replay of an old event is
# not an old wait).
PENDING_SINCE = func.coalesce(EventSend.replayed_at, EventSend.created_at)
_earlier = aliased(EventSend)


def claim(conn: Connection, *, now: datetime, limit: int, lease: timedelta) -> list[Claimed]:
    """Up to `limit` due sends at the head of their lines, claimed until now + lease."""
    head_of_line = ~exists().where(
        _earlier.state == _PENDING,
        _earlier.subscription_id == EventSend.subscription_id,
        _earlier.task_pk == EventSend.task_pk,
        _earlier.version < EventSend.version,
    )
    due = (
        select(EventSend.id)
        .join(Subscription, Subscription.id == EventSend.subscription_id)
        .where(
            EventSend.state == _PENDING,
            EventSend.next_attempt_at <= now,
            or_(EventSend.claimed_until.is_(None), EventSend.claimed_until < now),
            Subscription.disabled_at.is_(None),
            head_of_line,
        )
        .order_by(EventSend.next_attempt_at, EventSend.id)
        .limit(limit)
        .with_for_update(of=EventSend, skip_locked=True)
    )
    ids = list(conn.scalars(due))
    if not ids:
        return []
    conn.execute(
        update(EventSend)
        .where(EventSend.id.in_(ids))
        .values(claimed_until=now + lease, attempts=EventSend.attempts + 1)
    )
    rows = conn.execute(
        select(
            EventSend.id.label("send_id"),
            EventSend.attempts,
            Subscription.id.label("subscription_id"),
            Subscription.url,
            Subscription.secret_encrypted,
            Subscription.previous_secret_encrypted,
            Subscription.previous_secret_until,
            Event.id.label("event_id"),
            Event.type,
            Task.task_id,
            Event.version,
            Event.body,
            PENDING_SINCE.label("since"),
        )
        .join(Subscription, Subscription.id == EventSend.subscription_id)
        .join(Event, Event.id == EventSend.event_id)
        .join(Task, Task.id == Event.task_pk)
        .where(EventSend.id.in_(ids))
        .order_by(EventSend.id)
    )
    claimed = []
    for row in rows:
        sealed: tuple[str, ...] = (row.secret_encrypted,)
        in_overlap = row.previous_secret_until is not None and row.previous_secret_until > now
        if row.previous_secret_encrypted is not None and in_overlap:
            sealed += (row.previous_secret_encrypted,)
        claimed.append(
            Claimed(
                send_id=row.send_id,
                attempt=row.attempts,
                subscription_id=row.subscription_id,
                url=row.url,
                sealed_secrets=sealed,
                event_id=row.event_id,
                event_type=row.type,
                task_id=row.task_id,
                version=row.version,
                body=row.body,
                since=row.since,
            )
        )
    return claimed


def record(
    conn: Connection,
    answers: Sequence[Answer],
    *,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random,
) -> Recorded:
    """Log every attempt and move each send and its subscription on, in one transaction."""
    if not answers:
        return Recorded()
    conn.execute(
        insert(EventAttempt),
        [
            {
                "send_id": a.claimed.send_id,
                "attempted_at": a.at,
                "status": a.status,
                "error": None if a.error is None else a.error[:MAX_ERROR],
                "answer": a.answer,
                "elapsed_ms": a.elapsed_ms,
            }
            for a in answers
        ],
    )
    delivered = [a for a in answers if a.delivered]
    failed = [a for a in answers if not a.delivered]
    given_up = [a for a in failed if now - a.claimed.since >= policy.give_up_after]
    retrying = [a for a in failed if now - a.claimed.since < policy.give_up_after]
    finished = [(a, SendState.DELIVERED) for a in delivered] + [
        (a, SendState.FAILED) for a in given_up
    ]
    if finished:
        conn.execute(
            _FINISH,
            [
                {
                    "send_id": a.claimed.send_id,
                    "attempt": a.claimed.attempt,
                    "new_state": str(state),
                    "done_at": now,
                }
                for a, state in finished
            ],
        )
    if retrying:
        conn.execute(
            _RETRY,
            [
                {
                    "send_id": a.claimed.send_id,
                    "attempt": a.claimed.attempt,
                    "next_at": now + timedelta(seconds=policy.delay(a.claimed.attempt, rng)),
                }
                for a in retrying
            ],
        )
    disabled = _move_subscriptions(conn, delivered, failed, policy=policy, now=now)
    return Recorded(len(delivered), len(retrying), len(given_up), disabled)


def _move_subscriptions(
    conn: Connection,
    delivered: Sequence[Answer],
    failed: Sequence[Answer],
    *,
    policy: RetryPolicy,
    now: datetime,
) -> tuple[int, ...]:
    """A success clears a subscription's failing; failing long enough, or 410, disables it."""
    ok = sorted({a.claimed.subscription_id for a in delivered})
    if ok:
        conn.execute(
            update(Subscription)
            .where(Subscription.id.in_(ok))
            .values(failing_since=None, last_success_at=now)
        )
    bad = sorted({a.claimed.subscription_id for a in failed} - set(ok))
    if not bad:
        return ()
    conn.execute(
        update(Subscription)
        .where(Subscription.id.in_(bad), Subscription.failing_since.is_(None))
        .values(failing_since=now)
    )
    gone = sorted({a.claimed.subscription_id for a in failed if a.status == GONE})
    disabled: list[int] = []
    for sub_id in gone:
        disabled += _disable(conn, sub_id, now, "the receiver answered 410 Gone")
    for sub_id, since in conn.execute(
        select(Subscription.id, Subscription.failing_since).where(
            Subscription.id.in_(bad),
            Subscription.disabled_at.is_(None),
            Subscription.failing_since <= now - policy.disable_after,
        )
    ):
        disabled += _disable(conn, sub_id, now, f"every attempt failed since {iso(since)}")
    return tuple(disabled)


def _disable(conn: Connection, sub_id: int, now: datetime, reason: str) -> list[int]:
    result = conn.execute(
        update(Subscription)
        .where(Subscription.id == sub_id, Subscription.disabled_at.is_(None))
        .values(disabled_at=now, disabled_reason=f"disabled by the worker: {reason}")
    )
    if not result.rowcount:
        return []
    park(conn, sub_id)
    return [sub_id]


def park(conn: Connection, subscription_id: int) -> None:
    """A disabled subscription's pending sends: due never, until it is enabled."""
    conn.execute(
        update(EventSend)
        .where(EventSend.subscription_id == subscription_id, EventSend.state == _PENDING)
        .values(next_attempt_at=NEVER)
    )


def unpark(conn: Connection, subscription_id: int, now: datetime) -> None:
    """An enabled subscription's pending sends: due now, in their lines' order."""
    conn.execute(
        update(EventSend)
        .where(EventSend.subscription_id == subscription_id, EventSend.state == _PENDING)
        .values(next_attempt_at=now)
    )


# Only the claim an answer belongs to may move its send: if the lease ran out and
# another worker claimed it again, `attempts` has moved on.
_THIS_CLAIM = and_(
    EventSend.id == bindparam("send_id"),
    EventSend.attempts == bindparam("attempt"),
    EventSend.state == _PENDING,
)
_FINISH = (
    update(EventSend)
    .where(_THIS_CLAIM)
    .values(state=bindparam("new_state"), completed_at=bindparam("done_at"), claimed_until=None)
)
_RETRY = (
    update(EventSend)
    .where(_THIS_CLAIM)
    .values(next_attempt_at=bindparam("next_at"), claimed_until=None)
)
