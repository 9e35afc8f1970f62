"""POST /callbacks/zego: verification order, verdicts, replay and audit."""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote

import pytest
from flask import Flask, request, request_started
from flask.testing import FlaskClient
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session
from werkzeug.exceptions import BadRequest
from werkzeug.test import Client

from manager import create_app, dispose_engines
from manager.config import Settings
from manager.models import Delivery, Task
from manager.zego.signing import signed_callback

from ..conftest import APP_ID, CALLBACK_SECRET, OLD_CALLBACK_SECRET, callback


def post(client: FlaskClient, body: Any, path: str = "/callbacks/zego") -> Any:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json")


def deliveries(db: Session) -> list[Delivery]:
    return list(db.execute(select(Delivery).order_by(Delivery.id)).scalars())


def test_start_is_applied_and_recorded(client: FlaskClient, db: Session) -> None:
    body = callback(task_id="t-1", user_id="owner-1", sequence=3)
    response = post(client, body)
    assert response.status_code == 200
    assert response.json == {"code": 0, "verdict": "applied"}
    task = db.execute(select(Task)).scalar_one()
    assert (task.task_id, task.owner, task.status, task.max_seq) == ("t-1", "owner-1", "running", 3)
    assert task.input == {"StreamId": "in-t-1"}
    [delivery] = deliveries(db)
    assert delivery.verdict == "applied"
    assert json.loads(delivery.raw_body) == body
    assert delivery.task_pk == task.id


def test_same_body_resent_is_a_duplicate(client: FlaskClient, db: Session) -> None:
    body = callback()
    assert post(client, body).json["verdict"] == "applied"
    again = post(client, body)
    assert again.status_code == 200
    assert again.json["verdict"] == "duplicate"
    assert [d.verdict for d in deliveries(db)] == ["applied", "duplicate"]


def test_same_event_with_new_timestamp_and_nonce_is_a_duplicate(
    client: FlaskClient, db: Session
) -> None:
    assert post(client, callback(sequence=5)).json["verdict"] == "applied"
    resend = callback(sequence=5, timestamp=int(time.time()) + 4)
    assert post(client, resend).json["verdict"] == "duplicate"


def test_nonce_reused_with_other_body_is_refused(client: FlaskClient, db: Session) -> None:
    first = callback(task_id="t-1", nonce="abcdef0123456789")
    assert post(client, first).status_code == 200
    forged = dict(first, TaskId="t-2")  # same Timestamp, Nonce and Signature
    response = post(client, forged)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "nonce_reused"
    assert db.execute(select(func.count()).select_from(Task)).scalar() == 1
    rejected = deliveries(db)[-1]
    assert (rejected.verdict, rejected.reason, rejected.task_id) == (
        "rejected",
        "nonce_reused",
        "t-2",
    )


def test_key_order_does_not_make_a_different_body(client: FlaskClient) -> None:
    body = callback()
    assert post(client, body).status_code == 200
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2)
    assert post(client, reordered).json["verdict"] == "duplicate"


def test_rotated_secret_is_accepted(client: FlaskClient) -> None:
    assert post(client, callback(secret=OLD_CALLBACK_SECRET)).status_code == 200


def test_bad_signature_is_401_and_recorded(client: FlaskClient, db: Session) -> None:
    response = post(client, callback(secret="not-the-secret"))
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_signature"
    assert db.execute(select(Task)).first() is None
    [delivery] = deliveries(db)
    assert (delivery.verdict, delivery.reason, delivery.task_id) == (
        "rejected",
        "invalid_signature",
        "task-1",
    )


def test_signature_is_checked_before_appid(client: FlaskClient) -> None:
    response = post(client, callback(secret="wrong", app_id=999))
    assert response.status_code == 401


def test_wrong_appid_is_403(client: FlaskClient, db: Session) -> None:
    response = post(client, callback(app_id=APP_ID + 1))
    assert response.status_code == 403
    assert response.json["error"]["code"] == "wrong_appid"
    assert db.execute(select(Task)).first() is None


