"""The PostgreSQL statements of the callback paths, built once, at import.

Each does in one round trip what SQLite takes a few statements for: the locked path
(manager/callbacks/store.py) creates or locks the task and claims the nonce in one
(`PG_CLAIM_AND_LOCK`), then records the delivery and writes the task and its changed
runs back in another (`PG_RECORD_AND_WRITE_BACK`); the fast path
(manager/callbacks/fast_path.py) reads the task (`PG_READ_TASK`) and writes it back
only if it is still the version read (`PG_GUARDED_WRITE`), or creates it with its
first delivery (`PG_CREATE_TASK`). `pg_values` are their parameters.

They run on the DBAPI cursor (see sqlutil.driver_execute), hence psycopg's %(name)s
placeholders; each is one constant string, so that it keeps its cursor and prepared
statement.
"""

from __future__ import annotations

import itertools
import json
from datetime import datetime
from typing import Any

from psycopg.types.json import Json

from manager.callbacks.deliveries import DELIVERY_COLUMNS, Details
from manager.callbacks.history import STATE_FIELDS, Change, TaskState
from manager.callbacks.outbound import Emitted
from manager.callbacks.outbox import outbox_values, pg_outbox_parts
from manager.callbacks.task_rows import NEW_TASK, WRITTEN, task_values

# The delivery's values in a statement that also writes the task back, whose status
# and stop_reason are other values under the same names.
_DELIVERY_PREFIX = "delivery_"
# (runs written, owners changed, runs trimmed, events emitted): each statement comes in
# one variant per combination, holding only the parts it needs.
Variant = tuple[bool, bool, bool, bool]


def pg_values(
    task: TaskState,
    change: Change,
    delivery: dict[str, Any],
    details: Details | None,
    emitted: list[Emitted],
) -> dict[str, Any]:
    """The parameters of PG_RECORD_AND_WRITE_BACK, PG_GUARDED_WRITE and PG_CREATE_TASK."""
    values = {_DELIVERY_PREFIX + name: value for name, value in delivery.items()}
    values.update(task_values(task, change))
    values.update(outbox_values(emitted, delivery["received_at"]))
    values.update(
        new_details=details is not None,
        input=None if details is None else pg_json(details[0]),
        outputs=None if details is None else pg_json(details[1]),
        runs_json=json.dumps(
            [[n, _iso(r.started_at), _iso(r.ended_at), r.stop_reason] for n, r in change.runs]
        ),
    )
    return values


def pg_json(value: Any) -> Json | None:
    return None if value is None else Json(value)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --- statements, built once ---------------------------------------------------------


def _insert_columns(names: tuple[str, ...], prefix: str) -> str:
    """(columns) VALUES (placeholders), each placeholder the column's name after `prefix`."""
    placeholders = ", ".join(f"%({prefix}{name})s" for name in names)
    return f"({', '.join(names)}) VALUES ({placeholders})"


def _set_clause(names: tuple[str, ...]) -> str:
    return ", ".join(f"{name} = %({name})s" for name in names)


_NEW_TASK_SQL = ", ".join(
    f"'{value}'" if isinstance(value, str) else str(value).lower() for value in NEW_TASK.values()
)

# Step 1: create or lock the task, then claim the nonce. An existing task is locked by
# SELECT … FOR UPDATE, which writes no new row version: an ON CONFLICT DO UPDATE would,
# with an entry in each of the task's indexes, only for the write-back to replace it.
# The nonce is claimed from the task's row, so the task is always locked first. A task
# that another transaction created and committed while this statement waited on its
# INSERT is in neither branch (it is newer than the statement's snapshot): the row then
# comes back with a NULL id and no nonce claimed, and PG_LOCK_AND_CLAIM, a statement
# of its own, does both.
_TASK_COLUMNS = ", ".join("t." + name for name in STATE_FIELDS)


def _claim_nonce_cte(source: str, *, or_fail: bool = False) -> str:
    """CTE `n`: the nonce claimed once for each row of `source`, so that the task is
    always locked first; a row if it was free. With `or_fail`, a plain INSERT: a nonce
    seen before fails the whole statement instead."""
    on_conflict = "" if or_fail else "ON CONFLICT DO NOTHING"
    return f"""n AS (
        INSERT INTO callback_nonces (zego_timestamp, nonce, body_sha256, seen_at)
        SELECT %(zego_timestamp)s::bigint, %(nonce)s::varchar, %(body_sha256)s::varchar,
            %(seen_at)s::timestamp
        FROM {source}
        {on_conflict}
        RETURNING 1
    )"""  # noqa: S608 - a CTE's name, values bound


