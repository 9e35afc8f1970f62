"""Prometheus metrics; multi-process aware when gunicorn runs several workers."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


ZEGO_CALLS = Counter(
    "manager_zego_calls_total",
    "Calls to the ZEGOCLOUD API by action and answer: its Code, http_<status> for an answer"
    " without one, or no_answer when none came",
    ["action", "code"],
)
ZEGO_CALL_SECONDS = Histogram(
    "manager_zego_call_seconds",
    "Time from sending a ZEGOCLOUD API call to its answer (or to giving up on one)",
    ["action"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15),
)
# ZEGOCLOUD's Codes are a short documented list; a far end answering anything at all
# must not grow the series without bound.
MAX_CODE_LABELS = 64
_code_labels: set[str] = set()


def count_zego_call(action: str, code: int | None, http_status: int | None, seconds: float) -> None:
    if code is not None:
        label = str(code)
    elif http_status is not None:
        label = f"http_{http_status}"
    else:
        label = "no_answer"
    if label not in _code_labels:
        if len(_code_labels) >= MAX_CODE_LABELS:
            label = "other"
        _code_labels.add(label)
    ZEGO_CALLS.labels(action, label).inc()
    ZEGO_CALL_SECONDS.labels(action).observe(seconds)


STOP_ATTEMPTS = Counter(
    "manager_stop_attempts_total",
    "Stop attempts recorded, by ZEGOCLOUD's answer: success, retryable, permanent, or no_answer",
    ["outcome"],
)
STOPS_FINISHED = Counter(
    "manager_stop_requests_finished_total",
    "Stop requests that reached their final state through an attempt: succeeded or failed"
    " (given up)",
    ["state"],
)
RESTOPS = Counter(
    "manager_restops_total",
    "Stops queued again for tasks still stopping with no stop callback past the grace",
)
DATABASE_ERRORS = Counter(
    "manager_database_errors_total",
    "Requests answered 503 because the database could not be reached or would not commit,"
    " by the part of the app that answered: callbacks, api, reports, dashboard, ops",
    ["blueprint"],
)


EVENT_ATTEMPTS = Counter(
    "manager_event_attempts_total",
    "Outbound event requests made, by answer: delivered (2xx) or failed (anything else, or"
    " no answer)",
    ["outcome"],
)
EVENT_SECONDS = Histogram(
    "manager_event_attempt_seconds",
    "How long a receiver took to answer an outbound event request",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
EVENT_SENDS_FINISHED = Counter(
    "manager_event_sends_finished_total",
    "Outbound events that reached their final state with a subscription: delivered, or"
    " failed (given up after the retry window)",
    ["state"],
)
SUBSCRIPTIONS_DISABLED = Counter(
    "manager_subscriptions_disabled_total",
    "Subscriptions the worker disabled: failing for the whole retry window, or 410 Gone",
)
_DELIVERED = EVENT_ATTEMPTS.labels("delivered")
_FAILED = EVENT_ATTEMPTS.labels("failed")


def count_event_send(delivered: bool, seconds: float) -> None:
    (_DELIVERED if delivered else _FAILED).inc()
    EVENT_SECONDS.observe(seconds)


def count_event_outcomes(delivered: int, failed: int, disabled: int) -> None:
    """What one batch of recorded answers finished."""
    if delivered:
        EVENT_SENDS_FINISHED.labels("delivered").inc(delivered)
    if failed:
        EVENT_SENDS_FINISHED.labels("failed").inc(failed)
    if disabled:
        SUBSCRIPTIONS_DISABLED.inc(disabled)


PRUNED = Counter(
    "manager_deliveries_pruned_total",
    "What DELIVERY_RETENTION_DAYS pruning removed: raw bodies dropped, deliveries deleted,"
    " task histories folded into their last run, and outbound events deleted",
    ["what"],
)


def count_pruned(bodies: int, deliveries: int, tasks: int, events: int = 0) -> None:
    counts = (("bodies", bodies), ("deliveries", deliveries), ("tasks", tasks), ("events", events))
    for what, count in counts:
        if count:
            PRUNED.labels(what).inc(count)


def count_stop_attempt(outcome: str, state: str) -> None:
    """One recorded attempt: its answer's outcome, and the state it left its request in
    (`queued` when it will be tried again)."""
    STOP_ATTEMPTS.labels(outcome).inc()
    if state != "queued":
        STOPS_FINISHED.labels(state).inc()


def count_restop() -> None:
    RESTOPS.inc()


def count_database_error(route: str) -> None:
    DATABASE_ERRORS.labels(route).inc()


# The labelled children, looked up once each: labels() takes a lock and builds a key.
_DELIVERY_COUNTERS: dict[tuple[str, str], Any] = {}


def count_delivery(verdict: str, reason: str | None) -> None:
    key = (verdict, reason or "")
    child = _DELIVERY_COUNTERS.get(key)
    if child is None:
        child = _DELIVERY_COUNTERS.setdefault(key, DELIVERIES.labels(*key))
    child.inc()


@dataclass(frozen=True)
class DatabaseGauge:
    """A gauge read from the database at scrape time: the same figure from every process,
    wherever the work happens. `values` maps label values (in `labels` order) to a value."""

    name: str
    help: str
    values: Mapping[tuple[str, ...], float]
    labels: tuple[str, ...] = ()


class DatabaseGauges(Collector):
    def __init__(self, gauges: Sequence[DatabaseGauge]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for gauge in self._gauges:
            family = GaugeMetricFamily(gauge.name, gauge.help, labels=list(gauge.labels))
            for label_values, value in gauge.values.items():
                family.add_metric(list(label_values), value)
            yield family


def _process_registry() -> CollectorRegistry:
    """This process's series, summed over every process sharing PROMETHEUS_MULTIPROC_DIR
    when it is set (gunicorn's workers, a worker on the same host)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def serve_metrics(port: int, host: str) -> None:
    """Serve this process's metrics over HTTP from a daemon thread: a worker's own
    /metrics."""
    start_http_server(port, host, _process_registry())


def render(gauges: Sequence[DatabaseGauge] = ()) -> tuple[bytes, str]:
    """The exposition text of this process's series, followed by the `gauges` read from
    the database."""
    body = generate_latest(_process_registry())
    if gauges:
        database = CollectorRegistry()
        database.register(DatabaseGauges(gauges))
        body += generate_latest(database)
    return body, CONTENT_TYPE_LATEST