# +303, not +301: the Timestamp is whole seconds, so a future one is up to 1 s nearer
# than it looks, and a slow request brings it nearer still.
@pytest.mark.parametrize("offset", [-301, 303, -10_000])
def test_timestamp_outside_window_is_401_stale(client: FlaskClient, offset: int) -> None:
    response = post(client, callback(timestamp=int(time.time()) + offset))
    assert response.status_code == 401
    assert response.json["error"]["code"] == "stale_timestamp"


def test_timestamp_inside_window_is_accepted(client: FlaskClient) -> None:
    assert post(client, callback(timestamp=int(time.time()) - 290)).status_code == 200


def test_path_variants(client: FlaskClient, db: Session) -> None:
    start = callback(task_id="p-1", sequence=1)
    del start["Event"]
    # The signature does not cover Event, so the body stays valid without it.
    assert post(client, start, "/callbacks/zego/transcode_start").status_code == 200
    stop = callback("transcode_stop", task_id="p-1", sequence=2)
    assert post(client, stop, "/callbacks/zego/transcode_stop").status_code == 200
    wrong = callback("transcode_stop", task_id="p-1", sequence=3)
    assert post(client, wrong, "/callbacks/zego/transcode_start").status_code == 400
    assert db.execute(select(Task.status)).scalar_one() == "stopped"


