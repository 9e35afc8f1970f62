"""What /metrics reads from the database at scrape time: the state of the stop queue and
the stuck tasks, the same from every app process, wherever the workers run."""

from __future__ import annotations

from sqlalchemy.orm import Session

from manager.clock import utcnow
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
    ]
