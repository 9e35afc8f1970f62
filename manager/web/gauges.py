"""What /metrics reads from the database at scrape time: the state of the stop queue, the
stuck tasks and the outbound events' outbox, the same from every app process, wherever
the workers run."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.events.health import Outbox, outbox_state
from manager.metrics import DatabaseGauge
from manager.reports.stuck import stuck_counts
from manager.stops.requests import queue_state
from manager.vocabulary import WaitReason


def database_gauges(session: Session) -> list[DatabaseGauge]:
    now = utcnow()
    queue = queue_state(session, now)
    stuck = stuck_counts(session, now)
    return [
        DatabaseGauge(
            "manager_stop_requests_queued",
            "Queued stop requests, by wait_reason (none: waiting their turn or their retry)",
            {(reason or "none",): queue.waiting.get(reason, 0) for reason in (None, *WaitReason)},
            ("wait_reason",),
        ),
        DatabaseGauge(
            "manager_stop_requests_in_flight",
            "Queued stop requests a process has claimed to send now",
            {(): queue.in_flight},
        ),
        DatabaseGauge(
            "manager_stop_oldest_queued_seconds",
            "Age of the oldest queued stop request (0 when none waits)",
            {(): queue.oldest_age},
        ),
        DatabaseGauge(
            "manager_tasks_stuck",
            "Tasks stuck, by reason: no_stop_callback (stopping past the grace) or"
            " no_delivery (running and silent for a day), as the stuck report counts them",
            {(reason,): count for reason, count in stuck.items()},
            ("reason",),
        ),
        *event_gauges(outbox_state(session.connection()), now),
    ]


def event_gauges(outbox: Outbox, now: datetime) -> list[DatabaseGauge]:
    """The outbox's gauges: a backlog that grows or ages means no worker sends, or a
    receiver refuses; failing subscriptions are disabled after the retry window."""
    return [
        DatabaseGauge(
            "manager_events_pending",
            "Outbound event sends pending: to be sent, or sent again after a failed attempt",
            {(): outbox.pending},
        ),
        DatabaseGauge(
            "manager_events_oldest_pending_seconds",
            "Age of the oldest pending outbound event send (0 when none waits)",
            {(): _age(outbox.oldest_pending_at, now)},
        ),
        DatabaseGauge(
            "manager_subscriptions",
            "Subscriptions by state: enabled, disabled, and failing (enabled, with every"
            " attempt failing since a time; counted among enabled too)",
            {
                ("enabled",): outbox.enabled,
                ("disabled",): outbox.disabled,
                ("failing",): outbox.failing,
            },
            ("state",),
        ),
    ]


def _age(since: datetime | None, now: datetime) -> float:
    """Seconds from `since` to `now`: 0 when there is nothing, or its clock ran ahead."""
    return 0.0 if since is None else max(0.0, (now - since).total_seconds())