def test_percent_encoded_body(client: FlaskClient, db: Session) -> None:
    body = quote(json.dumps(callback()))
    response = client.post(
        "/callbacks/zego", data=body, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 200
    assert db.execute(select(Task.status)).scalar_one() == "running"


def test_huge_body_is_413(client: FlaskClient, db: Session) -> None:
    body = callback(details={"Input": {"StreamId": "x" * 70_000}})
    response = post(client, body)
    assert response.status_code == 413
    assert response.json["error"]["code"] == "body_too_large"
    assert db.execute(select(Task)).first() is None
    assert deliveries(db)[0].reason == "body_too_large"


def test_unconfigured_service_refuses_with_503(settings: Settings) -> None:
    app = create_app(Settings(database_url=settings.database_url, secret_key="k"))
    response = post(app.test_client(), callback())
    assert response.status_code == 503
    assert response.json["error"]["code"] == "not_configured"
    dispose_engines(app)


def test_database_down_is_503_and_nothing_claimed(settings: Settings, tmp_path: Any) -> None:
    broken = Settings(
        database_url=f"sqlite:///{tmp_path}/missing-dir/none.db",
        secret_key="k",
        zego_app_id=APP_ID,
        callback_secrets=(CALLBACK_SECRET,),
    )
    app = create_app(broken)
    response = post(app.test_client(), callback())
    assert response.status_code == 503
    assert response.json["error"]["code"] == "database_unavailable"
    dispose_engines(app)


def test_get_is_not_allowed_as_json(client: FlaskClient) -> None:
    response = client.get("/callbacks/zego")
    assert response.status_code == 405
    assert response.json["error"]["code"] == "method_not_allowed"


def test_unknown_path_is_json_404(client: FlaskClient) -> None:
    response = client.get("/nope")
    assert response.status_code == 404
    assert "error" in response.json


def test_secrets_are_not_in_the_stored_body_or_responses(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    response = post(client, callback())
    assert CALLBACK_SECRET.encode() not in response.data
    assert all(CALLBACK_SECRET.encode() not in d.raw_body for d in deliveries(db))


def test_numbers_as_strings_on_the_wire(client: FlaskClient, db: Session) -> None:
    body = signed_callback(
        CALLBACK_SECRET,
        {
            "Event": "transcode_start",
            "Appid": APP_ID,
            "TaskId": 77,
            "UserId": 5,
            "Sequence": "9",
            "Status": "TranscodeStarted",
        },
        int(time.time()),
        "0011223344556677",
    )
    assert post(client, body).status_code == 200
    task = db.execute(select(Task)).scalar_one()
    assert (task.task_id, task.owner, task.max_seq) == ("77", "5", 9)


@pytest.mark.postgres
def test_lost_database_connection_is_503_and_the_retry_succeeds(
    app: Flask, client: FlaskClient, db: Session
) -> None:
    """No pre-ping: a pooled connection that died fails its request with 503 (ZEGO
    retries), and the pool is replaced, so the retry gets a live connection."""
    assert post(client, callback(task_id="conn-1")).status_code == 200
    engine = app.extensions["manager.autocommit_engine"]  # the callbacks' pool
    with engine.connect() as conn:  # the pooled connection the next request will get
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    db.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    db.commit()
    body = callback(task_id="conn-2")
    lost = post(client, body)
    assert lost.status_code == 503
    assert lost.json["error"]["code"] == "database_unavailable"
    retried = post(client, body)
    assert retried.json == {"code": 0, "verdict": "applied"}
    db.rollback()
    assert db.execute(select(Task.status).where(Task.task_id == "conn-2")).scalar_one() == (
        "running"
    )


# --- CallbackRoute: callback POSTs skip Flask's request handling ---------------------


def test_callback_posts_skip_flask_and_other_requests_do_not(
    app: Flask, client: FlaskClient
) -> None:
    seen: list[str] = []

    def started(_sender: Flask, **_extra: Any) -> None:
        seen.append(request.path)

    with request_started.connected_to(started, app):
        assert post(client, callback()).status_code == 200
        assert post(client, callback(), "/callbacks/zego/transcode_start").status_code == 200
        assert client.get("/callbacks/zego").status_code == 405
        assert client.get("/healthz").status_code == 200
    assert seen == ["/callbacks/zego", "/healthz"]  # the two GETs only


def flask_view(app: Flask) -> Client:
    """A client of the Flask app behind CallbackRoute (and the answer headers around it):
    the blueprint's view answers."""
    return Client(app.wsgi_app.wsgi_app.wsgi_app)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "make_body",
    [
        lambda task: json.dumps(callback(task_id=task)),
        lambda task: json.dumps({**callback(task_id=task), "Signature": "0" * 40}),
        lambda task: '{"Event": "transcode_start", ',
        lambda task: json.dumps(callback("transcode_stop", task_id=task, stop_reason=7)),
        lambda task: "x" * 70_000,
    ],
    ids=["applied", "bad signature", "broken JSON", "bad StopReason", "too large"],
)
def test_the_blueprint_view_answers_as_the_route_does(
    app: Flask, client: FlaskClient, db: Session, make_body: Any
) -> None:
    through_route = client.post(
        "/callbacks/zego", data=make_body("via-route"), content_type="application/json"
    )
    flask_requests: list[str] = []

    def started(_sender: Flask, **_extra: Any) -> None:
        flask_requests.append(request.path)

    with request_started.connected_to(started, app):
        through_view = flask_view(app).post(
            "/callbacks/zego", data=make_body("via-view"), content_type="application/json"
        )
    assert flask_requests == ["/callbacks/zego"]  # this one did go through Flask
    assert through_view.status == through_route.status
    for header in ("Content-Type", "Content-Length"):
        assert through_view.headers[header] == through_route.headers[header]
    assert through_view.get_json() == through_route.get_json()
    route_delivery, view_delivery = deliveries(db)
    assert (view_delivery.verdict, view_delivery.reason) == (
        route_delivery.verdict,
        route_delivery.reason,
    )


def test_an_unexpected_error_is_a_json_500_and_logged(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("manager.web.callbacks.parse_callback", broken)
    response = post(client, callback())
    assert response.status_code == 500
    assert response.json == {
        "error": {"code": "internal_error", "message": "an unexpected error occurred"}
    }
    assert "unhandled error" in caplog.text


def test_an_http_error_from_the_input_stream_is_answered_as_flask_would(
    client: FlaskClient, db: Session
) -> None:
    class BrokenStream:
        def read(self, _size: int = -1) -> bytes:
            raise BadRequest("the client sent a broken body")

    response = client.post(
        "/callbacks/zego",
        data=b"{}",
        content_type="application/json",
        environ_overrides={"wsgi.input": BrokenStream()},
    )
    assert response.status == "400 BAD REQUEST"
    assert response.json == {
        "error": {"code": "bad_request", "message": "the client sent a broken body"}
    }
    assert deliveries(db) == []
