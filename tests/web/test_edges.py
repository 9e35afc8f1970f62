"""Every route's edges: a body cap that holds for declared and chunked bodies, and the
headers every answer carries."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import requests
from flask.testing import FlaskClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from manager.config import MAX_BODY_BYTES, Settings
from manager.models import StopBatch, StopRequest
from manager.web.edges import BULK_BODY_BYTES

from ..conftest import APP_ID, CALLBACK_SECRET, callback
from ..live import gunicorn


def padded(body: dict[str, object], size: int) -> bytes:
    """`body` as JSON followed by whitespace up to `size` bytes: valid JSON, too long."""
    text = json.dumps(body).encode()
    return text + b" " * (size - len(text))


def chunked(client: FlaskClient, path: str, data: bytes, auth: dict[str, str]) -> object:
    """A POST whose body has no declared length, as gunicorn passes on a chunked one."""
    return client.post(
        path,
        input_stream=io.BytesIO(data),
        headers={**auth, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )


def nothing_stopped(db: Session) -> bool:
    db.rollback()
    requests_made = db.execute(select(func.count()).select_from(StopRequest)).scalar_one()
    batches = db.execute(select(func.count()).select_from(StopBatch)).scalar_one()
    return requests_made == 0 and batches == 0


def start(client: FlaskClient) -> None:
    body = json.dumps(callback(task_id="e-1", user_id="owner-1", sequence=1))
    assert (
        client.post("/callbacks/zego", data=body, content_type="application/json").json["verdict"]
        == "applied"
    )


def test_a_chunked_body_over_the_cap_is_413_and_changes_nothing(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    start(client)
    for path, size in [
        ("/api/tasks/e-1/stop", MAX_BODY_BYTES + 1),
        ("/api/stops", BULK_BODY_BYTES + 1),
    ]:
        response = chunked(client, path, padded({"owner": "owner-1"}, size), auth)
        assert response.status_code == 413, (path, response.data)  # type: ignore[attr-defined]
        assert response.json["error"]["code"] == "request_entity_too_large"  # type: ignore[attr-defined]
    assert nothing_stopped(db)


def test_a_declared_body_over_the_cap_is_413(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    start(client)
    response = client.post(
        "/api/stops",
        data=padded({"owner": "owner-1"}, BULK_BODY_BYTES + 1),
        content_type="application/json",
        headers=auth,
    )
    assert response.status_code == 413
    assert response.is_json
    assert nothing_stopped(db)


def test_a_chunked_body_within_the_cap_is_read_whole(
    client: FlaskClient, auth: dict[str, str], db: Session
) -> None:
    start(client)
    response = chunked(client, "/api/stops", padded({"owner": "owner-1"}, 200_000), auth)
    assert response.status_code == 202, response.data  # type: ignore[attr-defined]
    assert response.json["batch"]["total"] == 1  # type: ignore[attr-defined]


def test_every_answer_says_nosniff_and_html_carries_the_policy(client: FlaskClient) -> None:
    page = client.get("/")
    assert page.mimetype == "text/html"
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    for path in ("/healthz", "/api/tasks", "/no-such-page"):
        assert client.get(path).headers["X-Content-Type-Options"] == "nosniff", path


def test_a_real_chunked_request_through_gunicorn_is_refused_whole(
    settings: Settings, token: str, db: Session, client: FlaskClient
) -> None:
    """What the issue saw: gunicorn passing on a 1 MiB chunked body; now a 413."""
    start(client)
    env = {
        "DATABASE_URL": settings.database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_CALLBACK_SECRET": CALLBACK_SECRET,
        "SECRET_KEY": "edges-test",
    }
    body = padded({"owner": "owner-1"}, 1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for at in range(0, len(body), 16 * 1024):
            yield body[at : at + 16 * 1024]

    with gunicorn(env, workers=1) as base:
        response = requests.post(
            f"{base}/api/tasks/e-1/stop",
            data=chunks(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            timeout=30,
        )
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "request_entity_too_large"
    assert nothing_stopped(db)
