"""Fixtures: one migrated database per test session (SQLite, or PostgreSQL when
TEST_DATABASE_URL is set), emptied after every test."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session
from werkzeug.serving import make_server

from manager import create_app, dispose_engines
from manager.config import Settings
from manager.db import Base, make_engine
from manager.migrate import upgrade
from manager.zego.fake import FakeZego
from manager.zego.fake_server import FakeServer
from manager.zego.signing import new_nonce, signed_callback

APP_ID = 1234567
CALLBACK_SECRET = "cb-secret-0123456789abcdef"
OLD_CALLBACK_SECRET = "cb-secret-retired-fedcba"
SERVER_SECRET = "9193cc662a4c0ec135ec71fb57194b38"

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "")
ON_POSTGRES = TEST_DATABASE_URL.startswith("postgresql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ON_POSTGRES:
        return
    skip = pytest.mark.skip(reason="PostgreSQL only: set TEST_DATABASE_URL to run")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database of our own: a new PostgreSQL database, or a SQLite file."""
    if not TEST_DATABASE_URL:
        path = tmp_path_factory.mktemp("db") / "manager.db"
        yield f"sqlite:///{path}"
        return
    url = _psycopg_url(TEST_DATABASE_URL)
    name = f"manager_test_{secrets.token_hex(4)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _psycopg_url(raw: str) -> Any:
    url = make_url(raw)
    return url.set(drivername="postgresql+psycopg")


@pytest.fixture
def scratch_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """An empty database, separate from the suite's migrated one."""
    if not ON_POSTGRES:
        engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('mig')}/scratch.db")
        yield engine
        engine.dispose()
        return
    url = _psycopg_url(TEST_DATABASE_URL)
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"manager_scratch_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(url.set(database=name).render_as_string(hide_password=False))
    yield engine
    engine.dispose()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def migrated_engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def fake_server() -> Iterator[FakeServer]:
    fake = FakeZego(
        app_id=APP_ID,
        server_secret=SERVER_SECRET,
        callback_secret=CALLBACK_SECRET,
        callback_retry_delays=(0.2, 0.4, 0.8),
    )
    with FakeServer(fake) as server:
        yield server


@pytest.fixture
def fake_zego(fake_server: FakeServer) -> FakeServer:
    """The local stand-in for ZEGOCLOUD's API, served over real HTTP, fresh for each test."""
    fake_server.fake.reset()
    return fake_server


@pytest.fixture
def settings(
    database_url: str, migrated_engine: Engine, tmp_path: Path, fake_zego: FakeServer
) -> Settings:
    return Settings(
        database_url=database_url,
        secret_key="test-secret-key",
        zego_app_id=APP_ID,
        zego_server_secret=SERVER_SECRET,
        callback_secrets=(CALLBACK_SECRET, OLD_CALLBACK_SECRET),
        zego_api_url=fake_zego.url,
        stop_max_attempts=3,
        zego_timeout=(1.0, 1.0),
    )


@pytest.fixture
def app(settings: Settings, migrated_engine: Engine) -> Iterator[Flask]:
    app = create_app(settings)
    app.config["TESTING"] = True
    yield app
    dispose_engines(app)
    _empty_tables(migrated_engine)


def _empty_tables(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(table.delete())


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def live_url(app: Flask) -> Iterator[str]:
    """The app served over HTTP from a thread, for the fake's callbacks to reach."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@pytest.fixture
def db(app: Flask, database_url: str) -> Iterator[Session]:
    """A session for the test's own reads; on SQLite it never holds the write lock."""
    engine = make_engine(database_url)
    session = Session(engine, expire_on_commit=False)
    yield session
    session.close()
    engine.dispose()


@pytest.fixture
def token(runner: FlaskCliRunner) -> str:
    result = runner.invoke(args=["tokens", "create", "ops-alice"])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


@pytest.fixture
def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def callback(
    event: str = "transcode_start",
    *,
    task_id: str = "task-1",
    user_id: str | None = "user-1",
    sequence: int | None = 1,
    status: str | None = None,
    stop_reason: int | None = None,
    timestamp: int | None = None,
    nonce: str | None = None,
    secret: str = CALLBACK_SECRET,
    app_id: int | str = APP_ID,
    details: dict[str, Any] | None = None,
) -> dict[str, object]:
    """A signed callback body, by default a TranscodeStarted for task-1."""
    payload: dict[str, object] = {"Event": event, "Appid": str(app_id), "TaskId": task_id}
    if user_id is not None:
        payload["UserId"] = user_id
    if sequence is not None:
        payload["Sequence"] = sequence
    if event == "transcode_start":
        payload["Status"] = status or "TranscodeStarted"
        payload["Details"] = details or {
            "Input": {"StreamId": f"in-{task_id}"},
            "Outputs": [{"StreamId": f"out-{task_id}", "Width": 1280, "Height": 720}],
        }
    else:
        payload["Status"] = status or "TranscodeStopped"
        payload["StopReason"] = 0 if stop_reason is None else stop_reason
    return signed_callback(secret, payload, timestamp or int(time.time()), nonce or new_nonce())