PG_CLAIM_AND_LOCK = f"""
    WITH created AS (
        INSERT INTO tasks AS t (
            app_id, task_id, {", ".join(NEW_TASK)}, first_seen_at, updated_at
        )
        VALUES (%(app_id)s, %(task_id)s, {_NEW_TASK_SQL}, %(now)s, %(now)s)
        ON CONFLICT (app_id, task_id) DO NOTHING
        RETURNING {_TASK_COLUMNS}
    ), locked AS (
        SELECT {_TASK_COLUMNS} FROM tasks AS t
        WHERE t.app_id = %(app_id)s AND t.task_id = %(task_id)s
        FOR UPDATE OF t
    ), task AS (
        SELECT * FROM created UNION ALL SELECT * FROM locked
    ), {_claim_nonce_cte("task")}
    SELECT task.*, (SELECT count(*) FROM n) AS claimed
    FROM (SELECT) AS one LEFT JOIN task ON true
"""  # noqa: S608 - column names from the model, values bound
PG_LOCK_AND_CLAIM = f"""
    WITH task AS (
        SELECT {_TASK_COLUMNS} FROM tasks AS t
        WHERE t.app_id = %(app_id)s AND t.task_id = %(task_id)s
        FOR UPDATE OF t
    ), {_claim_nonce_cte("task")}
    SELECT task.*, (SELECT count(*) FROM n) AS claimed FROM task
"""  # noqa: S608 - column names from the model, values bound

# Step 2: record the delivery under its event key and, only if the key was free, write
# the task back and its changed runs (a JSON list of [run_no, started_at, ended_at,
# stop_reason]); where the owner changed, the other runs take it too, and after a
# whole fold the runs beyond its count go. If another delivery holds the key, this one
# is a resend: it is recorded as a duplicate, and the task only notes its arrival.
# The CTEs never touch one row twice: the owner's update skips the runs written here,
# the trim those above the count, and the task is written or touched, never both.
# Returns (the delivery's id, None), or (None, the duplicate's id).
_DUPLICATE = {"event_key": "NULL", "verdict": "'duplicate'", "reason": "'same_event'"}
_DUPLICATE_VALUES = ", ".join(
    _DUPLICATE.get(name, f"%({_DELIVERY_PREFIX}{name})s") for name in DELIVERY_COLUMNS
)


def variant(change: Change, emitted: list[Emitted]) -> Variant:
    """Which of a statement's variants writes this change and its events."""
    return (bool(change.runs), change.owner_changed, change.full, bool(emitted))


def _pg_record_and_write_back(runs: bool, owners: bool, trim: bool, events: bool) -> str:
    """The statement, with only the parts a change needs: PostgreSQL runs every part of
    a statement, even those whose condition is false."""
    parts = [
        f"""d AS (
        INSERT INTO deliveries {_insert_columns(DELIVERY_COLUMNS, _DELIVERY_PREFIX)}
        ON CONFLICT (event_key) DO NOTHING
        RETURNING id
    )""",
        f"""written AS (
        UPDATE tasks SET {_TASK_SET}
        WHERE id = %(task_pk)s AND EXISTS (SELECT FROM d)
    )""",  # noqa: S608 - column names from the model, values bound
        *_run_parts(runs, owners, trim),
        *(pg_outbox_parts("%(task_pk)s::integer", "EXISTS (SELECT FROM d)") if events else []),
        f"""dup AS (
        INSERT INTO deliveries ({", ".join(DELIVERY_COLUMNS)})
        SELECT {_DUPLICATE_VALUES} WHERE NOT EXISTS (SELECT FROM d)
        RETURNING id
    ), touched AS (
        UPDATE tasks SET last_delivery_at = %(last_delivery_at)s
        WHERE id = %(task_pk)s AND NOT EXISTS (SELECT FROM d)
    )""",  # noqa: S608 - column names from the model, values bound
    ]
    return f"WITH {', '.join(parts)} SELECT (SELECT id FROM d), (SELECT id FROM dup)"  # noqa: S608


def _pg_guarded_write(runs: bool, owners: bool, trim: bool, events: bool) -> str:
    """apply_optimistically's one statement: write the task back only if it is still the
    row version the rules read, then claim the nonce and record the delivery, with
    plain INSERTs that fail the statement (undoing it) on a nonce seen or an event key
    taken. No row: the task changed meanwhile, and nothing was written."""
    parts = [
        f"""u AS (
        UPDATE tasks SET {_TASK_SET}
        WHERE id = %(task_pk)s AND xmin = %(row_version)s::text::xid
        RETURNING id
    ), {_claim_nonce_cte("u", or_fail=True)}, d AS (
        INSERT INTO deliveries ({", ".join(DELIVERY_COLUMNS)})
        SELECT {", ".join(f"%({_DELIVERY_PREFIX}{name})s" for name in DELIVERY_COLUMNS)}
        FROM n
        RETURNING id
    )""",  # noqa: S608 - column names from the model, values bound
        *_run_parts(runs, owners, trim),
        *(pg_outbox_parts("%(task_pk)s::integer", "EXISTS (SELECT FROM d)") if events else []),
    ]
    return f"WITH {', '.join(parts)} SELECT id FROM d"  # noqa: S608


