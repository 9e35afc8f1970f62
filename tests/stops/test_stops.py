"""Admin stop through StopCloudTranscode, against the local fake ZEGOCLOUD."""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import event, func, insert, select, text, update
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines
from manager.clock import utcnow
from manager.config import MAX_BODY_BYTES, Settings
from manager.db import Base
from manager.models import StopAttempt, StopRequest, Task
from manager.reports import reporting
from manager.stops.bulk import MAX_BULK_TASKS, BulkSelection, create_batch
from manager.stops.restops import MAX_RESTOPS, RESTOP_BY
from manager.zego.callbacks import MAX_CALLBACK_SEQUENCE
from manager.zego.fake import Failure
from manager.zego.fake_server import FakeServer

from ..conftest import APP_ID, CALLBACK_SECRET, SERVER_SECRET, callback


def start(client: FlaskClient, task_id: str = "s-1", owner: str = "owner-1", seq: int = 3) -> None:
    body = json.dumps(callback(task_id=task_id, user_id=owner, sequence=seq))
    assert (
        client.post("/callbacks/zego", data=body, content_type="application/json").status_code
        == 200
    )


def stop(client: FlaskClient, auth: dict[str, str], task_id: str = "s-1", **kw: Any) -> Any:
    query = "?force=true" if kw.pop("force", False) else ""
    return client.post(f"/api/tasks/{task_id}/stop{query}", json=kw or None, headers=auth)


