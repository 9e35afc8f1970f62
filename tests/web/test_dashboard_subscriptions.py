"""The dashboard's subscriptions: a page of every subscription and its health, one page
per subscription with its delivery log, and the replay form."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Row, select, update
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.events.secrets import Sealer, new_key
from manager.events.subscriptions import create_subscription, rotate_secret
from manager.models import Event, EventAttempt, EventSend, Subscription
from manager.web.dashboard import replay_message

from ..conftest import callback
from .test_dashboard import csrf, section, send, sign_in

HOOK = "https://hooks.example/zego"
Send = Row[tuple[int, int, str, bool]]


@pytest.fixture
def sealer() -> Sealer:
    return Sealer((new_key(),))


def subscribe(db: Session, sealer: Sealer, url: str = HOOK, **fields: object) -> int:
    """A new subscription's id."""
    made = create_subscription(db, sealer, url=url, now=utcnow(), **fields)
    db.commit()
    return made.subscription.id


def start_and_stop(client: FlaskClient, task_id: str = "t-1", owner: str = "user-1") -> None:
    """A run of the task: task.started, then run.ended and task.stopped."""
    assert send(client, callback(task_id=task_id, user_id=owner, sequence=1)) == 200
    assert send(client, callback("transcode_stop", task_id=task_id, sequence=2)) == 200


def sends_of(db: Session, subscription_id: int) -> list[Send]:
    """The subscription's sends, oldest version first: id, event_id, state, replayed."""
    rows = db.execute(
        select(
            EventSend.id,
            EventSend.event_id,
            EventSend.state,
            EventSend.replayed_at.is_not(None).label("replayed"),
        )
        .where(EventSend.subscription_id == subscription_id)
        .order_by(EventSend.version)
    ).all()
    db.rollback()  # hold no snapshot (SQLite's WAL) past the read: the app writes next
    return list(rows)


def settle(db: Session, send: Send, state: str, *, written: datetime | None = None) -> None:
    """Give a send a state, as the worker would have left it, and its event a time."""
    db.execute(
        update(EventSend)
        .where(EventSend.id == send.id)
        .values(state=state, completed_at=None if state == "pending" else utcnow())
    )
    if written is not None:
        db.execute(update(Event).where(Event.id == send.event_id).values(created_at=written))
        db.execute(update(EventSend).where(EventSend.id == send.id).values(created_at=written))
    db.commit()


def settle_all(db: Session, subscription_id: int, state: str) -> None:
    for row in sends_of(db, subscription_id):
        settle(db, row, state)


def attempt(
    db: Session, send: Send, status: int | None, answer: str, ms: int, at: datetime
) -> None:
    """One POST of the send, and what came back: `answer` is the error when none did."""
    db.add(
        EventAttempt(
            send_id=send.id,
            attempted_at=at,
            status=status,
            error=None if status is not None else answer,
            answer=answer if status is not None else None,
            elapsed_ms=ms,
        )
    )
    db.execute(
        update(EventSend).where(EventSend.id == send.id).values(attempts=EventSend.attempts + 1)
    )
    db.commit()


def page(client: FlaskClient, path: str) -> str:
    response = client.get(path)
    assert response.status_code == 200, response.status_code
    return response.get_data(as_text=True)


def press_replay(client: FlaskClient, subscription_id: int, since: str) -> str:
    response = client.post(
        f"/subscriptions/{subscription_id}/replay",
        data={"since": since, "csrf": csrf(client)},
        follow_redirects=True,
    )
    assert response.status_code == 200
    return response.get_data(as_text=True)


def row_of(table: str, subscription_id: int) -> str:
    match = re.search(
        rf'<tr>\s*<td class="num"><a href="/subscriptions/{subscription_id}">.*?</tr>',
        table,
        re.S,
    )
    assert match, f"no row for subscription {subscription_id}"
    return re.sub(r"</?strong>", "", match.group(0))


def cells(row: str) -> list[str]:
    """The row's cells as text, tags and surrounding space removed."""
    return [
        re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", cell)).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
    ]


# -- the list ----------------------------------------------------------------------------


