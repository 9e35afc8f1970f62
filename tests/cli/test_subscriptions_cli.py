"""`manager subscriptions` and `manager events replay`: the secret printed once, the
table and its JSON, disable, enable, rotation, a new key, and replay."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace

import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from manager import create_app, dispose_engines, main
from manager.clock import utcnow
from manager.config import Settings
from manager.events.secrets import Sealer, new_key
from manager.models import EventSend, Subscription
from manager.vocabulary import SendState

from ..conftest import callback

KEY = new_key()
SECRET = re.compile(r"^secret: (whsec_\S+)$", re.MULTILINE)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, subscription_keys=(KEY,))


@pytest.fixture
def keyless(settings: Settings, app: Flask) -> Iterator[FlaskCliRunner]:
    """The CLI of an app on the same database without SUBSCRIPTION_KEY."""
    other = create_app(replace(settings, subscription_keys=()))
    yield other.test_cli_runner()
    dispose_engines(other)


def create(runner: FlaskCliRunner, *args: str) -> tuple[int, str]:
    """Subscribe; the new id and secret."""
    result = runner.invoke(args=["subscriptions", "create", *args])
    assert result.exit_code == 0, result.output
    found_id = re.search(r"^id: (\d+)$", result.stdout, re.MULTILINE)
    found_secret = SECRET.search(result.stdout)
    assert found_id, result.stdout
    assert found_secret, result.stdout
    return int(found_id[1]), found_secret[1]


def test_create_prints_the_secret_once(runner: FlaskCliRunner, db: Session) -> None:
    result = runner.invoke(
        args=[
            "subscriptions",
            "create",
            "https://example.test/hook",
            "--events",
            "task.started,task.stopped",
            "--events",
            "run.ended",
            "--owner",
            "user-1",
            "--description",
            "billing",
        ]
    )
    assert result.exit_code == 0, result.output
    found = SECRET.search(result.stdout)
    assert found, result.stdout
    secret = found[1]
    assert "not shown again" in result.stderr

    stored = db.scalars(select(Subscription)).one()
    assert f"id: {stored.id}" in result.stdout
    assert stored.event_types == ",task.started,task.stopped,run.ended,"
    assert (stored.owner, stored.description) == ("user-1", "billing")
    assert secret not in stored.secret_encrypted
    assert Sealer((KEY,)).open(stored.secret_encrypted) == secret

    listed = runner.invoke(args=["subscriptions", "list"])
    assert listed.exit_code == 0, listed.output
    assert secret not in listed.output
    header, _, row = listed.stdout.splitlines()
    assert header.split() == [
        "id",
        "url",
        "enabled",
        "types",
        "owner",
        "pending/delivered/failed",
        "failing_since",
    ]
    assert row.split() == [
        str(stored.id),
        "https://example.test/hook",
        "yes",
        "task.started,task.stopped,run.ended",
        "user-1",
        "0/0/0",
    ]


def test_list_as_json_is_what_the_api_shows(
    runner: FlaskCliRunner, client: FlaskClient, auth: dict[str, str]
) -> None:
    sub_id, secret = create(runner, "https://example.test/a")
    create(runner, "https://example.test/b", "--events", "task.failed")
    client.post("/callbacks/zego", json=callback())  # task.started: pending for /a
    result = runner.invoke(args=["subscriptions", "list", "--json"])
    assert result.exit_code == 0, result.output
    assert secret not in result.output
    rows = json.loads(result.stdout)
    assert [r["event_types"] for r in rows] == [None, ["task.failed"]]
    assert rows[0]["id"] == sub_id
    assert rows[0]["health"]["pending"] == 1
    assert rows[1]["health"]["pending"] == 0
    api = client.get("/api/subscriptions", headers=auth).json["subscriptions"]
    for shown in (rows, api):
        for row in shown:
            row["health"].pop("oldest_pending_seconds")  # a moment apart
    assert rows == api


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["ftp://example.test/"], "url"),
        (["https://example.test/", "--events", "task.exploded"], "task.exploded"),
        (["https://example.test/", "--events", ","], "event type"),
        (["https://example.test/", "--owner", ""], "owner"),
        (["https://example.test/", "--description", "d" * 501], "description"),
    ],
)
def test_bad_input_exits_2_naming_it(runner: FlaskCliRunner, args: list[str], named: str) -> None:
    result = runner.invoke(args=["subscriptions", "create", *args])
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert "Traceback" not in result.output


def committed(db: Session, sub_id: int) -> Subscription:
    """The subscription as committed now: a read transaction of its own."""
    db.rollback()
    sub = db.get(Subscription, sub_id)
    assert sub is not None
    return sub


def test_disable_enable_and_rotate(runner: FlaskCliRunner, db: Session) -> None:
    sub_id, secret = create(runner, "https://example.test/")
    off = runner.invoke(args=["subscriptions", "disable", str(sub_id), "--reason", "moving"])
    assert off.exit_code == 0, off.output
    assert f"subscription {sub_id} disabled" in off.stdout
    assert committed(db, sub_id).disabled_at is not None
    assert committed(db, sub_id).disabled_reason == "moving"
    listed = runner.invoke(args=["subscriptions", "list"]).stdout.splitlines()[2]
    assert listed.split()[2] == "no"

    on = runner.invoke(args=["subscriptions", "enable", str(sub_id)])
    assert on.exit_code == 0, on.output
    assert committed(db, sub_id).disabled_at is None

    default = runner.invoke(args=["subscriptions", "disable", str(sub_id)])
    assert default.exit_code == 0, default.output
    assert (committed(db, sub_id).disabled_reason or "").startswith("disabled by cli:")

    rotated = runner.invoke(args=["subscriptions", "rotate-secret", str(sub_id)])
    assert rotated.exit_code == 0, rotated.output
    found = SECRET.search(rotated.stdout)
    assert found, rotated.stdout
    assert found[1] != secret
    assert "not shown again" in rotated.stderr
    sub = committed(db, sub_id)
    assert Sealer((KEY,)).open(sub.secret_encrypted) == found[1]
    assert sub.previous_secret_until is not None


@pytest.mark.parametrize("command", ["disable", "enable", "rotate-secret"])
def test_unknown_subscriptions(runner: FlaskCliRunner, command: str) -> None:
    unknown = runner.invoke(args=["subscriptions", command, "4242"])
    assert unknown.exit_code == 1, unknown.output
    assert "no subscription 4242" in unknown.output
    for impossible in ("0", str(2**31), "x"):
        bad = runner.invoke(args=["subscriptions", command, impossible])
        assert bad.exit_code == 2, bad.output


def test_without_a_key_no_secret_is_made(keyless: FlaskCliRunner) -> None:
    result = keyless.invoke(args=["subscriptions", "create", "https://example.test/"])
    assert result.exit_code == 1
    assert "SUBSCRIPTION_KEY is not set" in result.output
    assert "whsec_" not in result.output


def test_new_key_needs_no_configuration() -> None:
    """It is what a missing or broken SUBSCRIPTION_KEY asks for: no app is made."""
    result = CliRunner().invoke(
        main,
        ["subscriptions", "new-key"],
        env={"SUBSCRIPTION_KEY": "not-a-key", "DATABASE_URL": "mysql://nowhere/db"},
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    Fernet(key)  # a valid key
    assert key != new_key()


def test_events_replay(runner: FlaskCliRunner, client: FlaskClient, db: Session) -> None:
    sub_id, _ = create(runner, "https://example.test/")
    for body in (callback(sequence=1), callback("transcode_stop", sequence=2)):
        assert client.post("/callbacks/zego", json=body).status_code == 200
    db.execute(update(EventSend).values(state=SendState.DELIVERED.value, completed_at=utcnow()))
    db.commit()
    sent = len(db.scalars(select(EventSend)).all())
    db.rollback()
    assert sent >= 2

    args = ["events", "replay", "--subscription", str(sub_id), "--since"]
    result = runner.invoke(args=[*args, "2020-01-01T00:00:00Z"])
    assert result.exit_code == 0, result.output
    assert f"{sent} sends pending again for subscription {sub_id}" in result.stdout
    db.rollback()
    assert {s.state for s in db.scalars(select(EventSend))} == {SendState.PENDING}
    again = runner.invoke(args=[*args, "1577836800"])  # Unix seconds
    assert again.stdout.startswith("0 sends pending again")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--subscription", "4242", "--since", "2020-01-01"], 1),
        (["--subscription", "1", "--since", "last week"], 2),
        (["--subscription", "1", "--since", ""], 2),
        (["--subscription", "1"], 2),
        (["--since", "2020-01-01"], 2),
    ],
)
def test_events_replay_refuses(runner: FlaskCliRunner, args: list[str], code: int) -> None:
    result = runner.invoke(args=["events", "replay", *args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
