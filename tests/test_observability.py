"""What an operator reads: the log lines (JSON and text, with request and task ids) and the
metrics, after known sequences of callbacks and stops through the fake ZEGOCLOUD."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines, logs
from manager.clock import utcnow
from manager.config import Settings
from manager.metrics import count_zego_call, serve_metrics
from manager.models import StopRequest, Task
from manager.zego.fake import Failure
from manager.zego.fake_server import FakeServer

from .conftest import APP_ID, CALLBACK_SECRET, SERVER_SECRET, callback
from .live import free_port
from .stops.test_stops import make_due, start, stop, worker_once

RETRY_CODE = 110200151  # "transcoding task failed, retry"
REFUSED_CODE = 110200003  # a permanent refusal


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The root logger's lines as JSON, in a buffer; the logging set-up restored after."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    buffer = io.StringIO()
    logs.configure("json", stream=buffer)
    yield buffer
    root.handlers[:] = handlers
    root.setLevel(level)


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def scraped(client: FlaskClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- log lines -----------------------------------------------------------------------------


def test_a_json_line_is_one_object_with_the_context() -> None:
    buffer = io.StringIO()
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        logs.configure("json", stream=buffer)
        with logs.bind_request_id("req-1"):
            logging.getLogger("manager.x").warning(
                "a %s line", "warning", extra={"task_id": "t-1", "zego_code": 0}
            )
        logging.getLogger("manager.x").info("outside a request")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    first, second = json_lines(buffer)
    assert first["message"] == "a warning line"
    assert (first["level"], first["logger"]) == ("WARNING", "manager.x")
    assert (first["request_id"], first["task_id"], first["zego_code"]) == ("req-1", "t-1", 0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", first["time"])
    assert "request_id" not in second


def test_the_text_line_shows_the_context_after_the_message() -> None:
    record = logging.LogRecord("manager.x", logging.INFO, __file__, 1, "sent %s", ("it",), None)
    record.task_id, record.attempt = "t-1", 2
    line = logs.TextFormatter().format(record)
    assert line.endswith(" INFO manager.x: sent it [task_id=t-1 attempt=2]")


def test_the_format_is_json_for_a_service_and_text_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.resolve_format(None, service=True, stream=io.StringIO()) == "json"
    assert logs.resolve_format(None, service=True, stream=Terminal()) == "text"
    assert logs.resolve_format(None, service=False, stream=io.StringIO()) == "text"
    assert logs.resolve_format("json", service=True, stream=Terminal()) == "json"


# -- request ids ----------------------------------------------------------------------------


def test_a_request_id_is_taken_or_made_and_echoed(client: FlaskClient) -> None:
    given = client.get("/healthz", headers={"X-Request-Id": "lb-7f3a.1"})
    assert given.headers["X-Request-Id"] == "lb-7f3a.1"
    made = client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["X-Request-Id"])
    for unusable in ("has spaces", "x" * 129, "tab\there", "\u00e9t\u00e9", ""):
        answer = client.get("/api/tasks", headers={"X-Request-Id": unusable})
        assert re.fullmatch(r"[0-9a-f]{32}", answer.headers["X-Request-Id"]), unusable
    callback = client.post("/callbacks/zego", data=b"{", headers={"X-Request-Id": "cb-1"})
    assert (callback.status_code, callback.headers["X-Request-Id"]) == (400, "cb-1")
    assert callback.headers["X-Content-Type-Options"] == "nosniff"


def test_lines_written_while_answering_carry_the_request_id(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, log_lines: io.StringIO
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    answer = client.post("/api/tasks/s-1/stop", headers={**auth, "X-Request-Id": "op-42"})
    assert answer.status_code == 200
    [line] = [x for x in json_lines(log_lines) if x.get("task_id") == "s-1"]
    assert line["request_id"] == "op-42"
    assert line["message"] == "stop accepted by ZEGOCLOUD for task s-1"


# -- the worker's lines and the stop metrics -------------------------------------------------


def test_every_attempt_give_up_and_re_stop_is_a_line_and_a_count(
    app: Flask,
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
    log_lines: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """s-1: refused for now, then accepted, then stuck stopping and stopped again.
    s-2: refused for good."""
    # `manager worker` sets up its own log; here the test's buffer reads it.
    monkeypatch.setattr("manager.cli.stops.configure_logs", lambda *_: None)
    calls = {}
    for code in ("0", str(RETRY_CODE), str(REFUSED_CODE)):
        calls[code] = sample(
            "manager_zego_calls_total", {"action": "StopCloudTranscode", "code": code}
        )
    latency = sample("manager_zego_call_seconds_count", {"action": "StopCloudTranscode"})
    attempts = {o: sample("manager_stop_attempts_total", {"outcome": o}) for o in OUTCOMES}
    finished = {s: sample("manager_stop_requests_finished_total", {"state": s}) for s in STATES}
    restops = sample("manager_restops_total")

    for task_id in ("s-1", "s-2"):
        start(client, task_id)
        fake_zego.fake.seed(task_id, "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=RETRY_CODE))
    assert stop(client, auth, "s-1").status_code == 202  # queued for a retry
    fake_zego.fake.fail_next(Failure(code=REFUSED_CODE))
    assert stop(client, auth, "s-2").status_code == 502  # refused for good
    make_due(db)
    worker_once(runner)  # s-1 accepted on its second attempt
    # s-1 stays stopping with no stop callback: the worker stops it again.
    long_ago = utcnow() - timedelta(seconds=121)
    db.execute(update(Task).where(Task.task_id == "s-1").values(updated_at=long_ago))
    db.execute(update(StopRequest).values(created_at=long_ago, completed_at=long_ago))
    db.commit()
    worker_once(runner)

    lines = [x for x in json_lines(log_lines) if x["logger"].startswith("manager.stops")]
    shapes = [
        (x["task_id"], x.get("attempt"), x.get("outcome"), x.get("state"), x.get("zego_code"))
        for x in lines
    ]
    assert shapes == [
        ("s-1", 1, "retryable", "queued", RETRY_CODE),
        ("s-2", 1, "permanent", "failed", REFUSED_CODE),
        ("s-1", 2, "success", "succeeded", 0),
        ("s-1", None, None, None, None),  # the re-stop
        ("s-1", 1, "success", "succeeded", 0),
    ]
    gave_up = lines[1]
    assert gave_up["level"] == "WARNING"
    assert gave_up["message"].startswith(f"stop request {gave_up['stop_request_id']} gave up")
    restop = lines[3]
    assert (restop["level"], restop["owner"]) == ("WARNING", "owner-1")
    assert "queued another stop" in restop["message"]
    for line in (lines[0], lines[1], lines[2], lines[4]):
        assert isinstance(line["stop_request_id"], int)
        assert line["zego_request_id"]  # the fake's RequestId
        assert isinstance(line["elapsed_ms"], int)

    def delta(name: str, labels: dict[str, str], before: float) -> float:
        return sample(name, labels) - before

    zego = "manager_zego_calls_total"
    action = {"action": "StopCloudTranscode"}
    assert delta(zego, {**action, "code": "0"}, calls["0"]) == 2
    assert delta(zego, {**action, "code": str(RETRY_CODE)}, calls[str(RETRY_CODE)]) == 1
    assert delta(zego, {**action, "code": str(REFUSED_CODE)}, calls[str(REFUSED_CODE)]) == 1
    assert delta("manager_zego_call_seconds_count", action, latency) == 4
    assert {
        o: delta("manager_stop_attempts_total", {"outcome": o}, attempts[o]) for o in OUTCOMES
    } == {
        "success": 2,
        "retryable": 1,
        "permanent": 1,
        "no_answer": 0,
    }
    assert {
        s: delta("manager_stop_requests_finished_total", {"state": s}, finished[s]) for s in STATES
    } == {"succeeded": 2, "failed": 1}
    assert sample("manager_restops_total") - restops == 1


OUTCOMES = ("success", "retryable", "permanent", "no_answer")
STATES = ("succeeded", "failed")


def test_no_answer_is_counted_as_such(
    client: FlaskClient,
    auth: dict[str, str],
    settings: Settings,
    fake_zego: FakeServer,
    log_lines: io.StringIO,
) -> None:
    before = {
        "calls": sample(
            "manager_zego_calls_total", {"action": "StopCloudTranscode", "code": "no_answer"}
        ),
        "attempts": sample("manager_stop_attempts_total", {"outcome": "no_answer"}),
        "waits": sample("manager_stop_waits_total", {"reason": "zego_unreachable"}),
    }
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    # Longer than the read timeout the test settings give the client.
    fake_zego.fake.fail_next(Failure(delay=settings.zego_timeout[1] + 0.5))
    assert stop(client, auth).status_code == 202
    assert (
        sample("manager_zego_calls_total", {"action": "StopCloudTranscode", "code": "no_answer"})
        - before["calls"]
        == 1
    )
    assert sample("manager_stop_attempts_total", {"outcome": "no_answer"}) - before["attempts"] == 1
    assert sample("manager_stop_waits_total", {"reason": "zego_unreachable"}) - before["waits"] == 1
    [line] = [x for x in json_lines(log_lines) if x.get("task_id") == "s-1"]
    assert (line["level"], line["outcome"], line["state"]) == ("WARNING", "no_answer", "queued")
    assert line["message"].startswith("ZEGOCLOUD not reached for task s-1")


# -- gauges read from the database, and 503s --------------------------------------------------


def test_the_queue_and_stuck_gauges_read_the_database(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, db: Session
) -> None:
    for task_id in ("g-1", "g-2", "g-3"):
        start(client, task_id)
    fake_zego.fake.seed("g-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=RETRY_CODE))
    assert stop(client, auth, "g-1").status_code == 202
    an_hour_ago = utcnow() - timedelta(hours=1)
    db.execute(update(StopRequest).values(created_at=an_hour_ago, claimed_until=None))
    # g-2 silent for two days; g-3 stopping for ten minutes with no stop callback.
    two_days_ago = utcnow() - timedelta(days=2)
    db.execute(
        update(Task)
        .where(Task.task_id == "g-2")
        .values(last_delivery_at=two_days_ago, updated_at=two_days_ago)
    )
    db.execute(
        update(Task)
        .where(Task.task_id == "g-3")
        .values(status="stopping", updated_at=utcnow() - timedelta(minutes=10))
    )
    db.commit()
    metrics = scraped(client)
    assert metrics[("manager_stop_requests_queued", (("wait_reason", "none"),))] == 1
    assert metrics[("manager_stop_requests_queued", (("wait_reason", "rate_limit"),))] == 0
    assert metrics[("manager_stop_requests_in_flight", ())] == 0
    assert 3590 < metrics[("manager_stop_oldest_queued_seconds", ())] < 3700
    assert metrics[("manager_tasks_stuck", (("reason", "no_delivery"),))] == 1
    assert metrics[("manager_tasks_stuck", (("reason", "no_stop_callback"),))] == 1

    db.execute(update(StopRequest).values(claimed_until=utcnow() + timedelta(minutes=2)))
    db.commit()
    assert scraped(client)[("manager_stop_requests_in_flight", ())] == 1


def test_an_empty_queue_reads_zero(client: FlaskClient) -> None:
    metrics = scraped(client)
    assert metrics[("manager_stop_oldest_queued_seconds", ())] == 0
    assert metrics[("manager_stop_requests_in_flight", ())] == 0


def test_database_errors_answered_503_are_counted_and_logged(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    missing = tmp_path / "no-such-dir" / "manager.db"
    settings = Settings(
        database_url=f"sqlite:///{missing}",
        secret_key="k" * 32,
        zego_app_id=APP_ID,
        zego_server_secret=SERVER_SECRET,
        callback_secrets=(CALLBACK_SECRET,),
    )
    app = create_app(settings)
    try:
        client = app.test_client()
        before = {b: sample("manager_database_errors_total", {"blueprint": b}) for b in BLUEPRINTS}
        assert client.get("/api/tasks", headers={"Authorization": "Bearer x"}).status_code == 503
        # A malformed callback is recorded as rejected: that write fails too.
        assert client.post("/callbacks/zego", data=b"{").status_code == 503
        valid = json.dumps(callback(task_id="db-1", sequence=7))
        answer = client.post(
            "/callbacks/zego", data=valid, headers={"X-Request-Id": "zego-retry-1"}
        )
        assert answer.status_code == 503
        after = {b: sample("manager_database_errors_total", {"blueprint": b}) for b in BLUEPRINTS}
        assert {b: after[b] - before[b] for b in BLUEPRINTS} == {"api": 1, "callbacks": 2}
    finally:
        dispose_engines(app)
    [line] = [x for x in json_lines(log_lines) if x.get("task_id") == "db-1"]
    assert (line["level"], line["sequence"], line["request_id"]) == ("WARNING", 7, "zego-retry-1")
    assert line["message"].startswith("callback not committed")


BLUEPRINTS = ("api", "callbacks")


# -- the services' own processes ---------------------------------------------------------------


def test_the_worker_process_writes_json_lines_off_a_terminal(
    client: FlaskClient,
    auth: dict[str, str],
    settings: Settings,
    fake_zego: FakeServer,
    db: Session,
    tmp_path: Path,
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=RETRY_CODE))
    assert stop(client, auth).status_code == 202
    make_due(db)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": settings.database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_SERVER_SECRET": SERVER_SECRET,
        "ZEGO_API_URL": fake_zego.url,
        "SECRET_KEY": "k" * 32,
    }
    done = subprocess.run(
        [str(Path(sys.executable).parent / "manager"), "worker", "--once"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    [attempt] = [x for x in lines if x.get("task_id") == "s-1"]
    assert (attempt["level"], attempt["attempt"], attempt["state"]) == ("INFO", 2, "succeeded")
    assert not any(s in done.stderr + done.stdout for s in (SERVER_SECRET, CALLBACK_SECRET))


def test_a_worker_can_serve_its_own_metrics() -> None:
    port = free_port()
    serve_metrics(port, "127.0.0.1")
    count_zego_call("StopCloudTranscode", 0, 200, 0.03)
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    assert 'manager_zego_calls_total{action="StopCloudTranscode",code="0"}' in text