def test_the_list_shows_each_subscription_with_its_health(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    every = subscribe(db, sealer, description="all of it")
    picky = subscribe(
        db,
        sealer,
        "https://other.example/hook",
        owner="user-1",
        event_types=["task.stopped", "run.ended"],
    )
    start_and_stop(client)
    started, ended, stopped = sends_of(db, every)
    two_hours_ago = utcnow() - timedelta(hours=2)
    settle(db, started, "delivered")
    settle(db, ended, "failed")
    settle(db, stopped, "pending", written=two_hours_ago)
    failing = utcnow() - timedelta(hours=5)
    db.execute(
        update(Subscription)
        .where(Subscription.id == every)
        .values(failing_since=failing, last_success_at=two_hours_ago)
    )
    db.execute(
        update(Subscription)
        .where(Subscription.id == picky)
        .values(disabled_at=utcnow(), disabled_reason="410 Gone: the receiver wants no more")
    )
    db.execute(
        update(EventSend)
        .where(EventSend.subscription_id == picky)
        .values(created_at=utcnow() - timedelta(minutes=30))
    )
    db.commit()
    sign_in(client, token)

    shown = page(client, "/subscriptions")
    counts = re.sub(r"</?strong>", "", shown)
    assert "2 subscriptions" in counts
    assert "3 events pending" in counts
    table = section(shown, "subscriptions")
    assert cells(row_of(table, every)) == [
        str(every),
        HOOK,
        "failing",
        failing.strftime("%Y-%m-%d %H:%M:%S"),
        two_hours_ago.strftime("%Y-%m-%d %H:%M:%S"),
        "every type",
        "every owner",
        "1",
        "1",
        "1",
        "2 h",
    ]
    picky_cells = cells(row_of(table, picky))
    assert picky_cells[1] == "https://other.example/hook"
    assert picky_cells[2].startswith("disabled ")
    assert picky_cells[2].endswith(": 410 Gone: the receiver wants no more")
    assert picky_cells[5:] == ["task.stopped, run.ended", "user-1", "2", "0", "0", "30 min"]


def test_an_enabled_subscription_with_nothing_sent_reads_zero(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    sign_in(client, token)
    shown = page(client, "/subscriptions")
    counts = re.sub(r"</?strong>", "", shown)
    assert "1 subscription</span>" in counts
    assert "0 events pending" in counts
    row = cells(row_of(section(shown, "subscriptions"), sub))
    assert row[2:] == ["enabled", "—", "—", "every type", "every owner", "0", "0", "0", "—"]


def test_no_subscriptions_says_how_to_add_one(client: FlaskClient, token: str) -> None:
    sign_in(client, token)
    assert "No subscriptions yet" in page(client, "/subscriptions")


def test_the_navigation_links_the_pages(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    assert 'href="/subscriptions"' not in page(client, "/")  # signed out: no navigation
    signed_in = sign_in(client, token)
    assert '<a href="/subscriptions">Subscriptions</a>' in signed_in
    assert '<a href="/" aria-current="page">Tasks</a>' in signed_in
    listing = page(client, "/subscriptions")
    assert '<a href="/subscriptions" aria-current="page">Subscriptions</a>' in listing
    assert f'href="/subscriptions/{sub}"' in listing


# -- one subscription ----------------------------------------------------------------------


def test_the_page_shows_the_delivery_log_with_every_attempt(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer, owner="user-1", event_types=["task.started"])
    start_and_stop(client, "t-9")
    [started] = sends_of(db, sub)
    first = utcnow() - timedelta(minutes=3)
    attempt(db, started, None, "ConnectTimeout: no answer in 5 s", 5003, first)
    attempt(db, started, 500, '{"error": "' + "x" * 300 + '"}', 812, first + timedelta(minutes=1))
    last = first + timedelta(minutes=2)
    attempt(db, started, 200, "thanks", 42, last)
    settle(db, started, "delivered")
    sign_in(client, token)

    shown = page(client, f"/subscriptions/{sub}")
    facts = section(shown, "subscription")
    assert HOOK in facts
    assert "task.started" in facts
    assert "user-1" in facts
    assert '<span class="pill ok">enabled</span>' in facts
    health = re.sub(r"</?strong>", "", section(shown, "health"))
    assert "0 pending" in health
    assert "1 delivered" in health
    assert "0 failed" in health
    log = section(shown, "sends")
    newest = re.search(r"<tbody>\s*(<tr>.*?</tr>)", log, re.S)
    assert newest
    assert cells(newest[1])[1:] == [
        "task.started",
        "t-9",
        "1",
        "delivered",
        "3",
        "HTTP 200 " + last.strftime("%Y-%m-%d %H:%M:%S"),
        "42 ms",
        "thanks",
    ]
    assert '<a href="/tasks/t-9">t-9</a>' in log
    assert f'title="evt_{started.event_id}"' in log
    every = log.split("Every attempt (3)", 1)[1]
    assert "no answer" in every
    assert "ConnectTimeout: no answer in 5 s" in every
    assert "5003 ms" in every
    assert "HTTP 500" in every
    assert "812 ms" in every
    assert "x" * 300 not in every  # first bytes, cut short
    assert "x" * 100 in every


def test_the_page_of_a_disabled_subscription_says_why(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    db.execute(
        update(Subscription)
        .where(Subscription.id == sub)
        .values(disabled_at=utcnow(), disabled_reason="failing for 3 days")
    )
    db.commit()
    sign_in(client, token)
    shown = page(client, f"/subscriptions/{sub}")
    assert '<span class="pill bad">disabled</span>' in section(shown, "subscription")
    assert "failing for 3 days" in section(shown, "subscription")
    assert "wait until it is enabled again" in section(shown, "replay")
    assert "Nothing sent to this subscription yet." in section(shown, "sends")


def test_an_unknown_subscription_is_not_found(client: FlaskClient, token: str) -> None:
    sign_in(client, token)
    response = client.get("/subscriptions/4242")
    assert response.status_code == 404
    assert "There is no subscription 4242." in response.get_data(as_text=True)
    for path in ("/subscriptions/0", f"/subscriptions/{2**31}", "/subscriptions/x"):
        answer = client.get(path)
        assert answer.status_code == 404  # no such path: the JSON error
        assert answer.json is not None
        assert answer.json["error"]["code"] == "not_found"


def test_the_pages_need_a_signed_in_operator(
    client: FlaskClient, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    for path in ("/subscriptions", f"/subscriptions/{sub}"):
        response = client.get(path)
        assert response.status_code == 302
        assert response.headers["Location"] == "/"
    shown = client.get(f"/subscriptions/{sub}", follow_redirects=True).get_data(as_text=True)
    assert "Please sign in first." in shown
    assert HOOK not in shown


def test_no_secret_is_shown_anywhere(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    made = create_subscription(db, sealer, url=HOOK, now=utcnow())
    sub = made.subscription.id
    rotated = rotate_secret(db, sealer, sub, now=utcnow())
    sealed = [rotated.subscription.secret_encrypted, rotated.subscription.previous_secret_encrypted]
    db.commit()
    start_and_stop(client)
    sign_in(client, token)
    hidden = [made.secret, rotated.secret, *sealed]
    for path in ("/", "/subscriptions", f"/subscriptions/{sub}"):
        shown = page(client, path)
        for secret in hidden:
            assert secret is not None
            assert secret not in shown
            assert secret[6:20] not in shown  # not even a piece of one
        assert "whsec_" not in shown


def test_what_a_subscription_says_is_escaped(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(
        db, sealer, "https://evil.example/<script>x</script>", description="<b>bold</b>"
    )
    sign_in(client, token)
    for path in ("/subscriptions", f"/subscriptions/{sub}"):
        shown = page(client, path)
        assert "<script>" not in shown
        assert "&lt;script&gt;x&lt;/script&gt;" in shown
    assert "&lt;b&gt;bold&lt;/b&gt;" in page(client, f"/subscriptions/{sub}")


# -- replay ----------------------------------------------------------------------------------


def test_replay_makes_what_was_sent_since_pending_again(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    other = subscribe(db, sealer, "https://other.example/hook")
    start_and_stop(client)
    started, ended, stopped = sends_of(db, sub)
    yesterday = utcnow() - timedelta(days=1)
    settle(db, started, "delivered", written=yesterday)
    settle(db, ended, "delivered")
    settle(db, stopped, "failed")
    settle_all(db, other, "delivered")
    sign_in(client, token)
    form = section(page(client, f"/subscriptions/{sub}"), "replay")
    assert f'action="/subscriptions/{sub}/replay"' in form
    assert 'name="csrf" value="' in form
    assert 'type="datetime-local"' in form

    since = utcnow() - timedelta(hours=1)
    shown = press_replay(client, sub, since.strftime("%Y-%m-%dT%H:%M:%S"))
    assert f"2 events are pending again for subscription {sub}" in shown
    assert 'class="flash ok"' in shown
    assert "Subscription " + str(sub) in shown  # back on its page
    states = {s.id: (s.state, s.replayed) for s in sends_of(db, sub)}
    assert states == {
        started.id: ("delivered", False),  # written before `since`
        ended.id: ("pending", True),
        stopped.id: ("pending", True),
    }
    assert {s.state for s in sends_of(db, other)} == {"delivered"}  # not this one's


def test_replay_with_nothing_to_send_again_says_so(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    start_and_stop(client)  # every send still pending
    sign_in(client, token)
    shown = press_replay(client, sub, "2020-01-01T00:00")
    assert f"Nothing to replay for subscription {sub} since 2020-01-01 00:00:00 UTC" in shown
    assert 'class="flash warn"' in shown


@pytest.mark.parametrize(
    ("since", "message"),
    [
        ("", "give the time to replay from"),
        ("yesterday", "since must be ISO 8601 or Unix seconds"),
        ("9999-01-01T00:00", "since must be from 1970-01-01 to 9000-01-01"),
    ],
)
def test_replay_needs_a_valid_time(
    client: FlaskClient, token: str, db: Session, sealer: Sealer, since: str, message: str
) -> None:
    sub = subscribe(db, sealer)
    start_and_stop(client)
    settle_all(db, sub, "delivered")
    sign_in(client, token)
    shown = press_replay(client, sub, since)
    assert f"Nothing was replayed: {message}." in shown
    assert 'class="flash error"' in shown
    assert {s.state for s in sends_of(db, sub)} == {"delivered"}


def test_replay_of_an_unknown_subscription_returns_to_the_list(
    client: FlaskClient, token: str
) -> None:
    sign_in(client, token)
    shown = press_replay(client, 4242, "2020-01-01T00:00")
    assert "There is no subscription 4242." in shown
    assert '<section class="card" id="subscriptions">' in shown


@pytest.mark.parametrize("given", [None, "", "forged"])
def test_replay_needs_the_session_csrf_token(
    client: FlaskClient, token: str, db: Session, sealer: Sealer, given: str | None
) -> None:
    sub = subscribe(db, sealer)
    start_and_stop(client)
    settle_all(db, sub, "delivered")
    sign_in(client, token)
    form = {"since": "2020-01-01T00:00"} | ({} if given is None else {"csrf": given})
    response = client.post(f"/subscriptions/{sub}/replay", data=form)
    assert response.status_code == 400
    assert "That form has expired" in response.get_data(as_text=True)
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    assert {s.state for s in sends_of(db, sub)} == {"delivered"}


def test_replay_needs_a_signed_in_operator(
    client: FlaskClient, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    start_and_stop(client)
    settle_all(db, sub, "delivered")
    shown = press_replay(client, sub, "2020-01-01T00:00")  # the session's CSRF, no sign-in
    assert "Please sign in first." in shown
    assert 'name="token"' in shown
    assert {s.state for s in sends_of(db, sub)} == {"delivered"}


def test_the_pages_keep_the_dashboards_headers(
    client: FlaskClient, token: str, db: Session, sealer: Sealer
) -> None:
    sub = subscribe(db, sealer)
    sign_in(client, token)
    for path in ("/subscriptions", f"/subscriptions/{sub}"):
        headers = client.get(path).headers
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert headers["X-Frame-Options"] == "DENY"
        assert "no-store" in headers["Cache-Control"]


@pytest.mark.parametrize(
    ("count", "disabled", "words", "category"),
    [
        (0, False, "Nothing to replay for subscription 7 since 2024-05-14 12:00:00 UTC", "warn"),
        (0, True, "Nothing to replay", "warn"),
        (1, False, "1 event is pending again for subscription 7", "ok"),
        (3, False, "3 events are pending again for subscription 7", "ok"),
        (3, True, "it is disabled, so they wait until it is enabled again", "warn"),
    ],
)
def test_replay_message(count: int, disabled: bool, words: str, category: str) -> None:
    message, got = replay_message(7, datetime(2024, 5, 14, 12), count, disabled=disabled)
    assert words in message
    assert got == category
