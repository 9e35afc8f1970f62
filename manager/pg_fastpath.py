"""PostgreSQL: apply a callback in one call of manager_apply_callback(), one round trip.

The locked path (lifecycle.apply_callback) takes BEGIN, two statements and COMMIT,
each a round trip, with the rules run here in Python on the locked row. The function
(created by migration 0011) runs the same rules where the row is: it locks or
creates the task, claims the nonce, records the delivery under its event key and
writes the task and its run back, in the locked path's lock order (task, nonce,
event key), so the two paths cannot deadlock each other. In autocommit mode the call
is its own transaction: committed when it returns, undone whole when it fails.

What it leaves to the locked path it refuses with SQLSTATE MGR01, having written
nothing: a (Timestamp, Nonce) seen before (a retransmission, or a forgery that the
locked path refuses by its body's digest), or a task created here whose event key
is taken. `try_apply` then returns None.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from .lifecycle import Outcome, event_rank, pg_json, utc_from_timestamp
from .sqlutil import driver_execute
from .zego.callbacks import Callback

LEAVE_TO_LOCKED_PATH = "MGR01"  # the SQLSTATE of the function's refusals

_APPLY = """
    SELECT * FROM manager_apply_callback(
        %(app_id)s::bigint, %(task_id)s::varchar, %(event)s::varchar, %(user_id)s::varchar,
        %(sequence)s::bigint, %(status)s::varchar, %(stop_reason)s::smallint,
        %(zego_timestamp)s::bigint, %(nonce)s::varchar, %(body_sha256)s::varchar,
        %(event_key)s::varchar, %(rank)s::smallint, %(is_stop)s::boolean, %(at)s::timestamp,
        %(input)s::json, %(outputs)s::json, %(received_at)s::timestamp,
        %(remote_addr)s::varchar, %(body_size)s::integer, %(raw_body)s::bytea
    )
"""


def try_apply(
    conn: Connection,
    cb: Callback,
    *,
    raw_body: bytes,
    body_size: int,
    received_at: datetime,
    remote_addr: str | None,
) -> Outcome | None:
    """Record and apply the delivery in one call, or return None having written nothing.

    `conn` is a PostgreSQL connection in autocommit mode (the app's autocommit engine).
    """
    values = {
        **cb.audit_fields(),
        "body_sha256": cb.body_digest(),
        "event_key": cb.event_key(),
        "rank": event_rank(cb),
        "is_stop": cb.is_stop,
        "at": utc_from_timestamp(cb.timestamp),
        "input": pg_json(cb.input),  # read only for a start or update
        "outputs": pg_json(cb.outputs),
        "received_at": received_at,
        "remote_addr": remote_addr,
        "body_size": body_size,
        "raw_body": raw_body,
    }
    try:
        verdict, reason, task_pk, delivery_id = driver_execute(conn, _APPLY, values)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) == LEAVE_TO_LOCKED_PATH:
            return None
        raise
    return Outcome(verdict, reason, task_pk, delivery_id)