def make_due(db: Session) -> None:
    db.execute(update(StopRequest).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    db.commit()


def worker_once(runner: FlaskCliRunner) -> str:
    result = runner.invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    return result.output


def zego_stops(fake_zego: FakeServer) -> list[dict[str, Any]]:
    return [c for c in fake_zego.fake.calls if c["action"] == "StopCloudTranscode"]


def test_stop_is_sent_as_the_owner_with_a_higher_sequence(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, db: Session
) -> None:
    start(client, seq=3)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    response = stop(client, auth, reason="maintenance")
    assert response.status_code == 200, response.json
    body = response.json["stop_request"]
    assert (body["state"], body["sequence"], body["user_id"]) == ("succeeded", 4, "owner-1")
    assert (body["requested_by"], body["reason"]) == ("ops-alice", "maintenance")
    assert body["zego"]["code"] == 0
    assert body["zego"]["request_id"]
    assert fake_zego.fake.tasks["s-1"].stops == [4]
    task = db.execute(select(Task)).scalar_one()
    assert (task.status, task.max_seq) == ("stopping", 4)
    attempt = db.execute(select(StopAttempt)).scalar_one()
    assert (attempt.sequence, attempt.outcome, attempt.code) == (4, "success", 0)


def test_the_stop_callback_closes_the_stopping_task(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, live_url: str, db: Session
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.callback_url = f"{live_url}/callbacks/zego"
    assert stop(client, auth).status_code == 200
    deadline = time.monotonic() + 10
    status = "stopping"
    while status == "stopping" and time.monotonic() < deadline:
        time.sleep(0.05)
        db.rollback()
        status = db.execute(select(Task.status)).scalar_one()
    assert status == "stopped"
    detail = client.get("/api/tasks/s-1", headers=auth).json
    assert [d["event"] for d in detail["deliveries"]] == ["transcode_stop", "transcode_start"]
    assert detail["deliveries"][0]["sequence"] == 4
    assert detail["stop_requests"][0]["attempt_log"][0]["outcome"] == "success"


@pytest.mark.parametrize(
    "failure",
    [
        Failure(code=110200151),
        Failure(code=110200001),
        Failure(code=110200191),
        Failure(http_status=503),
        Failure(http_status=429),
        Failure(delay=1.5),
    ],
    ids=["110200151", "110200001", "overload", "http-503", "http-429", "timeout"],
)
def test_retryable_answers_queue_for_the_worker(
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
    failure: Failure,
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(failure)
    response = stop(client, auth)
    assert response.status_code == 202, response.json
    queued = response.json["stop_request"]
    assert (queued["state"], queued["attempts"]) == ("queued", 1)
    assert queued["next_attempt_at"] > queued["created_at"]

    assert "0 attempts" in worker_once(runner)  # not due yet: backoff
    make_due(db)
    assert "1 attempts" in worker_once(runner)
    db.rollback()
    stop_request = db.execute(select(StopRequest)).scalar_one()
    assert (stop_request.state, stop_request.attempts, stop_request.sequence) == ("succeeded", 2, 5)
    assert fake_zego.fake.tasks["s-1"].stops == [5]
    sequences = [
        a.sequence for a in db.execute(select(StopAttempt).order_by(StopAttempt.id)).scalars()
    ]
    assert sequences == [4, 5]
    if failure.delay:
        # The fake answers the timed-out call after all (and records it then): wait for
        # that here, or it would land among the next test's calls.
        deadline = time.monotonic() + 10
        while len(zego_stops(fake_zego)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)


def test_a_queued_stop_whose_task_ended_meanwhile_succeeds_unsent(
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=110200151))
    assert stop(client, auth).status_code == 202  # queued for a retry
    body = json.dumps(callback("transcode_stop", task_id="s-1", sequence=5, stop_reason=0))
    assert (
        client.post("/callbacks/zego", data=body, content_type="application/json").json["verdict"]
        == "applied"
    )
    make_due(db)
    assert "0 attempts" in worker_once(runner)
    db.rollback()
    stop_request = db.execute(select(StopRequest)).scalar_one()
    assert (stop_request.state, stop_request.attempts) == ("succeeded", 1)
    assert stop_request.completed_at is not None
    assert len(zego_stops(fake_zego)) == 1  # the first attempt only


def test_a_forced_stop_of_an_ended_task_is_still_sent(
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
) -> None:
    start(client)
    body = json.dumps(callback("transcode_stop", task_id="s-1", sequence=5, stop_reason=0))
    client.post("/callbacks/zego", data=body, content_type="application/json")
    fake_zego.fake.seed("s-1", "owner-1", sequence=5, notify=False)
    fake_zego.fake.fail_next(Failure(code=110200151))
    assert stop(client, auth, force=True).status_code == 202
    make_due(db)
    assert "1 attempts" in worker_once(runner)
    assert len(zego_stops(fake_zego)) == 2


def test_a_task_at_the_highest_callback_sequence_can_still_be_stopped(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer, db: Session
) -> None:
    start(client, seq=MAX_CALLBACK_SEQUENCE)
    fake_zego.fake.seed("s-1", "owner-1", sequence=MAX_CALLBACK_SEQUENCE, notify=False)
    response = stop(client, auth)
    assert response.status_code == 200, response.json
    assert response.json["stop_request"]["sequence"] == MAX_CALLBACK_SEQUENCE + 1
    assert type(db.execute(select(Task.max_seq)).scalar_one()) is int


@pytest.mark.parametrize("code", [110200002, 110200003, 100000005, 100000004, 110200160])
def test_permanent_refusals_are_502_and_never_retried(
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
    code: int,
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=code))
    response = stop(client, auth)
    assert response.status_code == 502
    assert response.json["error"]["code"] == "zego_refused"
    assert response.json["error"]["zego_code"] == code
    assert response.json["stop_request"]["state"] == "failed"
    make_due(db)
    assert "0 attempts" in worker_once(runner)
    assert len(zego_stops(fake_zego)) == 1
    db.rollback()
    assert db.execute(select(Task.status)).scalar_one() == "running"


def test_a_wrong_server_secret_is_a_signature_error_not_retried(
    settings: Settings, fake_zego: FakeServer, token: str, auth: dict[str, str]
) -> None:
    wrong = Settings(**{**settings.__dict__, "zego_server_secret": "not-the-secret"})
    app = create_app(wrong)
    client = app.test_client()
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    response = stop(client, auth)
    assert response.status_code == 502
    assert response.json["error"]["zego_code"] == 100000005
    dispose_engines(app)


def test_attempts_run_out(
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=110200151, times=10))
    assert stop(client, auth).status_code == 202
    for _ in range(4):
        make_due(db)
        worker_once(runner)
    db.rollback()
    stop_request = db.execute(select(StopRequest)).scalar_one()
    assert (stop_request.state, stop_request.attempts) == ("failed", 3)  # STOP_MAX_ATTEMPTS=3
    assert len(zego_stops(fake_zego)) == 3


