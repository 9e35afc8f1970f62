"""ORM models: tasks, every callback delivery, the nonce ledger and API tokens."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from manager.db import Base
from manager.vocabulary import (
    EventType,
    SendState,
    StopState,
    TaskStatus,
    Verdict,
    WaitReason,
    values,
)
from manager.zego.client import Outcome

TASK_STATUSES = values(TaskStatus)
STOP_STATES = values(StopState)
WAIT_REASONS = values(WaitReason)
ATTEMPT_OUTCOMES = values(Outcome)
VERDICTS = values(Verdict)
EVENT_TYPES = values(EventType)
SEND_STATES = values(SendState)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Task(Base):
    """The current state of one transcoding task: what its events make it.

    Times are naive UTC. The columns are the result of the fold of the task's events
    (manager/callbacks/rules.py): (state_seq, state_rank) is the highest position of
    its events, owner_* and details_* are max-registers, started_at and ended_at are
    those of its last run; task_runs holds every run. Once its old events are pruned
    (pruned_histories), the fold starts from its last run as it was then.
    """

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("app_id", "task_id"),
        CheckConstraint(_in("status", TASK_STATUSES), name="status"),
        # The id is included (PostgreSQL; SQLite's indexes carry it anyway), so the
        # running tasks' ids come from the index alone.
        Index("ix_tasks_status_updated_at", "status", "updated_at", postgresql_include=["id"]),
        Index("ix_tasks_owner", "owner"),
        # Covers summary's task counts: one index-only range per status.
        Index(
            "ix_tasks_status_last_delivery_at_updated_at_first_seen_at",
            "status",
            "last_delivery_at",
            "updated_at",
            "first_seen_at",
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    app_id: Mapped[int] = mapped_column(BigInteger)
    task_id: Mapped[str] = mapped_column(String(256))
    owner: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    stop_reason: Mapped[int | None] = mapped_column(SmallInteger)

    state_seq: Mapped[int] = mapped_column(BigInteger)
    state_rank: Mapped[int] = mapped_column(SmallInteger)
    max_seq: Mapped[int] = mapped_column(BigInteger)
    owner_seq: Mapped[int | None] = mapped_column(BigInteger)
    owner_rank: Mapped[int | None] = mapped_column(SmallInteger)
    details_seq: Mapped[int | None] = mapped_column(BigInteger)
    details_rank: Mapped[int | None] = mapped_column(SmallInteger)
    input: Mapped[Any | None] = mapped_column(JSON)
    outputs: Mapped[Any | None] = mapped_column(JSON)

    runs: Mapped[int] = mapped_column(Integer, default=0)
    # The latest Timestamp of its StopReason 1 stops, which are placed by Timestamp: a
    # start no later than it may move one to the run it begins, so it refolds.
    last_failure_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The current run was begun by a TranscodeStarted (else an update or a stop showed it).
    run_start_seen: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)

    first_seen_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    last_delivery_at: Mapped[datetime | None] = mapped_column(DateTime)
    # The version of its latest outbound event (manager/callbacks/outbound.py): one more
    # for each event its changes emitted, so it only grows.
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class Delivery(Base):
    """One request that reached the callback endpoint, with its verdict.

    Past the retention (manager/callbacks/retention.py) its raw body is dropped
    (raw_body NULL; the parsed columns stay), and then, where nothing needs it any
    more, the row.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
        # The first delivery of an (Event, TaskId, Sequence, Status, StopReason) holds
        # the key; a resend cannot insert it again and is recorded as a duplicate.
        UniqueConstraint("event_key"),
        Index("ix_deliveries_task_pk_id", "task_pk", "id"),
        Index("ix_deliveries_verdict_received_at", "verdict", "received_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    verdict: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    event_key: Mapped[str | None] = mapped_column(String(64))
    task_pk: Mapped[int | None] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), nullable=True
    )

    app_id: Mapped[int | None] = mapped_column(BigInteger)
    event: Mapped[str | None] = mapped_column(String(32))
    task_id: Mapped[str | None] = mapped_column(String(256))
    user_id: Mapped[str | None] = mapped_column(String(256))
    sequence: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str | None] = mapped_column(String(32))
    stop_reason: Mapped[int | None] = mapped_column(SmallInteger)
    zego_timestamp: Mapped[int | None] = mapped_column(BigInteger)
    nonce: Mapped[str | None] = mapped_column(String(128))

    remote_addr: Mapped[str | None] = mapped_column(String(64))
    body_size: Mapped[int] = mapped_column(Integer)
    raw_body: Mapped[bytes | None] = mapped_column(LargeBinary)  # None: pruned


class PrunedHistory(Base):
    """A task whose deliveries received before `events_before` were deleted
    (manager/callbacks/retention.py): its runs 1..runs are what they made, and run
    `runs` (whose start was seen or not: start_seen) stands in for them in the fold."""

    __tablename__ = "pruned_histories"

    task_pk: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    runs: Mapped[int] = mapped_column(Integer)
    start_seen: Mapped[bool] = mapped_column(Boolean)
    events_before: Mapped[datetime] = mapped_column(DateTime)


