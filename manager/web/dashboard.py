"""GET / — the operator dashboard: sign in with a token, see tasks, stop them;
GET /tasks/<task_id> — one task, its runs, deliveries and stop requests;
GET /subscriptions — the outbound events' subscriptions and how each fares, each with
a page of its delivery log and a form that replays its events.

Only the token's name is kept in Flask's signed session cookie, and it is checked
against the database on every request, so revoking a token signs its sessions out.
Every POST form carries a per-session CSRF token.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Generator, Sequence
from datetime import date, datetime, time, timedelta
from itertools import islice
from typing import Any, cast

from flask import (
    Blueprint,
    Response,
    flash,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from markupsafe import Markup
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from manager.callbacks.rules import Ending
from manager.clock import utcnow
from manager.db import begin_write
from manager.errors import DomainError, Invalid, NotFound
from manager.events.health import Health, health_by_subscription, health_of
from manager.events.log import deliveries as delivery_log
from manager.events.replay import replay
from manager.events.subscriptions import event_types_of, get_subscription, list_subscriptions
from manager.models import ApiToken, Delivery, StopRequest, Subscription, Task
from manager.params import parse_time
from manager.reports import reporting
from manager.services import get_dispatcher, get_session, get_settings
from manager.stops.dispatch import stop_task_now
from manager.stops.requests import WAIT_REASON_TEXT
from manager.stored_text import text_problem
from manager.tasks.queries import MAX_ROW_ID, count_runs, find_task, task_deliveries, task_runs
from manager.tasks.shapes import run_end, run_seconds
from manager.vocabulary import StopState, TaskStatus, Verdict
from manager.web.api import TaskIdConverter
from manager.web.auth import sign_in
from manager.web.charts import daily_chart
from manager.web.edges import CONTENT_SECURITY_POLICY
from manager.web.openapi import SESSION, documented, form_body, html_answer, redirect_answer

CHART_DAYS = 14
DELIVERY_ROWS = 50
TASK_ROWS = 200
MAX_TASK_ID = 256  # tasks.task_id is a String(256)
STUCK_REASONS = {"no_stop_callback": "no stop callback", "no_delivery": "no callback"}
VERDICT_CLASSES = {"applied": "ok", "duplicate": "muted", "stale": "warn", "rejected": "bad"}
STOP_ROWS = 20
SEND_ROWS = 50  # a subscription page's latest sends; the API pages through the rest
ANSWER_CHARS = 120  # of an answer's kept first bytes, in the log's table (all in its title)
# What the replay form suggests: the last hour, the usual span of an outage.
REPLAY_SUGGESTION = timedelta(hours=1)
SEND_STATE_CLASSES = {"pending": "warn", "delivered": "ok", "failed": "bad"}
# An id no subscription can have (subscriptions.id is an Integer) is no route at all.
SUBSCRIPTION_ID = f"<int(min=1, max={MAX_ROW_ID}):subscription_id>"
# How a run ended, as the task page says it: (words, pill class, tooltip).
RUN_ENDS: dict[Ending | None, tuple[str, str, str]] = {
    None: ("running", "running", "still going"),
    Ending.STOPPED: ("stopped", "", "a stop callback with StopReason 0"),
    Ending.FAILED: ("failed", "bad", "ZEGOCLOUD stopped it (StopReason 1)"),
    Ending.UNSEEN: (
        "ended unseen",
        "warn",
        "no stop callback came: a later start showed that it had ended",
    ),
}

bp = Blueprint(
    "dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/dashboard/static",
)


# The pages work signed in (the session cookie) or not; the document says both.
SIGNED_IN_OR_NOT: list[dict[str, list[str]]] = [{SESSION: []}, {}]
TO_DASHBOARD = redirect_answer("To the dashboard, with a message to show there.")
CSRF_REFUSED = html_answer("The form's csrf field does not match the session's.")
# The task page's own 404 is a page; a path no route takes gets the JSON error.
NO_SUCH_TASK = {
    "description": "No such task (a page), or no such path (the JSON error).",
    "content": {
        "text/html": {"schema": {"type": "string"}},
        "application/json": {"schema": "Error"},
    },
}
NO_SUCH_SUBSCRIPTION = {
    "description": "No such subscription (a page), or no such path (the JSON error).",
    "content": NO_SUCH_TASK["content"],
}
CSRF_FIELD = {"csrf": "the session's CSRF token, from the page's form"}
TO_SIGN_IN = redirect_answer("Not signed in: to the sign-in page.")


@bp.record_once
def _register_converter(state: BlueprintSetupState) -> None:
    # The API's converter, whichever blueprint is registered first.
    state.app.url_map.converters.setdefault("task_id", TaskIdConverter)


# -- session, CSRF and the signed-in operator ------------------------------------------


def csrf_token() -> str:
    """This session's CSRF token, made on first use."""
    token = session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session["csrf"] = token
    return token


