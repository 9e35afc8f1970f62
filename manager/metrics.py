"""Prometheus metrics; multi-process aware when gunicorn runs several workers."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from manager.models import WAIT_REASONS

DELIVERIES = Counter(
    "manager_callback_deliveries_total",
    "Callback deliveries received, by verdict and reason",
    ["verdict", "reason"],
)
CALLBACK_LATENCY = Histogram(
    "manager_callback_seconds",
    "Time to verify, apply and commit one callback",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
# Most callbacks extend their task's fold from its row; a late one, or one for a task
# with a failure stop placed by time, refolds the task's whole history.
CALLBACK_FOLDS = Counter(
    "manager_callback_folds_total",
    "Applied or stale callbacks by how their task was recomputed: extend (from the task's row)"
    " or refold (from its whole history)",
    ["kind"],
)
_EXTENDED = CALLBACK_FOLDS.labels("extend")
_REFOLDED = CALLBACK_FOLDS.labels("refold")


def count_fold(refolded: bool | None) -> None:
    """Count how a callback's task was recomputed; None for a duplicate (neither)."""
    if refolded is not None:
        (_REFOLDED if refolded else _EXTENDED).inc()


STOP_WAITS = Counter(
    "manager_stop_waits_total",
    "Stop attempts held up for a reason an operator may fix: rate_limit (no share of the"
    " ZEGOCLOUD rate limit in time) or zego_unreachable (no answer from ZEGOCLOUD)",
    ["reason"],
)


def count_stop_wait(reason: str, count: int) -> None:
    STOP_WAITS.labels(reason).inc(count)


# The labelled children, looked up once each: labels() takes a lock and builds a key.
_DELIVERY_COUNTERS: dict[tuple[str, str], Any] = {}


def count_delivery(verdict: str, reason: str | None) -> None:
    key = (verdict, reason or "")
    child = _DELIVERY_COUNTERS.get(key)
    if child is None:
        child = _DELIVERY_COUNTERS.setdefault(key, DELIVERIES.labels(*key))
    child.inc()


class StopQueue(Collector):
    """Queued stop requests by why they wait, read from the database at scrape time: the
    same figure from every app process, wherever the workers run."""

    def __init__(self, waiting: Mapping[str | None, int]) -> None:
        self._waiting = waiting

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "manager_stop_requests_queued",
            "Queued stop requests, by wait_reason (none: waiting their turn or their retry)",
            labels=["wait_reason"],
        )
        for reason in (None, *WAIT_REASONS):
            family.add_metric([reason or "none"], self._waiting.get(reason, 0))
        yield family


def render(stop_queue: Mapping[str | None, int] | None = None) -> tuple[bytes, str]:
    """The exposition text; aggregated over all workers when PROMETHEUS_MULTIPROC_DIR is set.

    `stop_queue` (queued stop requests by wait reason) is added when given."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        body = generate_latest(registry)
    else:
        body = generate_latest()
    if stop_queue is not None:
        queue = CollectorRegistry()
        queue.register(StopQueue(stop_queue))
        body += generate_latest(queue)
    return body, CONTENT_TYPE_LATEST