class DeliveryHour(Base):
    """Deliveries received in one UTC hour, by verdict: summary's counts of a long window.

    Written only for hours that can no longer change (see manager/rollups.py), in one
    unbroken run of hours from the first delivery's.
    """

    __tablename__ = "delivery_hours"

    hour: Mapped[datetime] = mapped_column(DateTime, primary_key=True)
    applied: Mapped[int] = mapped_column(BigInteger)
    duplicate: Mapped[int] = mapped_column(BigInteger)
    stale: Mapped[int] = mapped_column(BigInteger)
    rejected: Mapped[int] = mapped_column(BigInteger)


class RunDay(Base):
    """One UTC day of the runs, as `daily` reports it: daily's figures for a long window.

    Written only for days that can no longer change (see manager/rollups.py), in one
    unbroken run of days from the first run's. Runs ended that day: stopped + failed +
    ended_unseen (ended without a stop callback).
    """

    __tablename__ = "run_days"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    started: Mapped[int] = mapped_column(BigInteger)
    stopped: Mapped[int] = mapped_column(BigInteger)
    failed: Mapped[int] = mapped_column(BigInteger)
    ended_unseen: Mapped[int] = mapped_column(BigInteger)
    busy_us: Mapped[int] = mapped_column(BigInteger)


class CallbackNonce(Base):
    """(Timestamp, Nonce) pairs seen inside the freshness window, with the body they signed."""

    __tablename__ = "callback_nonces"

    zego_timestamp: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    # Not indexed: nothing looks nonces up by it, and each index costs every callback a
    # write. Dropping old pairs would go by zego_timestamp, which the key leads with.
    seen_at: Mapped[datetime] = mapped_column(DateTime)


