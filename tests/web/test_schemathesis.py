"""schemathesis against the running service (gunicorn on the suite's database, the fake
ZEGOCLOUD): every operation of /openapi.json, with valid and invalid input, answers no
5xx and nothing that breaks the document: its statuses, content types, schemas and
headers.

The schema is built from the app when the module is collected, so that each operation is
a test of its own (schemathesis.pytest.from_fixture, which would load it from the live
service, fails under pytest 9); the live service's /openapi.json is held to it first.
Generation is deterministic and bounded, and failures are not shrunk: the module takes
about 20 s.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines
from manager.access.tokens import create_token
from manager.config import Settings
from manager.db import Base
from manager.events.secrets import new_key
from manager.web.openapi import build_document
from manager.zego.fake_server import FakeServer

from ..conftest import APP_ID, CALLBACK_SECRET, SERVER_SECRET, callback
from ..live import gunicorn

MAX_EXAMPLES = 50  # per operation and phase: the module runs well within a minute
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "unsupported_method",
    "ignored_auth",
)
REQUEST_TIMEOUT = 15  # seconds; the fake ZEGOCLOUD answers a stop in milliseconds


def _document() -> dict[str, object]:
    app = create_app(Settings(database_url="sqlite://", secret_key="openapi"))
    try:
        return build_document(app)
    finally:
        dispose_engines(app)


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    config=SchemathesisConfig.from_dict(
        {
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "no-shrink": True,
                # Unknown query parameters are ignored, as is usual; not a finding.
                "allow-extra-parameters": False,
            },
            "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
            "request-timeout": REQUEST_TIMEOUT,
        }
    ),
)


@dataclass
class Live:
    base: str
    headers: dict[str, str]  # the bearer token
    cookies: dict[str, str]  # the dashboard's session, signed in
    examples: Counter[str]


@pytest.fixture(scope="module")
def live(database_url: str, migrated_engine: Engine, fake_server: FakeServer) -> Iterator[Live]:
    """The service under gunicorn, with a token and a few tasks; prints the run's figures."""
    fake_server.fake.reset()
    with Session(migrated_engine) as session:
        token = create_token(session, "schemathesis")
        session.commit()
    env = {
        "DATABASE_URL": database_url,
        "ZEGO_APP_ID": str(APP_ID),
        "ZEGO_SERVER_SECRET": SERVER_SECRET,
        "ZEGO_CALLBACK_SECRET": CALLBACK_SECRET,
        "ZEGO_API_URL": fake_server.url,  # nothing leaves the machine
        "SECRET_KEY": "schemathesis-test",
        # Subscriptions keep their secrets sealed; no worker runs, so none is ever sent to.
        "SUBSCRIPTION_KEY": new_key(),
    }
    started = time.monotonic()
    try:
        with gunicorn(env, workers=2) as base:
            served = requests.get(f"{base}/openapi.json", timeout=REQUEST_TIMEOUT)
            assert served.json() == DOCUMENT
            live = Live(base, {"Authorization": f"Bearer {token}"}, sign_in(base, token), Counter())
            seed(live, fake_server)
            yield live
    finally:
        with migrated_engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
    figures = live.examples
    print(  # shown with -s
        f"\nschemathesis: {len(figures)} operations, {figures.total()} examples, "
        f"{time.monotonic() - started:.1f} s: {json.dumps(figures, sort_keys=True)}"
    )


def sign_in(base: str, token: str) -> dict[str, str]:
    """The cookies of a dashboard session signed in with the token."""
    browser = requests.Session()
    page = browser.get(f"{base}/", timeout=REQUEST_TIMEOUT)
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found, page.text
    answer = browser.post(
        f"{base}/login",
        data={"csrf": found[1], "token": token},
        allow_redirects=False,
        timeout=REQUEST_TIMEOUT,
    )
    assert answer.status_code == 302, answer.text
    return browser.cookies.get_dict()


def seed(live: Live, fake_server: FakeServer) -> None:
    """Tasks in every state, a stop and a subscription, so that the lists and reports
    have rows."""
    t0 = int(time.time()) - 120
    bodies = [
        callback(task_id="st-running", user_id="u-1", sequence=1, timestamp=t0),
        callback(task_id="st-stopped", user_id="u-1", sequence=1, timestamp=t0),
        callback("transcode_stop", task_id="st-stopped", sequence=2, timestamp=t0 + 60),
        callback(task_id="st-failed", user_id="u-2", sequence=1, timestamp=t0),
        callback("transcode_stop", task_id="st-failed", stop_reason=1, timestamp=t0 + 9),
        callback(task_id="st-stopping", user_id="u-2", sequence=1, timestamp=t0),
    ]
    for task_id, owner in (("st-running", "u-1"), ("st-stopping", "u-2")):
        fake_server.fake.seed(task_id, owner, sequence=1, notify=False)
    for body in bodies:
        answer = requests.post(f"{live.base}/callbacks/zego", json=body, timeout=REQUEST_TIMEOUT)
        assert answer.status_code == 200, answer.text
    stop = requests.post(
        f"{live.base}/api/tasks/st-stopping/stop", headers=live.headers, timeout=REQUEST_TIMEOUT
    )
    assert stop.status_code == 200, stop.text
    subscribed = requests.post(
        f"{live.base}/api/subscriptions",
        json={"url": "http://127.0.0.1:9/events", "description": "schemathesis"},
        headers=live.headers,
        timeout=REQUEST_TIMEOUT,
    )
    assert subscribed.status_code == 201, subscribed.text


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_keeps_to_its_document(case: Case, live: Live) -> None:
    live.examples[case.operation.label] += 1
    case.call_and_validate(base_url=live.base, headers=live.headers, cookies=live.cookies)
