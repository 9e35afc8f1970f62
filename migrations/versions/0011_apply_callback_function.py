"""PostgreSQL: manager_apply_callback(), a verified callback applied in one call.

The ordering rules of manager/lifecycle.py (apply_to_task and the helpers below it),
run where the task's row is, so that a callback takes one round trip whatever the
state of its task: the function locks or creates the task, claims the nonce, records
the delivery under its event key, and writes the task and its run back. Python keeps
the rules for SQLite and for the locked path; tests/test_pg_function.py holds the two
to the same results.

What the function does not settle it refuses with SQLSTATE MGR01 ("leave it to the
locked path"), which rolls the whole call back: a (Timestamp, Nonce) already seen
(retransmission or forgery, told apart by the body's digest), or a task created here
whose event key is taken.

A later change to the rules or to these tables' columns replaces the function in a
migration of its own, beside the change to lifecycle.py.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-25 16:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Positions are (Sequence, rank), compared as rows, as Python compares its tuples:
# rank 2 TranscodeStarted, 4 TranscodeUpdated, 6 a stop; -1 is below every Sequence.
APPLY_CALLBACK = """
CREATE FUNCTION manager_apply_callback(
    p_app_id bigint, p_task_id varchar, p_event varchar, p_user_id varchar,
    p_sequence bigint, p_status varchar, p_stop_reason smallint,
    p_zego_timestamp bigint, p_nonce varchar, p_body_sha256 varchar,
    p_event_key varchar, p_rank smallint, p_is_stop boolean, p_at timestamp,
    p_input json, p_outputs json, p_received_at timestamp, p_remote_addr varchar,
    p_body_size integer, p_raw_body bytea,
    OUT o_verdict varchar, OUT o_reason varchar, OUT o_task_pk integer,
    OUT o_delivery_id bigint
)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    t tasks%ROWTYPE;
    is_new boolean;
    applied boolean;
    started boolean := NOT p_is_stop AND p_status IS NOT DISTINCT FROM 'TranscodeStarted';
    fresh boolean;
    cur_seq bigint;
    cur_rank smallint;
    by_sequence boolean;
    by_time boolean;
    ended boolean;
    restart boolean;
    failed_after boolean;
    begun_by_start boolean;
    run_changed boolean;
    attempt integer := 0;
    run_before record;
