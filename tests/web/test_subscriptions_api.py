"""/api/subscriptions: subscribing, the secret shown once, disabling, rotation, the
delivery log and replay, through HTTP; bad input is a 400 naming the field."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines
from manager.clock import utcnow
from manager.config import Settings
from manager.events.secrets import Sealer, new_key
from manager.events.sender import EventSender
from manager.events.sending import RetryPolicy
from manager.events.subscriptions import MAX_SUBSCRIPTIONS
from manager.models import EventSend, Subscription
from manager.vocabulary import SendState

from ..conftest import callback

KEY = new_key()
ROUTES = [
    ("post", "/api/subscriptions"),
    ("get", "/api/subscriptions"),
    ("get", "/api/subscriptions/1"),
    ("post", "/api/subscriptions/1/disable"),
    ("post", "/api/subscriptions/1/enable"),
    ("post", "/api/subscriptions/1/rotate-secret"),
    ("get", "/api/subscriptions/1/deliveries"),
    ("post", "/api/subscriptions/1/replay"),
]
# The routes of one subscription: (method, what follows its id).
ONE_ROUTES = [(m, p.removeprefix("/api/subscriptions/1")) for m, p in ROUTES if "/1" in p]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, subscription_keys=(KEY,))


@pytest.fixture
def keyless(settings: Settings, app: Flask) -> Iterator[FlaskClient]:
    """A client of the same database whose app has no SUBSCRIPTION_KEY."""
    other = create_app(replace(settings, subscription_keys=()))
    other.config["TESTING"] = True
    yield other.test_client()
    dispose_engines(other)


class Receiver:
    """A subscription's receiver: answers each POST with the next of `statuses` (the last
    one for ever after), and counts them."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses) or [204]
        self.received = 0
        self.lock = threading.Lock()

    def answer(self) -> int:
        with self.lock:
            self.received += 1
            return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    """A receiver that fails once (503), then takes everything; and its URL."""
    receiver = Receiver(503, 204)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("content-length", "0")))
            status = receiver.answer()
            body = b"busy" if status >= 300 else b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield receiver, f"http://127.0.0.1:{server.server_port}/hook"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def subscribe(client: FlaskClient, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    response = client.post(
        "/api/subscriptions", json={"url": "https://example.test/hook", **body}, headers=auth
    )
    assert response.status_code == 201, response.json
    answer: dict[str, Any] = response.json
    return answer


def deliver(client: FlaskClient, *args: str, **kw: Any) -> None:
    response = client.post("/callbacks/zego", json=callback(*args, **kw))
    assert response.status_code == 200, response.json


def send_all(app: Flask) -> None:
    """What the worker does: send until nothing is pending (retries included)."""
    sender = EventSender(
        app.extensions["manager.engine"],
        Sealer((KEY,)),
        threads=2,
        timeout=2.0,
        policy=RetryPolicy(first=0.01, longest=0.05),
    )
    deadline = time.monotonic() + 30
    while pending(app):
        assert time.monotonic() < deadline, "sends still pending"
        if not sender.run_once().delivered:
            time.sleep(0.02)


def pending(app: Flask) -> int:
    with Session(app.extensions["manager.engine"]) as session:
        return len(
            session.scalars(
                select(EventSend).where(EventSend.state == SendState.PENDING.value)
            ).all()
        )


# -- subscribing, and the secret ----------------------------------------------------------


def test_the_secret_is_shown_on_creation_only(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    made = subscribe(
        client,
        auth,
        event_types=["task.stopped", "run.ended", "task.stopped"],
        owner="user-1",
        description="billing",
    )
    secret = made.pop("secret")
    assert secret.startswith("whsec_")
    assert made["url"] == "https://example.test/hook"
    assert made["event_types"] == ["task.stopped", "run.ended"]
    assert (made["owner"], made["description"], made["enabled"]) == ("user-1", "billing", True)

    listed = client.get("/api/subscriptions", headers=auth)
    one = client.get(f"/api/subscriptions/{made['id']}", headers=auth)
    for response in (listed, one):
        assert response.status_code == 200
        assert secret not in response.get_data(as_text=True)
    (row,) = listed.json["subscriptions"]
    health = {"pending": 0, "delivered": 0, "failed": 0}
    empty = {**health, "oldest_pending_at": None, "oldest_pending_seconds": None}
    assert row == {**made, "health": empty}
    assert one.json == row

    stored = db.scalars(select(Subscription)).one()
    assert secret not in stored.secret_encrypted
    assert Sealer((KEY,)).open(stored.secret_encrypted) == secret  # sealed, not hashed


def test_every_type_unless_some_are_named(client: FlaskClient, auth: dict[str, str]) -> None:
    made = subscribe(client, auth, event_types=None, owner=None)
    assert made["event_types"] is None
    assert made["owner"] is None


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_a_token(client: FlaskClient, method: str, path: str) -> None:
    response = getattr(client, method)(path, json={})
    assert response.status_code == 401
    assert response.json["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("body", "code", "named"),
    [
        ({"url": None}, "invalid_url", "url"),
        ({"url": ""}, "invalid_url", "url"),
        ({"url": 5}, "invalid_url", "url"),
        ({"url": "ftp://example.test/"}, "invalid_url", "url"),
        ({"url": "https://user:pw@example.test/"}, "invalid_url", "url"),
        ({"url": "https://example.test/a b"}, "invalid_url", "url"),
        ({"url": "https://example.test:99999/"}, "invalid_url", "url"),
        ({"url": "https://example.test/" + "a" * 2048}, "invalid_url", "url"),
        ({"event_types": "task.started"}, "invalid_event_types", "event_types"),
        ({"event_types": []}, "invalid_event_types", "event_types"),
        ({"event_types": ["task.exploded"]}, "invalid_event_types", "event_types"),
        ({"event_types": [1]}, "invalid_event_types", "event_types"),
        ({"owner": ""}, "invalid_owner", "owner"),
        ({"owner": 7}, "invalid_owner", "owner"),
        ({"owner": "a" * 257}, "invalid_owner", "owner"),
        ({"owner": "a\x01b"}, "invalid_owner", "owner"),
        ({"description": 1}, "invalid_description", "description"),
        ({"description": "d" * 501}, "invalid_description", "description"),
        ({"description": "a\x00b"}, "invalid_description", "description"),
    ],
)
def test_bad_subscriptions_are_400_naming_the_field(
    client: FlaskClient, auth: dict[str, str], body: dict[str, Any], code: str, named: str
) -> None:
    response = client.post(
        "/api/subscriptions", json={"url": "https://example.test/", **body}, headers=auth
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] == code
    assert named in response.json["error"]["message"]


@pytest.mark.parametrize("data", ["", "{}"])
def test_a_url_is_required(client: FlaskClient, auth: dict[str, str], data: str) -> None:
    response = client.post(
        "/api/subscriptions", data=data, content_type="application/json", headers=auth
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_url"
    assert "url is required" in response.json["error"]["message"]


@pytest.mark.parametrize("data", ["[1]", "not json", '"url"'])
def test_a_body_that_is_no_object_is_400(
    client: FlaskClient, auth: dict[str, str], data: str
) -> None:
    response = client.post(
        "/api/subscriptions", data=data, content_type="application/json", headers=auth
    )
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_body"


def test_at_most_so_many_subscriptions(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    now = utcnow()
    db.add_all(
        Subscription(url=f"https://example.test/{n}", secret_encrypted="-", created_at=now)
        for n in range(MAX_SUBSCRIPTIONS)
    )
    db.commit()
    response = client.post("/api/subscriptions", json={"url": "https://x.test/"}, headers=auth)
    assert response.status_code == 409
    assert response.json["error"]["code"] == "too_many_subscriptions"


def test_without_subscription_key_secrets_cannot_be_made(
    client: FlaskClient, keyless: FlaskClient, auth: dict[str, str]
) -> None:
    made = subscribe(client, auth)
    for path in ("/api/subscriptions", f"/api/subscriptions/{made['id']}/rotate-secret"):
        response = keyless.post(path, json={"url": "https://example.test/"}, headers=auth)
        assert response.status_code == 503
        assert response.json["error"]["code"] == "subscription_key_not_set"
    # What needs no secret works without the key.
    assert keyless.get(f"/api/subscriptions/{made['id']}", headers=auth).status_code == 200
    assert keyless.get("/api/subscriptions", headers=auth).json["subscriptions"][0]["id"]


# -- unknown subscriptions ----------------------------------------------------------------


@pytest.mark.parametrize("sub_id", ["999999", "0", str(2**31), str(2**63), "abc", "-1"])
@pytest.mark.parametrize(("method", "suffix"), ONE_ROUTES)
def test_unknown_and_impossible_ids_are_404(
    client: FlaskClient, auth: dict[str, str], sub_id: str, method: str, suffix: str
) -> None:
    response = getattr(client, method)(
        f"/api/subscriptions/{sub_id}{suffix}", json={"since": "2024-01-01T00:00:00Z"}, headers=auth
    )
    assert response.status_code == 404
    assert response.json["error"]["code"] in ("subscription_not_found", "not_found")


# -- disable, enable, rotate ----------------------------------------------------------------


def test_disable_and_enable(client: FlaskClient, auth: dict[str, str]) -> None:
    sub_id = subscribe(client, auth)["id"]
    off = client.post(f"/api/subscriptions/{sub_id}/disable", headers=auth)
    assert off.status_code == 200
    assert off.json["enabled"] is False
    assert off.json["disabled_reason"] == "disabled by ops-alice"
    assert off.json["disabled_at"]
    assert "secret" not in off.json

    on = client.post(f"/api/subscriptions/{sub_id}/enable", headers=auth)
    assert on.status_code == 200
    assert (on.json["enabled"], on.json["disabled_at"], on.json["disabled_reason"]) == (
        True,
        None,
        None,
    )

    why = client.post(
        f"/api/subscriptions/{sub_id}/disable", json={"reason": "receiver moved"}, headers=auth
    )
    assert why.json["disabled_reason"] == "receiver moved"
    listed = client.get("/api/subscriptions", headers=auth).json["subscriptions"]
    assert listed[0]["enabled"] is False


@pytest.mark.parametrize("body", [{"reason": 5}, {"reason": "r" * 501}, [1]])
def test_a_bad_disable_reason_is_400(client: FlaskClient, auth: dict[str, str], body: Any) -> None:
    sub_id = subscribe(client, auth)["id"]
    response = client.post(f"/api/subscriptions/{sub_id}/disable", json=body, headers=auth)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_body"


def test_rotation_shows_the_new_secret_once(client: FlaskClient, auth: dict[str, str]) -> None:
    made = subscribe(client, auth)
    rotated = client.post(f"/api/subscriptions/{made['id']}/rotate-secret", headers=auth)
    assert rotated.status_code == 200
    new = rotated.json["secret"]
    assert new.startswith("whsec_")
    assert new != made["secret"]
    assert rotated.json["previous_secret_until"]  # the old one signs beside it for a while
    shown = client.get(f"/api/subscriptions/{made['id']}", headers=auth).get_data(as_text=True)
    assert new not in shown
    assert made["secret"] not in shown


# -- the delivery log and replay ----------------------------------------------------------


def test_the_delivery_log_lists_every_attempt(
    app: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    receiver: tuple[Receiver, str],
) -> None:
    counter, url = receiver
    sub_id = subscribe(client, auth, url=url)["id"]
    deliver(client, task_id="task-1", sequence=1)
    deliver(client, "transcode_stop", task_id="task-1", sequence=2)
    waiting = client.get(f"/api/subscriptions/{sub_id}", headers=auth).json["health"]
    assert waiting["pending"] >= 2
    assert waiting["oldest_pending_at"] is not None
    send_all(app)

    log = client.get(f"/api/subscriptions/{sub_id}/deliveries", headers=auth)
    assert log.status_code == 200
    sends = log.json["deliveries"]
    assert log.json["next_cursor"] is None
    assert len(sends) == counter.received - 1  # one was answered 503 first
    assert [s["id"] for s in sends] == sorted((s["id"] for s in sends), reverse=True)
    assert {s["state"] for s in sends} == {"delivered"}
    assert all(s["task_id"] == "task-1" and s["webhook_id"].startswith("evt_") for s in sends)
    assert sends[-1]["type"] == "task.started"
    first = sends[-1]["log"]
    assert [a["status"] for a in first] == [503, 204]
    assert first[0]["answer"] == "busy"
    assert all(a["elapsed_ms"] >= 0 for a in first)
    health = client.get(f"/api/subscriptions/{sub_id}", headers=auth).json["health"]
    assert health == {
        "pending": 0,
        "delivered": len(sends),
        "failed": 0,
        "oldest_pending_at": None,
        "oldest_pending_seconds": None,
    }


def test_the_delivery_log_in_pages_and_by_state(client: FlaskClient, auth: dict[str, str]) -> None:
    sub_id = subscribe(client, auth)["id"]
    for n in range(3):
        deliver(client, task_id=f"task-{n}", sequence=1)
    path = f"/api/subscriptions/{sub_id}/deliveries"
    every = client.get(path, headers=auth).json["deliveries"]
    assert len(every) == 3
    assert {s["state"] for s in every} == {"pending"}
    assert all(s["next_attempt_at"] and s["log"] == [] for s in every)

    seen, cursor = [], ""
    while True:
        page = client.get(f"{path}?limit=2&cursor={cursor}", headers=auth).json
        seen += page["deliveries"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["deliveries"]) == 2
    assert seen == every

    assert client.get(f"{path}?state=delivered", headers=auth).json["deliveries"] == []
    assert len(client.get(f"{path}?state=pending", headers=auth).json["deliveries"]) == 3
    assert len(client.get(f"{path}?state=", headers=auth).json["deliveries"]) == 3


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ("state=sent", "state"),
        ("state=PENDING", "state"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=abc", "cursor"),
        ("cursor=0", "cursor"),
        ("cursor=-5", "cursor"),
        (f"cursor={2**63}", "cursor"),
        ("cursor=" + "9" * 5000, "cursor"),
    ],
)
def test_bad_log_parameters_are_400(
    client: FlaskClient, auth: dict[str, str], query: str, named: str
) -> None:
    sub_id = subscribe(client, auth)["id"]
    response = client.get(f"/api/subscriptions/{sub_id}/deliveries?{query}", headers=auth)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_parameter"
    assert named in response.json["error"]["message"]


def test_replay_sends_again_what_went_out(
    app: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    receiver: tuple[Receiver, str],
) -> None:
    _, url = receiver
    sub_id = subscribe(client, auth, url=url)["id"]
    deliver(client, task_id="task-1", sequence=1)
    deliver(client, "transcode_stop", task_id="task-1", sequence=2)
    send_all(app)
    path = f"/api/subscriptions/{sub_id}/replay"
    delivered = len(
        client.get(f"/api/subscriptions/{sub_id}/deliveries", headers=auth).json["deliveries"]
    )

    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert client.post(path, json={"since": later}, headers=auth).json == {"replayed": 0}
    hour_ago = int(time.time()) - 3600
    again = client.post(path, json={"since": hour_ago}, headers=auth)
    assert again.status_code == 200
    assert again.json == {"replayed": delivered}
    # What is pending already is not counted twice.
    assert client.post(path, json={"since": str(hour_ago)}, headers=auth).json == {"replayed": 0}

    sends = client.get(f"/api/subscriptions/{sub_id}/deliveries", headers=auth).json["deliveries"]
    assert all(s["state"] == "pending" and s["replayed_at"] for s in sends)
    send_all(app)
    log = client.get(f"/api/subscriptions/{sub_id}/deliveries", headers=auth).json["deliveries"]
    assert {s["state"] for s in log} == {SendState.DELIVERED}
    assert [s["webhook_id"] for s in log] == [s["webhook_id"] for s in sends]  # the same ids


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"since": ""},
        {"since": "yesterday"},
        {"since": True},
        {"since": 1.5},
        {"since": -1},
        {"since": "1960-01-01T00:00:00Z"},
        {"since": ["2024-01-01"]},
    ],
)
def test_replay_needs_a_time(client: FlaskClient, auth: dict[str, str], body: Any) -> None:
    sub_id = subscribe(client, auth)["id"]
    response = client.post(f"/api/subscriptions/{sub_id}/replay", json=body, headers=auth)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_parameter"
    assert "since" in response.json["error"]["message"]
