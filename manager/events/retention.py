"""DELIVERY_RETENTION_DAYS for the outbound events: an event older than the retention
goes, with its sends and their attempts, once no subscription still has it pending.

Events are read in id order (the order they were written in), a batch at a time, each
batch one short transaction; a pass ends at the first event inside the retention. A
pending send keeps its event, however old (a disabled subscription's, say): it is
still to be sent, or replayed.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, exists, select

from manager.db import write_connection
from manager.models import Event, EventSend
from manager.vocabulary import SendState

BATCH = 1000


def prune_events(
    engine: Engine,
    *,
    now: datetime,
    retention_days: int,
    batch_size: int = BATCH,
    max_batches: int = 50,
    pause: float = 0.0,
) -> int:
    """How many events were deleted (their sends and attempts with them)."""
    cutoff = now - timedelta(days=retention_days)
    pending = exists().where(
        EventSend.event_id == Event.id, EventSend.state == SendState.PENDING.value
    )
    deleted, after = 0, 0
    for batch in range(max_batches):
        if batch:
            time.sleep(pause)
        with write_connection(engine) as conn:
            rows = conn.execute(
                select(Event.id, Event.created_at, pending.label("pending"))
                .where(Event.id > after)
                .order_by(Event.id)
                .limit(batch_size)
            ).all()
            old = [r.id for r in rows if r.created_at < cutoff and not r.pending]
            if old:
                # The sends first, then the attempts go with them (ON DELETE CASCADE).
                conn.execute(delete(EventSend).where(EventSend.event_id.in_(old)))
                conn.execute(delete(Event).where(Event.id.in_(old)))
        deleted += len(old)
        if len(rows) < batch_size or rows[-1].created_at >= cutoff:
            break
        after = rows[-1].id
    return deleted