BEGIN
    LOOP
        attempt := attempt + 1;
        SELECT * INTO t FROM tasks
        WHERE app_id = p_app_id AND task_id = p_task_id FOR UPDATE;
        is_new := NOT FOUND;
        IF is_new THEN
            IF attempt > 2 THEN
                RAISE EXCEPTION 'task vanished' USING ERRCODE = 'MGR01';
            END IF;
            t := NULL;
            t.app_id := p_app_id;
            t.task_id := p_task_id;
            t.status := 'running';
            t.state_seq := -1;
            t.state_rank := 0;
            t.max_seq := -1;
            t.runs := 0;
            t.run_floor_seq := -1;
            t.first_seen_at := p_received_at;
            t.updated_at := p_received_at;
        END IF;
        run_before := ROW(t.runs, t.owner, t.started_at, t.ended_at, t.stop_reason);

        -- apply_to_task
        cur_seq := t.state_seq;
        cur_rank := t.state_rank;
        fresh := t.state_seq = -1 AND t.state_rank = 0;
        t.max_seq := greatest(t.max_seq, p_sequence);
        t.last_delivery_at := p_received_at;
        applied := false;
        IF p_is_stop THEN
            -- _apply_stop
            by_sequence := t.status IN ('running', 'stopping')
                AND t.run_start_seq IS NOT NULL AND p_sequence >= t.run_start_seq;
            by_time := t.status IN ('running', 'stopping')
                AND p_stop_reason IS NOT DISTINCT FROM 1
                AND t.started_at IS NOT NULL AND p_at >= t.started_at;
            IF fresh OR (p_sequence, p_rank) > (cur_seq, cur_rank) OR by_sequence OR by_time THEN
                IF fresh THEN
                    t.runs := 1;
                END IF;
                t.status := CASE WHEN p_stop_reason IS NOT DISTINCT FROM 1
                    THEN 'failed' ELSE 'stopped' END;
                t.stop_reason := p_stop_reason;
                t.ended_at := p_at;
                IF by_time AND NOT by_sequence AND NOT (p_sequence, p_rank) > (cur_seq, cur_rank)
                THEN
                    t.end_seq := greatest(p_sequence, cur_seq);
                ELSE
                    t.end_seq := p_sequence;
                END IF;
                IF (p_sequence, p_rank) > (cur_seq, 6::smallint) THEN
                    t.state_seq := p_sequence;
                    t.state_rank := p_rank;
                ELSE
                    t.state_seq := cur_seq;
                    t.state_rank := 6;
                END IF;
                applied := true;
            END IF;
        ELSE
            -- _remember_details
            IF t.owner_seq IS NULL OR t.owner_rank IS NULL
                OR (p_sequence, p_rank) > (t.owner_seq, t.owner_rank)
            THEN
                t.owner_seq := p_sequence;
                t.owner_rank := p_rank;
                t.owner := p_user_id;
            END IF;
            IF (p_input IS NOT NULL OR p_outputs IS NOT NULL) AND (
                t.details_seq IS NULL OR t.details_rank IS NULL
                OR (p_sequence, p_rank) > (t.details_seq, t.details_rank)
            ) THEN
                t.details_seq := p_sequence;
                t.details_rank := p_rank;
                t.input := p_input;
                t.outputs := p_outputs;
            END IF;
            -- _apply_start
            ended := t.status IN ('stopped', 'failed');
            restart := ended AND started AND t.end_seq IS NOT NULL AND p_sequence > t.end_seq;
            failed_after := t.status = 'failed' AND t.ended_at IS NOT NULL AND p_at <= t.ended_at;
            IF NOT fresh AND ((p_sequence, p_rank) > (cur_seq, cur_rank) OR restart)
                AND failed_after
            THEN
                -- In order, this start would have applied, then the failure on top.
                t.end_seq := greatest(coalesce(t.end_seq, -1), p_sequence);
                IF (p_sequence, 6::smallint) > (cur_seq, cur_rank) THEN
                    t.state_seq := p_sequence;
                    t.state_rank := 6;
                END IF;
            ELSIF fresh OR (p_sequence, p_rank) > (cur_seq, cur_rank) OR restart THEN
                IF fresh OR ended OR started THEN
                    t.runs := t.runs + 1;
                    IF fresh THEN
                        t.run_floor_seq := -1;
                    ELSIF ended AND t.end_seq IS NOT NULL THEN
                        t.run_floor_seq := t.end_seq;
                    ELSE
                        t.run_floor_seq := greatest(t.run_floor_seq, p_sequence - 1);
                    END IF;
                    t.run_start_seq := p_sequence;
                    t.run_start_rank := p_rank;
                    t.started_at := p_at;
                    t.ended_at := NULL;
                    t.stop_reason := NULL;
                    t.end_seq := NULL;
                END IF;
                t.status := 'running';
                IF (p_sequence, p_rank) > (cur_seq, 4::smallint) THEN
                    t.state_seq := p_sequence;
                    t.state_rank := p_rank;
                ELSE
                    t.state_seq := cur_seq;
                    t.state_rank := 4;
                END IF;
                applied := true;
            END IF;
            IF NOT applied THEN
                -- _place_in_run: a late start still tells when the current run began.
                IF p_sequence > t.run_floor_seq
                    AND NOT (t.status IN ('stopped', 'failed') AND t.end_seq IS NOT NULL
                        AND p_sequence > t.end_seq)
                THEN
                    begun_by_start := t.run_start_seq IS NOT NULL
                        AND t.run_start_rank IS NOT NULL AND t.run_start_rank = 2;
                    IF started AND (t.run_start_seq IS NULL OR t.run_start_rank IS NULL
                        OR (p_sequence, p_rank) > (t.run_start_seq, t.run_start_rank))
                    THEN
                        IF begun_by_start THEN
                            t.runs := t.runs + 1;
                        END IF;
                        t.run_start_seq := p_sequence;
                        t.run_start_rank := p_rank;
                        t.started_at := p_at;
                    ELSIF t.run_start_seq IS NULL OR t.run_start_rank IS NULL OR NOT (
                        begun_by_start
                        OR (p_sequence, p_rank) >= (t.run_start_seq, t.run_start_rank)
                    ) THEN
                        t.run_start_seq := p_sequence;
                        t.run_start_rank := p_rank;
                        t.started_at := p_at;
                    END IF;
                END IF;
            END IF;
        END IF;
        IF applied THEN
            t.updated_at := p_received_at;
            o_verdict := 'applied';
            o_reason := NULL;
        ELSE
            o_verdict := 'stale';
            o_reason := 'older_than_state';
        END IF;

        IF NOT is_new THEN
            EXIT;
        END IF;
        -- A new task is written once, in its state after this delivery. Created by
        -- another transaction meanwhile: lock it and apply the rules to it instead.
        INSERT INTO tasks (
            app_id, task_id, owner, status, stop_reason, state_seq, state_rank, max_seq,
            owner_seq, owner_rank, details_seq, details_rank, input, outputs, runs,
            run_floor_seq, run_start_seq, run_start_rank, end_seq, started_at, ended_at,
            first_seen_at, updated_at, last_delivery_at
        ) VALUES (
            t.app_id, t.task_id, t.owner, t.status, t.stop_reason, t.state_seq,
            t.state_rank, t.max_seq, t.owner_seq, t.owner_rank, t.details_seq,
            t.details_rank, t.input, t.outputs, t.runs, t.run_floor_seq, t.run_start_seq,
            t.run_start_rank, t.end_seq, t.started_at, t.ended_at, t.first_seen_at,
            t.updated_at, t.last_delivery_at
        )
        ON CONFLICT (app_id, task_id) DO NOTHING
        RETURNING id INTO t.id;
        EXIT WHEN FOUND;
    END LOOP;
    o_task_pk := t.id;

    -- Locks in the locked path's order: the task (above), the nonce, the event key.
    INSERT INTO callback_nonces (zego_timestamp, nonce, body_sha256, seen_at)
    VALUES (p_zego_timestamp, p_nonce, p_body_sha256, p_received_at)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'nonce seen' USING ERRCODE = 'MGR01';
    END IF;

    INSERT INTO deliveries (
        received_at, verdict, reason, event_key, task_pk, app_id, event, task_id,
        user_id, sequence, status, stop_reason, zego_timestamp, nonce, remote_addr,
        body_size, raw_body
    ) VALUES (
        p_received_at, o_verdict, o_reason, p_event_key, t.id, p_app_id, p_event, p_task_id,
        p_user_id, p_sequence, p_status, p_stop_reason, p_zego_timestamp, p_nonce,
        p_remote_addr, p_body_size, p_raw_body
    )
    ON CONFLICT (event_key) DO NOTHING
    RETURNING id INTO o_delivery_id;
    IF NOT FOUND THEN
        IF is_new THEN
            RAISE EXCEPTION 'event key taken' USING ERRCODE = 'MGR01';
        END IF;
        -- A resend under a new nonce: the task keeps its state, but for the time.
        o_verdict := 'duplicate';
        o_reason := 'same_event';
        INSERT INTO deliveries (
            received_at, verdict, reason, event_key, task_pk, app_id, event, task_id,
            user_id, sequence, status, stop_reason, zego_timestamp, nonce, remote_addr,
            body_size, raw_body
        ) VALUES (
            p_received_at, o_verdict, o_reason, NULL, t.id, p_app_id, p_event, p_task_id,
            p_user_id, p_sequence, p_status, p_stop_reason, p_zego_timestamp, p_nonce,
            p_remote_addr, p_body_size, p_raw_body
        )
        RETURNING id INTO o_delivery_id;
        UPDATE tasks SET last_delivery_at = p_received_at WHERE id = t.id;
        RETURN;
    END IF;

    IF NOT is_new THEN
        UPDATE tasks SET
            owner = t.owner, status = t.status, stop_reason = t.stop_reason,
            state_seq = t.state_seq, state_rank = t.state_rank, max_seq = t.max_seq,
            owner_seq = t.owner_seq, owner_rank = t.owner_rank,
            details_seq = t.details_seq, details_rank = t.details_rank,
            input = t.input, outputs = t.outputs, runs = t.runs,
            run_floor_seq = t.run_floor_seq, run_start_seq = t.run_start_seq,
            run_start_rank = t.run_start_rank, end_seq = t.end_seq,
            started_at = t.started_at, ended_at = t.ended_at,
            updated_at = t.updated_at, last_delivery_at = t.last_delivery_at
        WHERE id = t.id;
    END IF;
    -- The current run, where this delivery changed it; a run that a new one follows
    -- without a stop callback ends where the new one starts.
    run_changed := t.runs > 0
        AND ROW(t.runs, t.owner, t.started_at, t.ended_at, t.stop_reason)
            IS DISTINCT FROM run_before;
    IF run_changed THEN
        IF NOT is_new THEN
            UPDATE task_runs SET ended_at = t.started_at
            WHERE task_runs.task_pk = t.id AND run_no < t.runs AND ended_at IS NULL;
        END IF;
        INSERT INTO task_runs AS r (task_pk, run_no, owner, started_at, ended_at, stop_reason)
        VALUES (t.id, t.runs, t.owner, t.started_at, t.ended_at, t.stop_reason)
        ON CONFLICT (task_pk, run_no) DO UPDATE SET owner = EXCLUDED.owner,
            started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
            stop_reason = EXCLUDED.stop_reason;
    END IF;
END
$fn$
"""

SIGNATURE = (
    "manager_apply_callback(bigint, varchar, varchar, varchar, bigint, varchar, smallint,"
    " bigint, varchar, varchar, varchar, smallint, boolean, timestamp, json, json,"
    " timestamp, varchar, integer, bytea)"
)


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(APPLY_CALLBACK)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(f"DROP FUNCTION {SIGNATURE}")