class ApiToken(Base):
    """An operator bearer token; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"
    __table_args__ = (UniqueConstraint("name"), UniqueConstraint("token_hash"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime)


class StopBatch(Base):
    """A bulk stop: which tasks were chosen, by whom and why."""

    __tablename__ = "stop_batches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    requested_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(String(500))
    selector: Mapped[Any] = mapped_column(JSON)
    total: Mapped[int] = mapped_column(Integer)


class StopRequest(Base):
    """An operator's request to stop a task: stored before it is sent, kept forever.

    `sequence` is the Sequence of the latest attempt; every attempt takes a new one
    from the task, so ZEGOCLOUD always sees increasing values. A request is worked
    on only under a lease (`claimed_until`), so two processes never send it at once.
    """

    __tablename__ = "stop_requests"
    __table_args__ = (
        CheckConstraint(_in("state", STOP_STATES), name="state"),
        CheckConstraint(_in("wait_reason", WAIT_REASONS), name="wait_reason"),
        # At most one queued request per task: a second stop returns the first.
        Index(
            "uq_stop_requests_queued_task",
            "task_pk",
            unique=True,
            sqlite_where=text("state = 'queued'"),
            postgresql_where=text("state = 'queued'"),
        ),
        Index("ix_stop_requests_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_stop_requests_task_pk", "task_pk"),
        Index("ix_stop_requests_batch_id", "batch_id"),
        Index("ix_stop_requests_created_at_state", "created_at", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("stop_batches.id", ondelete="SET NULL"))
    state: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str] = mapped_column(String(256))
    sequence: Mapped[int | None] = mapped_column(BigInteger)
    requested_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(String(500))
    force: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    last_code: Mapped[int | None] = mapped_column(BigInteger)
    last_message: Mapped[str | None] = mapped_column(String(500))
    last_request_id: Mapped[str | None] = mapped_column(String(128))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Why a queued request has not gone out yet, when it is for a reason an operator
    # may need to fix (WAIT_REASONS); None while it simply waits its turn.
    wait_reason: Mapped[str | None] = mapped_column(String(32))


class StopAttempt(Base):
    """One call of StopCloudTranscode and what ZEGOCLOUD answered."""

    __tablename__ = "stop_attempts"
    __table_args__ = (
        CheckConstraint(_in("outcome", ATTEMPT_OUTCOMES), name="outcome"),
        Index("ix_stop_attempts_stop_request_id", "stop_request_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    stop_request_id: Mapped[int] = mapped_column(ForeignKey("stop_requests.id", ondelete="CASCADE"))
    attempted_at: Mapped[datetime] = mapped_column(DateTime)
    sequence: Mapped[int] = mapped_column(BigInteger)
    outcome: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int | None] = mapped_column(Integer)
    code: Mapped[int | None] = mapped_column(BigInteger)
    message: Mapped[str | None] = mapped_column(String(500))
    request_id: Mapped[str | None] = mapped_column(String(128))
    elapsed_ms: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(64))


class RateUnit(Base):
    """A unit of the shared rate limit: leased by one process at a time (ratelimit.py).

    Times are Unix seconds on the database's clock: `lease_until` ends the holder's
    lease, `free_at` is when another holder's first call may go.
    """

    __tablename__ = "rate_units"

    limiter: Mapped[str] = mapped_column(String(64), primary_key=True)
    unit: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    calls: Mapped[int] = mapped_column(Integer)
    holder: Mapped[str | None] = mapped_column(String(32))
    lease_until: Mapped[float | None] = mapped_column(Float(precision=53))
    free_at: Mapped[float] = mapped_column(Float(precision=53))


class TaskRun(Base):
    """One run of a task, from its start to its stop: the history behind the reports.

    A task's row holds only its current run; every run, current one included, is here.
    Times are ZEGOCLOUD's Timestamps (naive UTC); a run whose start never arrived has
    no started_at, one still going has no ended_at.
    """

    __tablename__ = "task_runs"
    __table_args__ = (
        UniqueConstraint("task_pk", "run_no"),
        Index("ix_task_runs_started_at", "started_at"),
        Index(
            "ix_task_runs_ended_at_stop_reason_started_at", "ended_at", "stop_reason", "started_at"
        ),
        # Covers owners: runs in (owner, task) order, so both groupings need no sort.
        Index(
            "ix_task_runs_owner_task_pk_started_at_ended_at_stop_reason",
            "owner",
            "task_pk",
            "started_at",
            "ended_at",
            "stop_reason",
        ),
        # PostgreSQL only: run lengths in order, so summary's percentiles walk the index
        # to a rank instead of sorting every run. The included columns let the walk
        # compute the length and test the window without reading the table.
        Index(
            "ix_task_runs_span",
            text("(ended_at - started_at)"),
            postgresql_include=["started_at", "ended_at", "owner"],
        ).ddl_if(dialect="postgresql"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    run_no: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str | None] = mapped_column(String(256))
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime)
    stop_reason: Mapped[int | None] = mapped_column(SmallInteger)


class Subscription(Base):
    """A receiver of the tasks' outbound events (manager/events/).

    Its signing secret is kept encrypted (Fernet, under SUBSCRIPTION_KEY): it must sign,
    so it cannot be hashed. `event_types` is None for every type, else the types between
    commas (",task.stopped,run.ended,"), so that one LIKE matches on any backend.
    """

    __tablename__ = "subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[str | None] = mapped_column(String(512))
    owner: Mapped[str | None] = mapped_column(String(256))
    secret_encrypted: Mapped[str] = mapped_column(String(512))
    # After a rotation the old secret signs too, until then, so receivers can switch.
    previous_secret_encrypted: Mapped[str | None] = mapped_column(String(512))
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime)
    description: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime)
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    # Since when every attempt has failed (None after a success): 3 days disable it.
    failing_since: Mapped[datetime | None] = mapped_column(DateTime)
    last_success_at: Mapped[datetime | None] = mapped_column(DateTime)


class Event(Base):
    """One outbound event: a task's change, its type, and the exact body sent.

    Written in the transaction that changes the task, and only when some subscription
    takes it. `version` is the task's version after it (tasks.version).
    """

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(_in("type", EVENT_TYPES), name="type"),
        UniqueConstraint("task_pk", "version"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    task_pk: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class EventSend(Base):
    """One event for one subscription: the outbox row the worker sends from.

    A pending row is sent once no earlier version of its task is pending for its
    subscription (the head of the line), under a lease (`claimed_until`).
    """

    __tablename__ = "event_sends"
    __table_args__ = (
        CheckConstraint(_in("state", SEND_STATES), name="state"),
        UniqueConstraint("subscription_id", "event_id"),
        # What is due, and the head of each (subscription, task) line: pending rows only.
        # With the id, so that a claim follows the index through equal times too (a
        # replay makes thousands due at the same moment) instead of sorting them all.
        Index(
            "ix_event_sends_pending_due",
            "next_attempt_at",
            "id",
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
        Index(
            "ix_event_sends_pending_line",
            "subscription_id",
            "task_pk",
            "version",
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
        Index("ix_event_sends_event_id", "event_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("subscriptions.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("events.id", ondelete="CASCADE")
    )
    task_pk: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime)
    # When an operator last asked for it to be sent again (a replay).
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime)


class EventAttempt(Base):
    """One POST of an event to a subscription, and what came back: the delivery log."""

    __tablename__ = "event_attempts"
    __table_args__ = (Index("ix_event_attempts_send_id", "send_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    send_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("event_sends.id", ondelete="CASCADE"),
    )
    attempted_at: Mapped[datetime] = mapped_column(DateTime)
    # The HTTP status, or None with `error` when no answer came.
    status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(256))
    answer: Mapped[str | None] = mapped_column(String(512))  # the answer's first bytes
    elapsed_ms: Mapped[int] = mapped_column(Integer)
