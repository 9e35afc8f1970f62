"""The delivery log: a subscription's sends, newest first, each with every attempt."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import Connection, select

from manager.clock import iso
from manager.events.sending import NEVER, webhook_id
from manager.models import Event, EventAttempt, EventSend, Task
from manager.vocabulary import SendState


def deliveries(
    conn: Connection,
    subscription_id: int,
    *,
    limit: int,
    before: int | None = None,
    state: SendState | None = None,
) -> list[dict[str, Any]]:
    """Up to `limit` sends of the subscription with ids below `before`, newest first."""
    query = (
        select(
            EventSend.id,
            EventSend.event_id,
            EventSend.version,
            EventSend.state,
            EventSend.attempts,
            EventSend.next_attempt_at,
            EventSend.created_at,
            EventSend.completed_at,
            EventSend.replayed_at,
            Event.type,
            Task.task_id,
        )
        .join(Event, Event.id == EventSend.event_id)
        .join(Task, Task.id == EventSend.task_pk)
        .where(EventSend.subscription_id == subscription_id)
        .order_by(EventSend.id.desc())
        .limit(limit)
    )
    if before is not None:
        query = query.where(EventSend.id < before)
    if state is not None:
        query = query.where(EventSend.state == state.value)
    sends = conn.execute(query).all()
    attempts: dict[int, list[dict[str, Any]]] = defaultdict(list)
    if sends:
        rows = conn.execute(
            select(EventAttempt)
            .where(EventAttempt.send_id.in_([s.id for s in sends]))
            .order_by(EventAttempt.id)
        )
        for a in rows:
            attempts[a.send_id].append(
                {
                    "attempted_at": iso(a.attempted_at),
                    "status": a.status,
                    "error": a.error,
                    "answer": a.answer,
                    "elapsed_ms": a.elapsed_ms,
                }
            )
    return [
        {
            "id": s.id,
            "webhook_id": webhook_id(s.event_id),
            "type": s.type,
            "task_id": s.task_id,
            "version": s.version,
            "state": s.state,
            "attempts": s.attempts,
            # None once it is finished, or while it is parked (its subscription disabled).
            "next_attempt_at": iso(s.next_attempt_at)
            if s.state == SendState.PENDING and s.next_attempt_at != NEVER
            else None,
            "created_at": iso(s.created_at),
            "completed_at": iso(s.completed_at),
            "replayed_at": iso(s.replayed_at),
            "log": attempts[s.id],
        }
        for s in sends
    ]
