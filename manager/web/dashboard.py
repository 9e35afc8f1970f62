"""GET / — the operator dashboard: sign in with a token, see tasks, stop them;
GET /tasks/<task_id> — one task, its runs, deliveries and stop requests.

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
from manager.errors import DomainError
from manager.models import ApiToken, Delivery, StopRequest, Task
from manager.reports import reporting
from manager.services import get_dispatcher, get_session, get_settings
from manager.stops.dispatch import stop_task_now
from manager.stops.requests import WAIT_REASON_TEXT
from manager.stored_text import text_problem
from manager.tasks.queries import count_runs, find_task, task_deliveries, task_runs
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
CSRF_FIELD = {"csrf": "the session's CSRF token, from the page's form"}


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
        302: redirect_answer("Not signed in: to the sign-in page."),
        404: NO_SUCH_TASK,
        503: "Unavailable",
    },
)
def task(task_id: str) -> ResponseReturnValue:
    """One task: its state, every run (the latest TASK_ROWS), deliveries, stop requests."""
    if g.operator is None:
        flash("Please sign in first.", "error")
        return redirect(url_for(".index"))
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
        flash("Please sign in first.", "error")
        return redirect(url_for(".index"))
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