def task_url(task_id: str) -> str:
    """The task page's URL: /tasks/<task_id>, or /tasks?id=<task_id> for an id with a "."
    or ".." segment, which a browser would resolve away before sending the path."""
    if any(part in (".", "..") for part in task_id.split("/")):
        return url_for("dashboard.task_by_query", id=task_id)
    return url_for("dashboard.task", task_id=task_id)


@bp.app_context_processor
def _template_helpers() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "task_url": task_url}


@bp.app_template_filter("utc")
def format_utc(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


@bp.app_template_filter("utc_iso")
def format_utc_iso(value: str | None) -> str:
    """A time as the API writes it (ISO 8601, "Z"; the delivery log's) as `utc` shows one."""
    return format_utc(None if value is None else datetime.fromisoformat(value.removesuffix("Z")))


@bp.app_template_filter("ago")
def format_age(value: datetime | None, now: datetime) -> str:
    """A short duration from `value` to `now`: 45 s, 12 min, 3 h 5 min, 2 d 4 h."""
    if value is None:
        return "—"
    return format_duration(int((now - value).total_seconds()))


@bp.app_template_filter("duration")
def format_duration(seconds: int | None) -> str:
    """A number of seconds, shortly: 45 s, 12 min, 3 h 5 min, 2 d 4 h; None is a dash."""
    if seconds is None:
        return "—"
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


@bp.before_request
def _guard() -> Response | tuple[str, int] | None:
    if request.endpoint == "dashboard.static":
        return None
    if request.method == "POST":
        expected = session.get("csrf")
        given = request.form.get("csrf", "")
        if not isinstance(expected, str) or not hmac.compare_digest(
            expected.encode(), given.encode()
        ):
            return render_template("csrf_error.html"), 400
    g.operator = _current_operator()
    return None


def _current_operator() -> str | None:
    """The signed-in token's name, if that token is still active; else sign out."""
    name = session.get("operator")
    if not isinstance(name, str):
        return None
    db = get_session()
    active = db.execute(
        select(ApiToken.id).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
    ).first()
    db.rollback()  # end the read: a stop must begin its own write transaction
    if active is None:
        _sign_out()
        flash("Your token is no longer active; you have been signed out.", "error")
        return None
    return name


def _sign_in_first() -> ResponseReturnValue:
    """Where a page or form that needs an operator sends a visitor who is not signed in."""
    flash("Please sign in first.", "error")
    return redirect(url_for(".index"))


def _sign_out() -> None:
    session.clear()
    session["csrf"] = secrets.token_urlsafe(32)


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# -- views -------------------------------------------------------------------------------


@bp.get("/")
@documented(
    "The dashboard, or the sign-in page",
    security=SIGNED_IN_OR_NOT,
    responses={
        200: html_answer("Signed in: the dashboard; else the sign-in page."),
        503: "Unavailable",
    },
)
def index() -> str:
    if g.operator is None:
        return render_template("login.html")
    db = get_session()
    now = utcnow()
    app_id = get_settings().zego_app_id
    running, running_total = _tasks(db, app_id, TaskStatus.RUNNING)
    stopping, stopping_total = _tasks(db, app_id, TaskStatus.STOPPING)
    days = chart_days(db, now)
    page = render_template(
        "dashboard.html",
        now=now,
        running=running,
        running_total=running_total,
        stopping=stopping,
        stopping_total=stopping_total,
        stop_requests=_latest_stops(db, [t.id for t in stopping]),
        stuck=stuck_tasks(db, now),
        stuck_silent_hours=reporting.DEFAULT_SILENT_FOR // 3600,
        stopping_grace=int(reporting.STOPPING_GRACE.total_seconds()),
        deliveries=_deliveries(db, app_id),
        verdict_classes=VERDICT_CLASSES,
        stuck_reasons=STUCK_REASONS,
        chart=Markup(daily_chart(days)),  # noqa: S704 - charts.py escapes every text
        chart_days=days,
    )
    db.rollback()
    return page


@bp.get("/tasks/<task_id:task_id>", merge_slashes=False)
@documented(
    "One task's page",
    security=SIGNED_IN_OR_NOT,
    path_parameters={"task_id": {"description": "the task's TaskId; may hold slashes"}},
    responses={
        200: html_answer("The task's page."),
        302: TO_SIGN_IN,
        404: NO_SUCH_TASK,
        503: "Unavailable",
    },
)
def task(task_id: str) -> ResponseReturnValue:
    """One task: its state, every run (the latest TASK_ROWS), deliveries, stop requests."""
    if g.operator is None:
        return _sign_in_first()
    if not 0 < len(task_id) <= MAX_TASK_ID or text_problem(task_id) is not None:
        return render_template("task.html", task_id=task_id, task=None), 404
    db = get_session()
    try:
        found = find_task(db, task_id, get_settings().zego_app_id)
    except DomainError:
        db.rollback()
        return render_template("task.html", task_id=task_id, task=None), 404
    now = utcnow()
    runs = [
        (run, RUN_ENDS[run_end(run)], run_seconds(run, now))
        for run in reversed(task_runs(db, found, limit=TASK_ROWS))
    ]
    stops = db.execute(
        select(StopRequest)
        .where(StopRequest.task_pk == found.id)
        .order_by(StopRequest.id.desc())
        .limit(STOP_ROWS)
    ).scalars()
    page = render_template(
        "task.html",
        task_id=task_id,
        task=found,
        runs=runs,
        runs_total=count_runs(db, found) if len(runs) == TASK_ROWS else len(runs),
        deliveries=task_deliveries(db, found, limit=DELIVERY_ROWS),
        stop_requests=list(stops),
        verdict_classes=VERDICT_CLASSES,
    )
    db.rollback()
    return page


@bp.get("/tasks")
@documented(
    "One task's page, for a task id no path can carry",
    security=SIGNED_IN_OR_NOT,
    parameters=[
        {"in": "query", "name": "id", "schema": {"type": "string"}, "description": "the TaskId"}
    ],
    responses={
        200: html_answer("The task's page."),
        302: redirect_answer("No id, or not signed in: to the dashboard."),
        404: html_answer("No such task."),
        503: "Unavailable",
    },
)
def task_by_query() -> ResponseReturnValue:
    """/tasks?id=<task_id>: the task page for an id no path can carry (see task_url)."""
    task_id = request.args.get("id", "")
    if not task_id:
        return redirect(url_for(".index"))
    return task(task_id)


@bp.post("/login")
@documented(
    "Sign in with an API token",
    security=SIGNED_IN_OR_NOT,
    body=form_body({**CSRF_FIELD, "token": "an API token"}, ["csrf", "token"]),
    responses={302: TO_DASHBOARD, 400: CSRF_REFUSED, 503: "Unavailable"},
)
def login() -> ResponseReturnValue:
    token = request.form.get("token", "").strip()
    name = None
    if token:
        name = sign_in(token)
    if name is None:
        flash("That token is not valid, or it has been revoked.", "error")
        return redirect(url_for(".index"))
    session.clear()  # a fresh session: nothing from before signing in carries over
    session["operator"] = name
    session["csrf"] = secrets.token_urlsafe(32)
    flash(f"Signed in as {name}.", "ok")
    return redirect(url_for(".index"))


@bp.post("/logout")
@documented(
    "Sign out",
    security=SIGNED_IN_OR_NOT,
    body=form_body(CSRF_FIELD, ["csrf"]),
    responses={302: TO_DASHBOARD, 400: CSRF_REFUSED, 503: "Unavailable"},
)
def logout() -> ResponseReturnValue:
    _sign_out()
    flash("Signed out.", "ok")
    return redirect(url_for(".index"))


@bp.post("/stop")
@documented(
    "Stop a task, as POST /api/tasks/{task_id}/stop does",
    security=SIGNED_IN_OR_NOT,
    body=form_body(
        {
            **CSRF_FIELD,
            "task_id": "the task to stop",
            "back": "task: return to the task's page, not the dashboard",
        },
        ["csrf", "task_id"],
    ),
    responses={
        302: redirect_answer("Back to the page, with what happened (or why not) to show there."),
        400: CSRF_REFUSED,
        503: "Unavailable",
    },
)
def stop() -> ResponseReturnValue:
    """Stop one task like POST /api/tasks/<id>/stop, then say what happened."""
    if g.operator is None:
        return _sign_in_first()
    task_id = request.form.get("task_id", "")
    if not 0 < len(task_id) <= MAX_TASK_ID or text_problem(task_id) is not None:
        # Not a task id this service can hold; and the flash must fit in the cookie.
        flash("There is no such task.", "error")
        return redirect(url_for(".index"))
    # The task page's own button returns there; nothing else is taken from the form.
    back = task_url(task_id) if request.form.get("back") == "task" else url_for(".index")
    try:
        stop_request, created = stop_task_now(
            get_session(),
            get_dispatcher(),
            task_id,
            app_id=get_settings().zego_app_id,
            requested_by=g.operator,
            reason="stopped from the dashboard",
            force=False,
        )
    except DomainError as exc:
        get_session().rollback()
        flash(f"Could not stop {task_id}: {exc.message}.", "error")
        return redirect(back)
    message, category = stop_message(task_id, stop_request, created)
    flash(message, category)
    return redirect(back)


def stop_message(task_id: str, stop: StopRequest, created: bool) -> tuple[str, str]:
    """What the operator is told after pressing Stop, and the flash category."""
    zego = f"ZEGOCLOUD code {stop.last_code}" + (
        f": {stop.last_message}" if stop.last_message else ""
    )
    if stop.state == StopState.SUCCEEDED:
        if not created:
            return f"{task_id} was already stopping (Sequence {stop.sequence}).", "ok"
        return (
            f"Stop sent for {task_id}: ZEGOCLOUD accepted it (Sequence {stop.sequence}); "
            "the task is stopping.",
            "ok",
        )
    if stop.state == StopState.QUEUED:
        if not created:
            return f"A stop for {task_id} is already queued; the worker will send it.", "warn"
        detail = f" ({zego})" if stop.last_code is not None else ""
        if stop.wait_reason is not None:
            detail += f" ({WAIT_REASON_TEXT[stop.wait_reason]})"
        return f"Stop for {task_id} is queued for retry{detail}; the worker will send it.", "warn"
    return f"ZEGOCLOUD refused the stop for {task_id} ({zego}).", "error"


# -- outbound events' subscriptions ---------------------------------------------------------


@bp.get("/subscriptions")
@documented(
    "The outbound events' subscriptions, and how each fares",
    security=SIGNED_IN_OR_NOT,
    responses={
        200: html_answer("Every subscription with its sends by state; never a secret."),
        302: TO_SIGN_IN,
        503: "Unavailable",
    },
)
def subscriptions() -> ResponseReturnValue:
    """Every subscription (there are at most MAX_SUBSCRIPTIONS) with its health."""
    if g.operator is None:
        return _sign_in_first()
    db = get_session()
    health = health_by_subscription(db.connection())
    rows = [
        (sub, event_types_of(sub), health.get(sub.id, Health())) for sub in list_subscriptions(db)
    ]
    page = render_template(
        "subscriptions.html", now=utcnow(), rows=rows, state_classes=SEND_STATE_CLASSES
    )
    db.rollback()
    return page


@bp.get(f"/subscriptions/{SUBSCRIPTION_ID}")
@documented(
    "One subscription's page: its health, its latest sends and their attempts, a replay form",
    security=SIGNED_IN_OR_NOT,
    path_parameters={"subscription_id": {"description": "the subscription's id"}},
    responses={
        200: html_answer("The subscription's page; never its secret."),
        302: TO_SIGN_IN,
        404: NO_SUCH_SUBSCRIPTION,
        503: "Unavailable",
    },
)
def subscription(subscription_id: int) -> ResponseReturnValue:
    """One subscription: where it stands, its latest SEND_ROWS sends, and the replay form."""
    if g.operator is None:
        return _sign_in_first()
    db = get_session()
    found = _find_subscription(db, subscription_id)
    if found is None:
        return render_template("subscription.html", sub=None, sub_id=subscription_id), 404
    conn = db.connection()
    now = utcnow()
    page = render_template(
        "subscription.html",
        sub_id=subscription_id,
        sub=found,
        event_types=event_types_of(found),
        health=health_of(conn, found.id),
        sends=delivery_log(conn, found.id, limit=SEND_ROWS),
        now=now,
        replay_since=(now - REPLAY_SUGGESTION).strftime("%Y-%m-%dT%H:%M"),
        state_classes=SEND_STATE_CLASSES,
        answer_chars=ANSWER_CHARS,
    )
    db.rollback()
    return page


@bp.post(f"/subscriptions/{SUBSCRIPTION_ID}/replay")
@documented(
    "Send a subscription's events again, as `manager events replay` does",
    description="Every send of the subscription's events written since `since` that is no"
    " longer pending (delivered, or given up on) is pending again, with its webhook-id.",
    security=SIGNED_IN_OR_NOT,
    path_parameters={"subscription_id": {"description": "the subscription's id"}},
    body=form_body(
        {
            **CSRF_FIELD,
            "since": "replay the events written from this time on: ISO 8601 (UTC unless it"
            " says otherwise, as the form's datetime-local input sends it) or Unix seconds",
        },
        ["csrf", "since"],
    ),
    responses={
        302: redirect_answer(
            "Back to the subscription's page (to the list when there is no such"
            " subscription), with how many sends are pending again, or why none are."
        ),
        400: CSRF_REFUSED,
        404: "NotFound",  # an id no subscription can have: no such path
        503: "Unavailable",
    },
)
def replay_subscription(subscription_id: int) -> ResponseReturnValue:
    """Replay from the form's time on, then say how many sends are pending again."""
    if g.operator is None:
        return _sign_in_first()
    back = url_for(".subscription", subscription_id=subscription_id)
    try:
        since = parse_time("since", request.form.get("since", ""))
    except Invalid as exc:
        flash(f"Nothing was replayed: {exc.message}.", "error")
        return redirect(back)
    if since is None:
        flash("Nothing was replayed: give the time to replay from.", "error")
        return redirect(back)
    db = get_session()
    begin_write(db)  # a write from its first statement (SQLite: BEGIN IMMEDIATE)
    try:
        replayed = replay(db.connection(), subscription_id, since=since, now=utcnow())
    except NotFound:
        db.rollback()
        flash(f"There is no subscription {subscription_id}.", "error")
        return redirect(url_for(".subscriptions"))
    db.commit()
    flash(*replay_message(subscription_id, since, replayed.count, disabled=replayed.disabled))
    return redirect(back)


def replay_message(
    subscription_id: int, since: datetime, count: int, *, disabled: bool
) -> tuple[str, str]:
    """What the operator is told after a replay, and the flash category."""
    when = f"since {format_utc(since)} UTC"
    if count == 0:
        return (
            f"Nothing to replay for subscription {subscription_id} {when}: no event written"
            " since then was delivered or given up on.",
            "warn",
        )
    sends = "1 event is" if count == 1 else f"{count} events are"
    if disabled:
        return (
            f"{sends} pending again for subscription {subscription_id} ({when}); it is"
            " disabled, so they wait until it is enabled again.",
            "warn",
        )
    return (
        f"{sends} pending again for subscription {subscription_id} ({when}); the worker"
        " will send them, in order.",
        "ok",
    )


def _find_subscription(db: Session, subscription_id: int) -> Subscription | None:
    """The subscription, or None, its read ended, when there is no such one."""
    try:
        return get_subscription(db, subscription_id)
    except NotFound:
        db.rollback()
        return None


# -- reads --------------------------------------------------------------------------------


def _tasks(db: Session, app_id: int | None, status: str) -> tuple[list[Task], int]:
    query = select(Task).where(Task.status == status)
    count = select(func.count()).select_from(Task).where(Task.status == status)
    if app_id is not None:
        query = query.where(Task.app_id == app_id)
        count = count.where(Task.app_id == app_id)
    rows = list(db.execute(query.order_by(Task.id.desc()).limit(TASK_ROWS)).scalars())
    return rows, db.execute(count).scalar_one()


def _latest_stops(db: Session, task_pks: Sequence[int]) -> dict[int, StopRequest]:
    if not task_pks:
        return {}
    latest: dict[int, StopRequest] = {}
    rows = db.execute(
        select(StopRequest).where(StopRequest.task_pk.in_(task_pks)).order_by(StopRequest.id)
    ).scalars()
    for stop in rows:
        latest[stop.task_pk] = stop
    return latest


def stuck_tasks(db: Session, now: datetime) -> list[reporting.StuckTask]:
    """The stuck report (stopping with no stop callback, running gone silent), longest first."""
    rows = cast(
        Generator[reporting.StuckTask, None, None],
        reporting.stuck(db, now=now, silent_for=reporting.DEFAULT_SILENT_FOR),
    )
    try:
        return list(islice(rows, TASK_ROWS))
    finally:
        rows.close()  # the report streams from a server-side cursor


def _deliveries(db: Session, app_id: int | None) -> list[Delivery]:
    query = select(Delivery)
    if app_id is not None:
        # Rejected deliveries may carry no (or a wrong) AppId; show them too.
        query = query.where(or_(Delivery.app_id == app_id, Delivery.verdict == Verdict.REJECTED))
    return list(db.execute(query.order_by(Delivery.id.desc()).limit(DELIVERY_ROWS)).scalars())


def chart_days(db: Session, now: datetime, days: int = CHART_DAYS) -> list[tuple[date, int, float]]:
    """(UTC day, runs started, transcoding hours) for the last `days` days, today last."""
    since = datetime.combine((now - timedelta(days=days - 1)).date(), time())
    rows = reporting.daily(db, reporting.Window(since, now), now=now)
    return [
        (date.fromisoformat(row.day), row.started, round(row.transcoding_seconds / 3600, 2))
        for row in rows
    ]