def test_unknown_task_is_404(client: FlaskClient, auth: dict[str, str]) -> None:
    response = stop(client, auth, task_id="ghost")
    assert response.status_code == 404


def test_stopped_task_is_409_unless_forced(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer
) -> None:
    start(client)
    body = json.dumps(callback("transcode_stop", task_id="s-1", sequence=4))
    client.post("/callbacks/zego", data=body, content_type="application/json")
    response = stop(client, auth)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "already_stopped"
    fake_zego.fake.seed("s-1", "owner-1", sequence=4, notify=False)
    forced = stop(client, auth, force=True)
    assert forced.status_code == 200
    assert forced.json["stop_request"]["sequence"] == 5


def test_a_stop_in_flight_is_returned_not_repeated(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=110200151))
    first = stop(client, auth)
    second = stop(client, auth)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json["stop_request"]["id"] == second.json["stop_request"]["id"]
    assert second.json["created"] is False
    assert len(zego_stops(fake_zego)) == 1


def test_a_stopping_task_returns_its_accepted_stop(
    client: FlaskClient, auth: dict[str, str], fake_zego: FakeServer
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    first = stop(client, auth)
    again = stop(client, auth)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json["stop_request"]["id"] == first.json["stop_request"]["id"]
    assert len(zego_stops(fake_zego)) == 1


def test_owner_unknown_is_409(client: FlaskClient, auth: dict[str, str]) -> None:
    # Only a stop callback arrived (so no owner), then it was forced.
    body = json.dumps(callback("transcode_stop", task_id="s-1", sequence=4, user_id=None))
    client.post("/callbacks/zego", data=body, content_type="application/json")
    response = stop(client, auth, force=True)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "owner_unknown"


def test_bad_bodies_are_400(client: FlaskClient, auth: dict[str, str]) -> None:
    start(client)
    for data in (
        b"[1]",
        b"{",
        json.dumps({"reason": 5}).encode(),
        json.dumps({"reason": "x" * 501}).encode(),
    ):
        response = client.post(
            "/api/tasks/s-1/stop", data=data, headers=auth, content_type="application/json"
        )
        assert response.status_code == 400, data


def test_stop_needs_a_token(client: FlaskClient) -> None:
    assert client.post("/api/tasks/s-1/stop").status_code == 401


def test_stuck_stopping_task_is_stopped_again(
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    assert stop(client, auth).status_code == 200  # no callback comes back
    became_stopping = utcnow() - timedelta(seconds=121)
    db.execute(update(Task).values(updated_at=became_stopping))
    db.execute(update(StopRequest).values(created_at=became_stopping, completed_at=became_stopping))
    db.commit()
    worker_once(runner)
    assert fake_zego.fake.tasks["s-1"].stops == [4, 5]
    db.rollback()
    restop = db.execute(select(StopRequest).order_by(StopRequest.id.desc())).scalars().first()
    assert restop is not None
    assert (restop.requested_by, restop.state, restop.sequence) == ("worker", "succeeded", 5)
    worker_once(runner)  # not again at once: the wait runs from the re-stop
    assert fake_zego.fake.tasks["s-1"].stops == [4, 5]
    # The stuck report still shows the task, stopping since the first stop.
    [stuck] = reporting.stuck(db, now=utcnow() + timedelta(seconds=1))
    assert (stuck.task_id, stuck.reason) == ("s-1", "no_stop_callback")
    assert abs(stuck.since - became_stopping) < timedelta(seconds=1)


def test_re_stops_are_counted_per_stopping_spell(
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    assert stop(client, auth).status_code == 200
    long_ago = utcnow() - timedelta(hours=1)
    task_pk = db.execute(select(Task.id)).scalar_one()
    for _ in range(MAX_RESTOPS):  # an earlier spell used up its re-stops
        db.add(
            StopRequest(
                task_pk=task_pk,
                state="succeeded",
                user_id="owner-1",
                requested_by=RESTOP_BY,
                force=True,
                created_at=long_ago,
                completed_at=long_ago,
                attempts=1,
                next_attempt_at=long_ago,
            )
        )
    became_stopping = utcnow() - timedelta(seconds=121)
    db.execute(update(Task).values(updated_at=became_stopping))
    db.execute(
        update(StopRequest)
        .where(StopRequest.requested_by != RESTOP_BY)
        .values(created_at=became_stopping, completed_at=became_stopping)
    )
    db.commit()
    worker_once(runner)
    assert fake_zego.fake.tasks["s-1"].stops == [4, 5]


def test_cli_stop(client: FlaskClient, runner: FlaskCliRunner, fake_zego: FakeServer) -> None:
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    result = runner.invoke(args=["stop", "s-1", "--reason", "from the shell"])
    assert result.exit_code == 0, result.output
    assert "seq=4 succeeded" in result.output
    missing = runner.invoke(args=["stop", "nope"])
    assert missing.exit_code != 0


def test_bulk_stop_by_ids_owner_and_all(
    client: FlaskClient, runner: FlaskCliRunner, auth: dict[str, str], fake_zego: FakeServer
) -> None:
    for i in range(6):
        owner = "alice" if i < 3 else "bob"
        start(client, task_id=f"b-{i}", owner=owner, seq=1)
        fake_zego.fake.seed(f"b-{i}", owner, sequence=1, notify=False)
    by_ids = client.post(
        "/api/stops", json={"task_ids": ["b-0", "nope"], "reason": "r"}, headers=auth
    )
    assert by_ids.status_code == 202
    assert by_ids.json["batch"]["total"] == 1
    assert by_ids.json["skipped"] == {"nope": "unknown_task"}
    [item] = by_ids.json["batch"]["items"]  # the per-task stop requests, at once
    assert (item["task_id"], item["state"], item["reason"]) == ("b-0", "queued", "r")
    by_owner = client.post("/api/stops", json={"owner": "alice"}, headers=auth).json
    assert by_owner["batch"]["total"] == 2
    assert by_owner["skipped"] == {"b-0": "a stop is already queued"}
    everything = client.post("/api/stops", json={"all_running": True}, headers=auth).json
    assert everything["batch"]["total"] == 3

    assert "6 attempts" in worker_once(runner)
    progress = client.get(f"/api/stops/{everything['batch']['id']}", headers=auth).json["batch"]
    assert progress["progress"] == {"queued": 0, "succeeded": 3, "failed": 0}
    assert progress["done"] is True
    assert sorted(i["task_id"] for i in progress["items"]) == ["b-3", "b-4", "b-5"]
    assert all(i["state"] == "succeeded" for i in progress["items"])
    assert sorted(t for t, v in fake_zego.fake.tasks.items() if v.stops) == [
        f"b-{i}" for i in range(6)
    ]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"task_ids": []},
        {"task_ids": "b-1"},
        {"task_ids": [1]},
        {"owner": 5},
        {"all_running": "yes"},
        {"owner": "a", "all_running": True},
        {"owner": 0, "all_running": True},  # 0 == False in Python, but it was given
        {"task_ids": 0.0, "all_running": True},
        [1],
    ],
)
def test_bulk_stop_validation(client: FlaskClient, auth: dict[str, str], body: Any) -> None:
    response = client.post("/api/stops", json=body, headers=auth)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_body"


