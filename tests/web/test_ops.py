"""Service endpoints: /healthz, /readyz, /metrics."""

from __future__ import annotations

import json
from pathlib import Path

from flask.testing import FlaskClient

from manager import create_app, dispose_engines
from manager.config import Settings

from ..conftest import callback


def test_healthz(client: FlaskClient) -> None:
    assert client.get("/healthz").json == {"status": "ok"}


def test_readyz_when_migrated(client: FlaskClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200


def test_readyz_is_503_before_migrations(tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path}/empty.db", secret_key="k"))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["error"]["code"] == "migrations_pending"
    dispose_engines(app)


def test_readyz_is_503_without_a_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/no/such/dir.db"
    app = create_app(Settings(database_url=url, secret_key="k"))
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["error"]["code"] == "database_unavailable"
    dispose_engines(app)


def test_metrics_count_deliveries_by_verdict(client: FlaskClient) -> None:
    body = json.dumps(callback(task_id="m-1"))
    client.post("/callbacks/zego", data=body, content_type="application/json")
    client.post("/callbacks/zego", data=body, content_type="application/json")
    client.post("/callbacks/zego", data=b"junk", content_type="application/json")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'manager_callback_deliveries_total{reason="",verdict="applied"}' in text
    assert 'verdict="duplicate"' in text
    assert 'manager_callback_deliveries_total{reason="invalid_body",verdict="rejected"}' in text
    assert "manager_callback_seconds_bucket" in text
