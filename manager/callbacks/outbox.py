"""The outbox: a change's outbound events written in the transaction that changes the task.

An event (manager/callbacks/outbound.py) is stored in `events` only if some
subscription takes it, with one `event_sends` row for each subscription that does
(`manager worker` sends from those: manager/events/). Which subscriptions take an
event is `_MATCH`, the one home of that rule: enabled, for the task's owner or every
owner, for the event's type or every type. Without subscriptions a change writes
nothing here: the statements find none to fan out to.

`write_outbox` is the portable form (SQLite's callbacks, accepted stops, `manager
rebuild`); `pg_outbox_parts` the CTEs PostgreSQL's one-statement paths
(manager/callbacks/pg_statements.py) end with, and `outbox_values` their parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, text

from manager.callbacks.outbound import Emitted
from manager.clock import utcnow
from manager.vocabulary import SendState

# Whether subscription `s` takes an event of type {type} for a task of owner {owner}.
# The types a subscription takes are kept between commas (models.Subscription); no type
# holds a LIKE wildcard.
_MATCH = (
    "s.disabled_at IS NULL AND (s.owner IS NULL OR s.owner = {owner})"
    " AND (s.event_types IS NULL OR s.event_types LIKE '{pct},' || {type} || ',{pct}')"
)


def _match(owner: str, kind: str, *, pct: str) -> str:
    return _MATCH.format(owner=owner, type=kind, pct=pct)


def write_outbox(
    conn: Connection, task_pk: int, owner: str | None, emitted: Sequence[Emitted]
) -> None:
    """Store each event some subscription takes and fan it out to them (any backend),
    due now: an event's own time (an accepted stop's, say) is in its body."""
    at = utcnow()
    for event in emitted:
        event_id = conn.execute(
            _INSERT_EVENT,
            {
                "task_pk": task_pk,
                "version": event.version,
                "type": str(event.type),
                "body": event.body,
                "at": at,
                "owner": owner,
            },
        ).scalar()
        if event_id is not None:
            conn.execute(
                _FAN_OUT,
                {
                    "event_id": event_id,
                    "task_pk": task_pk,
                    "version": event.version,
                    "type": str(event.type),
                    "owner": owner,
                    "at": at,
                    "pending": SendState.PENDING.value,
                },
            )


def outbox_values(emitted: Sequence[Emitted], at: datetime) -> dict[str, Any]:
    """pg_outbox_parts' parameters (the task's id and owner are the write-back's)."""
    return {
        "events_json": json.dumps([[e.version, str(e.type), e.body] for e in emitted]),
        "events_at": at,
    }


def pg_outbox_parts(task_pk: str, written: str) -> list[str]:
    """The CTEs that store a change's events and fan them out, for a statement whose
    task id is the SQL `task_pk` and that wrote the change if `written` holds."""
    return [
        f"""ev AS (
        INSERT INTO events (task_pk, version, type, body, created_at)
        SELECT {task_pk}, (e->>0)::bigint, e->>1, e->>2, %(events_at)s::timestamp
        FROM json_array_elements(%(events_json)s::json) AS e
        WHERE {written} AND EXISTS (
            SELECT FROM subscriptions s
            WHERE {_match("%(owner)s::varchar", "(e->>1)", pct="%%")}
        )
        RETURNING id, version, type
    )""",  # noqa: S608 - fixed text, values bound
        f"""sends AS (
        INSERT INTO event_sends (subscription_id, event_id, task_pk, version, state,
            attempts, next_attempt_at, created_at)
        SELECT s.id, ev.id, {task_pk}, ev.version, '{SendState.PENDING.value}', 0,
            %(events_at)s::timestamp, %(events_at)s::timestamp
        FROM ev JOIN subscriptions s ON {_match("%(owner)s::varchar", "ev.type", pct="%%")}
    )""",  # noqa: S608 - fixed text, values bound
    ]


# --- statements, built once (any backend) ---------------------------------------------

# Typed: PostgreSQL cannot tell a parameter's type from a concatenation.
_MATCH_BOUND = _match("CAST(:owner AS VARCHAR)", "CAST(:type AS VARCHAR)", pct="%")

_INSERT_EVENT = text(
    f"""INSERT INTO events (task_pk, version, type, body, created_at)
    SELECT :task_pk, :version, :type, :body, :at
    WHERE EXISTS (SELECT 1 FROM subscriptions s WHERE {_MATCH_BOUND})
    RETURNING id"""  # noqa: S608 - fixed text, values bound
)
_FAN_OUT = text(
    f"""INSERT INTO event_sends (subscription_id, event_id, task_pk, version, state, attempts,
        next_attempt_at, created_at)
    SELECT s.id, :event_id, :task_pk, :version, :pending, 0, :at, :at
    FROM subscriptions s WHERE {_MATCH_BOUND}"""  # noqa: S608
)