def test_unknown_batch_is_404(client: FlaskClient, auth: dict[str, str]) -> None:
    assert client.get("/api/stops/999", headers=auth).status_code == 404


def test_secrets_never_leave_the_process(
    app: Flask,
    client: FlaskClient,
    runner: FlaskCliRunner,
    auth: dict[str, str],
    fake_zego: FakeServer,
    db: Session,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    start(client)
    fake_zego.fake.seed("s-1", "owner-1", sequence=3, notify=False)
    fake_zego.fake.fail_next(Failure(code=110200151))
    responses = [stop(client, auth), client.get("/api/tasks/s-1", headers=auth)]
    make_due(db)
    worker_once(runner)
    responses.append(client.get("/api/tasks/s-1", headers=auth))
    secrets = (SERVER_SECRET, CALLBACK_SECRET, auth["Authorization"].split()[1])
    for response in responses:
        assert not any(s in response.get_data(as_text=True) for s in secrets)
    assert not any(s in caplog.text for s in secrets)
    db.rollback()
    for table in Base.metadata.sorted_tables:
        dump = repr(db.execute(text(f"SELECT * FROM {table.name}")).all())  # noqa: S608
        assert not any(s in dump for s in secrets), table.name
    assert SERVER_SECRET not in repr(app.extensions)


def test_a_bulk_stop_takes_the_same_statements_for_3_tasks_as_for_300(db: Session) -> None:
    """The batch's stop requests are one INSERT … SELECT, whatever their number."""
    now = utcnow()

    def statements_for(owner: str, count: int) -> int:
        for i in range(count):
            db.add(
                Task(
                    app_id=APP_ID,
                    task_id=f"{owner}-{i}",
                    owner=owner,
                    status="running",
                    state_seq=1,
                    state_rank=2,
                    max_seq=1,
                    runs=1,
                    first_seen_at=now,
                    updated_at=now,
                )
            )
        db.flush()
        executed: list[str] = []

        def count(*args: object) -> None:
            executed.append(str(args[2]))

        engine = db.get_bind()
        event.listen(engine, "before_cursor_execute", count)
        try:
            batch, skipped = create_batch(
                db,
                BulkSelection(owner=owner),
                requested_by="ops",
                reason=None,
                app_id=APP_ID,
                now=now,
            )
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert (batch.total, skipped) == (count_of(owner), {})
        return len(executed)

    def count_of(owner: str) -> int:
        return {"few": 3, "many": 300}[owner]

    assert statements_for("few", 3) == statements_for("many", 300)
    db.rollback()


def test_a_bulk_stop_names_up_to_10000_tasks_in_one_request(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    """MAX_BULK_TASKS ids of a realistic length fit the bulk route's own body cap."""
    now = utcnow()
    task_ids = [f"transcode-task-{i:06d}-{'x' * 20}" for i in range(MAX_BULK_TASKS)]
    db.execute(
        insert(Task),
        [
            {
                "app_id": APP_ID,
                "task_id": task_id,
                "owner": "bulk",
                "status": "running",
                "state_seq": 1,
                "state_rank": 2,
                "max_seq": 1,
                "runs": 1,
                "first_seen_at": now,
                "updated_at": now,
            }
            for task_id in task_ids
        ],
    )
    db.commit()
    body = json.dumps({"task_ids": task_ids, "reason": "maintenance"})
    assert len(body) > MAX_BODY_BYTES  # over the cap every other route keeps
    response = client.post("/api/stops", data=body, content_type="application/json", headers=auth)
    assert response.status_code == 202, response.json
    assert response.json["batch"]["total"] == MAX_BULK_TASKS
    assert db.execute(select(func.count()).select_from(StopRequest)).scalar_one() == MAX_BULK_TASKS
    too_many = json.dumps({"task_ids": [*task_ids, "one-more"]})
    response = client.post(
        "/api/stops", data=too_many, content_type="application/json", headers=auth
    )
    assert response.status_code == 400