def _run_parts(runs: bool, owners: bool, trim: bool) -> list[str]:
    """The CTEs that write a change's runs, once the delivery `d` is recorded."""
    parts = []
    if runs:
        parts.append("""changed AS (
        SELECT (r->>0)::integer AS run_no, (r->>1)::timestamp AS started_at,
            (r->>2)::timestamp AS ended_at, (r->>3)::smallint AS stop_reason
        FROM json_array_elements(%(runs_json)s::json) AS r
    ), run AS (
        INSERT INTO task_runs (task_pk, run_no, owner, started_at, ended_at, stop_reason)
        SELECT %(task_pk)s::integer, run_no, %(owner)s::varchar, started_at, ended_at,
            stop_reason
        FROM changed WHERE EXISTS (SELECT FROM d)
        ON CONFLICT (task_pk, run_no) DO UPDATE SET owner = EXCLUDED.owner,
            started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
            stop_reason = EXCLUDED.stop_reason
    )""")
    if owners:
        written_runs = "AND run_no NOT IN (SELECT run_no FROM changed)" if runs else ""
        parts.append(f"""owners AS (
        UPDATE task_runs SET owner = %(owner)s::varchar
        WHERE task_pk = %(task_pk)s AND EXISTS (SELECT FROM d) {written_runs}
    )""")  # noqa: S608 - fixed text, values bound
    if trim:
        parts.append("""trimmed AS (
        DELETE FROM task_runs
        WHERE task_pk = %(task_pk)s AND run_no > %(runs)s AND EXISTS (SELECT FROM d)
    )""")
    return parts


_TASK_SET = f"""{_set_clause(WRITTEN)},
            input = CASE WHEN %(new_details)s THEN %(input)s::json ELSE input END,
            outputs = CASE WHEN %(new_details)s THEN %(outputs)s::json ELSE outputs END"""
_VARIANTS = list(itertools.product((False, True), repeat=4))
PG_GUARDED_WRITE = {variant: _pg_guarded_write(*variant) for variant in _VARIANTS}
PG_READ_TASK = f"""
    SELECT {_TASK_COLUMNS}, t.xmin::text FROM tasks AS t
    WHERE t.app_id = %(app_id)s AND t.task_id = %(task_id)s
"""  # noqa: S608 - column names from the model, values bound

# One constant string per variant, so that each keeps its cursor and prepared statement.
PG_RECORD_AND_WRITE_BACK = {variant: _pg_record_and_write_back(*variant) for variant in _VARIANTS}

# A new task's first TranscodeStarted, in one statement (create_task). Plain INSERTs:
# a task, nonce or event key already there fails the statement on its unique key.
_CREATE_TASK_HEAD = f"""
    WITH t AS (
        INSERT INTO tasks (app_id, task_id, first_seen_at, input, outputs, {", ".join(WRITTEN)})
        VALUES (%(app_id)s, %(task_id)s, %(first_seen_at)s, %(input)s::json, %(outputs)s::json,
            {", ".join(f"%({name})s" for name in WRITTEN)})
        RETURNING id
    ), {_claim_nonce_cte("t", or_fail=True)}, d AS (
        INSERT INTO deliveries ({", ".join(DELIVERY_COLUMNS)})
        SELECT {
    ", ".join(
        "t.id" if name == "task_pk" else f"%({_DELIVERY_PREFIX}{name})s"
        for name in DELIVERY_COLUMNS
    )
}
        FROM t, n
        RETURNING id
    ), run AS (
        INSERT INTO task_runs (task_pk, run_no, owner, started_at)
        SELECT t.id, 1, %(owner)s::varchar, %(started_at)s::timestamp FROM t, d
    )"""  # noqa: S608 - column names from the model, values bound
# A task's first start always emits its task.started.
_CREATE_TASK_PARTS = [
    _CREATE_TASK_HEAD,
    *pg_outbox_parts("(SELECT id FROM t)", "EXISTS (SELECT FROM d)"),
]
PG_CREATE_TASK = f"{', '.join(_CREATE_TASK_PARTS)} SELECT t.id, d.id FROM t, d"  # noqa: S608
