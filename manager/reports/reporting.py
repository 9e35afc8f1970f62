"""The reports of SPEC 3.4, computed by SQL aggregation on SQLite and PostgreSQL alike.

Every function takes a Session, never commits and never imports Flask. Times are naive
UTC. A window is [since, until), each end optional. Durations are computed exactly, in
microseconds (PostgreSQL sums intervals, SQLite integer microseconds), and rounded in
Python, so both databases give the same numbers.

A run's time counts from its start to its end, or to `now` while it is still going; a
run whose start never arrived counts no time. The list reports (`owners`, `stuck`)
yield their rows from a server-side cursor: iterate them while the session is open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import date, datetime, time, timedelta
from operator import attrgetter
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Date,
    DateTime,
    Engine,
    Integer,
    Interval,
    Select,
    String,
    and_,
    case,
    cast,
    extract,
    func,
    literal,
    null,
    or_,
    select,
    text,
    type_coerce,
    union_all,
)
from sqlalchemy.orm import Session

from manager.callbacks.rules import FAILED_ON_ITS_OWN
from manager.clock import utcnow
from manager.models import (
    STOP_STATES,
    TASK_STATUSES,
    VERDICTS,
    Delivery,
    StopRequest,
    Task,
    TaskRun,
)
from manager.reports import rollups

REPORTS = ("summary", "owners", "daily", "stuck")
STOPPING_GRACE = timedelta(seconds=120)
DEFAULT_SILENT_FOR = 86400
DEFAULT_DAYS = 30
MAX_DAYS = 3660
OWNERS_LIMIT = 100  # owners listed by default where a list is read, not exported
MAX_OWNERS_LIMIT = 10_000
STREAM_BATCH = 2000
_US = 1_000_000
_DAY_US = 86400 * _US

FAILED = FAILED_ON_ITS_OWN  # task_runs.stop_reason of a run ZEGOCLOUD ended on its own

# How an ended run ended, read off its stop_reason as the task's status is: StopReason 1
# failed, any other stopped; none at all, it ended unseen (a later start showed that it
# had ended, its stop callback never came). Every ended run is exactly one of the three.
RUN_FAILED = TaskRun.stop_reason == FAILED
RUN_STOPPED = TaskRun.stop_reason != FAILED  # NULL compares to neither
RUN_ENDED_UNSEEN = TaskRun.stop_reason.is_(None)


@dataclass(frozen=True)
class Window:
    """[since, until); None leaves that end open."""

    since: datetime | None = None
    until: datetime | None = None

    def contains(self, column: Any) -> ColumnElement[bool]:
        conditions = [column.is_not(None)]
        if self.since is not None:
            conditions.append(column >= _ts(self.since))
        if self.until is not None:
            conditions.append(column < _ts(self.until))
        return and_(*conditions)


@dataclass(frozen=True)
class OwnerRow:
    owner: str | None
    tasks: int
    running: int
    failed: int
    transcoding_seconds: int


@dataclass(frozen=True)
class OwnerKey:
    """Where a page of owners ends: its last owner's exact transcoding time, and name."""

    busy_us: int
    owner: str | None


@dataclass(frozen=True)
class OwnersPage:
    """The first owners of a listing, and the key of the last one when more follow."""

    owners: list[OwnerRow]
    next_key: OwnerKey | None

    @property
    def more(self) -> bool:
        return self.next_key is not None


@dataclass(frozen=True)
class DayRow:
    day: str
    started: int
    stopped: int
    failed: int
    ended_unseen: int
    transcoding_seconds: int


@dataclass(frozen=True)
class StuckTask:
    task_id: str
    owner: str | None
    status: str
    since: datetime
    reason: str


COLUMNS: dict[str, tuple[str, ...]] = {
    "owners": tuple(f.name for f in fields(OwnerRow)),
    "daily": tuple(f.name for f in fields(DayRow)),
    "stuck": tuple(f.name for f in fields(StuckTask)),
}
# Any select, whatever its columns.
_Query: TypeAlias = Select[*tuple[Any, ...]]

LIST_KEYS = {"owners": "owners", "daily": "days", "stuck": "tasks"}
# One getter per row type, built once: a million-row export calls it a million times.
_FIELD_GETTERS = {
    kind: attrgetter(*(f.name for f in fields(kind))) for kind in (OwnerRow, DayRow, StuckTask)
}


# --- summary ------------------------------------------------------------------------------


def summary(
    session: Session,
    window: Window | None = None,
    owner: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Task states, runs started/ended, failure rate, run durations, stops and deliveries.

    `tasks` counts the tasks with a run that overlaps the window, the runs `owners`
    reports on, by their status now; `ended` = stopped + failed + `ended_unseen`.
    """
    window = window or Window()
    now = now or utcnow()
    sql = _Dialect(session)

    tasks = _tasks_by_status(session, window, now, owner)

    started_query = select(func.count()).where(window.contains(TaskRun.started_at))
    if owner is not None:
        started_query = started_query.where(TaskRun.owner == owner)
    started = session.execute(started_query).scalar_one()

    ended, failed, unseen, durations = _ended_runs(session, sql, window, owner)

    stops_query = select(StopRequest.state, func.count()).group_by(StopRequest.state)
    stops_query = stops_query.where(window.contains(StopRequest.created_at))
    if owner is not None:
        stops_query = stops_query.where(StopRequest.user_id == owner)
    stops = _counts(session, stops_query)

    if owner is None:
        verdicts = _delivery_counts(session, window, now)
    else:
        owned = select(Task.id).where(Task.owner == owner).scalar_subquery()
        in_window = [window.contains(Delivery.received_at), Delivery.task_pk.in_(owned)]
        verdicts = _counts_each(session, Delivery.verdict, VERDICTS, in_window)

    return {
        "tasks": tasks,
        "started": started,
        "ended": ended,
        "ended_unseen": unseen,
        "failure_rate": round(failed / ended, 4) if ended else 0,
        "duration_seconds": durations,
        "stop_requests": {state: stops.get(state, 0) for state in STOP_STATES},
        "deliveries": verdicts,
    }


def _tasks_by_status(
    session: Session, window: Window, now: datetime, owner: str | None
) -> dict[str, int]:
    """Tasks with a run in the window (the runs `owners` reports on), by status, and all.

    Joining every run of a long window to its task costs more than the rest of summary
    together, so the tasks are counted from the runs alone, and only the few that are
    not `stopped` (the status most tasks end in) are looked up, each status a range of
    the index that leads with it. Every run has its task and every task one of the
    statuses (a foreign key and a check constraint): the stopped ones are the rest.
    """
    total_query = _runs_in(select(func.count(TaskRun.task_pk.distinct())), window, now, owner)
    total = int(session.execute(total_query).scalar_one())
    has_run = _runs_in(select(TaskRun.id), window, now, owner).where(TaskRun.task_pk == Task.id)
    others = tuple(status for status in TASK_STATUSES if status != "stopped")
    counts = _counts_each(session, Task.status, others, [has_run.exists()])
    counts["stopped"] = total - sum(counts.values())
    return {**{status: counts[status] for status in TASK_STATUSES}, "total": total}


def _delivery_counts(session: Session, window: Window, now: datetime) -> dict[str, int]:
    """Deliveries per verdict: whole final hours from delivery_hours, the ends counted."""
    bind = session.get_bind()
    hours = (
        rollups.hour_counts(bind, window.since, window.until, now)
        if isinstance(bind, Engine)
        else None
    )
    if hours is None:
        in_window = [window.contains(Delivery.received_at)]
        return _counts_each(session, Delivery.verdict, VERDICTS, in_window)
    before = [Delivery.received_at < _ts(hours.start)]
    after = [Delivery.received_at >= _ts(hours.end)]
    if window.since is not None:
        before.append(Delivery.received_at >= _ts(window.since))
    if window.until is not None:
        after.append(Delivery.received_at < _ts(window.until))
    ends = _counts_each(session, Delivery.verdict, VERDICTS, before, after)
    return {verdict: ends[verdict] + hours.counts[verdict] for verdict in VERDICTS}


def _ended_runs(
    session: Session, sql: _Dialect, window: Window, owner: str | None
) -> tuple[int, int, int, dict[str, float | None]]:
    """Runs ended in the window: how many, how many failed, how many ended unseen, and
    their durations.

    Percentiles are nearest-rank: the value at rank ceil(p/100 * n) of the n durations
    in ascending order. PostgreSQL reads each rank off its index on the run length;
    SQLite picks the ranks out with ROW_NUMBER(). Both give exact microseconds.
    """
    conditions = [window.contains(TaskRun.ended_at)]
    if owner is not None:
        conditions.append(TaskRun.owner == owner)
    if sql.pg:
        return _ended_runs_pg(session, sql, conditions)
    # A stop may carry a Timestamp before its run's start: such a run lasted 0 s, as in
    # owners and daily.
    duration = case(
        (
            TaskRun.started_at.is_not(None),
            sql.greatest(sql.span(TaskRun.started_at, TaskRun.ended_at), sql.zero),
        ),
        else_=null(),
    )
    inner = select(
        TaskRun.stop_reason.label("stop_reason"),
        duration.label("d"),
    ).where(*conditions)
    ended = inner.subquery("ended")
    # The count comes first, from its own aggregate: COUNT(*) OVER () would hold every
    # row in memory until the last one is read.
    count, failed, unseen, timed, total_us = session.execute(
        select(
            func.count(),
            func.coalesce(func.sum(case((ended.c.stop_reason == FAILED, 1), else_=0)), 0),
            func.count() - func.count(ended.c.stop_reason),
            func.count(ended.c.d),
            sql.total_us(func.sum(ended.c.d)),
        )
    ).one()
    ranks = {percent: (percent * timed + 99) // 100 for percent in (50, 95)}
    at_rank: dict[int, int] = {}
    if timed:
        ranked = (
            select(ended.c.d, func.row_number().over(order_by=ended.c.d).label("rn"))
            .where(ended.c.d.is_not(None))
            .subquery("ranked")
        )
        picked = select(ranked.c.rn, sql.total_us(ranked.c.d)).where(
            ranked.c.rn.in_(sorted(set(ranks.values())))
        )
        at_rank = {int(rn): int(us) for rn, us in session.execute(picked)}
    durations: dict[str, float | None] = {"mean": None, "p50": None, "p95": None}
    if timed:
        durations = {
            "mean": round(int(total_us) / timed / _US, 3),
            "p50": round(at_rank[ranks[50]] / _US, 3),
            "p95": round(at_rank[ranks[95]] / _US, 3),
        }
    return int(count), int(failed), int(unseen), durations


def _ended_runs_pg(
    session: Session, sql: _Dialect, conditions: list[ColumnElement[bool]]
) -> tuple[int, int, int, dict[str, float | None]]:
    span = TaskRun.ended_at - TaskRun.started_at  # NULL without a start
    count, failed, unseen, timed, total_us = session.execute(
        select(
            func.count(),
            func.count().filter(RUN_FAILED),
            func.count().filter(RUN_ENDED_UNSEEN),
            func.count(TaskRun.started_at),
            sql.total_us(func.sum(sql.greatest(span, sql.zero))),
        ).where(*conditions)
    ).one()
    if not timed:
        nothing: dict[str, float | None] = {"mean": None, "p50": None, "p95": None}
        return int(count), int(failed), int(unseen), nothing
    # The run lengths at ranks ceil(p/100 * n), each read by walking the index on the
    # length (ix_task_runs_span) from the nearer end, so p95 passes over 5 % of the
    # runs, not all of them; for a narrow window the planner sorts the window instead.
    timed = int(timed)
    ranks = {percent: (percent * timed + 99) // 100 for percent in (50, 95)}
    timed_runs = [*conditions, TaskRun.started_at.is_not(None)]

    def at_rank(rank: int) -> _Query:
        walk = select(span.label("span")).where(*timed_runs)
        if rank - 1 <= timed - rank:
            walk = walk.order_by(span.asc()).offset(rank - 1).limit(1)
        else:
            walk = walk.order_by(span.desc()).offset(timed - rank).limit(1)
        # Converted outside the walk, so only the one row picked is converted.
        picked = walk.subquery("picked")
        return select(sql.total_us(picked.c.span))

    p50_us, p95_us = (session.execute(at_rank(ranks[p])).scalar_one() for p in (50, 95))
    durations: dict[str, float | None] = {
        "mean": round(int(total_us) / timed / _US, 3),
        # Clamped here rather than in the walk, which must follow the index's order.
        "p50": round(max(int(p50_us), 0) / _US, 3),
        "p95": round(max(int(p95_us), 0) / _US, 3),
    }
    return int(count), int(failed), int(unseen), durations


# --- owners -------------------------------------------------------------------------------


def owners(
    session: Session,
    window: Window | None = None,
    owner: str | None = None,
    now: datetime | None = None,
    limit: int | None = None,
    after: OwnerKey | None = None,
) -> Iterator[OwnerRow]:
    """Per owner: tasks with a run in the window, of those running, failed runs, seconds.

    Most transcoding first, ties by owner (no owner last); with `limit`, only the first
    so many, and with `after`, only the owners that come after that key.
    """
    for row, _busy_us in _owner_rows(session, window, owner, now, limit, after):
        yield row


def owners_page(
    session: Session,
    window: Window | None,
    owner: str | None,
    now: datetime | None,
    limit: int,
    after: OwnerKey | None = None,
) -> OwnersPage:
    """The first `limit` owners of `owners` (after the key), and whether more follow."""
    rows = list(_owner_rows(session, window, owner, now, limit + 1, after))
    page = rows[:limit]
    next_key = None
    if len(rows) > limit:
        last, busy_us = page[-1]
        next_key = OwnerKey(busy_us, last.owner)
    return OwnersPage([row for row, _ in page], next_key)


def _owner_rows(
    session: Session,
    window: Window | None,
    owner: str | None,
    now: datetime | None,
    limit: int | None,
    after: OwnerKey | None,
) -> Iterator[tuple[OwnerRow, int]]:
    """The owners' rows, each with its exact transcoding time in microseconds."""
    window = window or Window()
    now = now or utcnow()
    sql = _Dialect(session)
    if limit is None:
        query = _all_owners(sql, window, now, owner, after)
    else:
        query = _top_owners(sql, window, now, owner, limit, after)
    for name, tasks, running_n, failed_n, busy_us in _stream(session, query):
        yield (
            OwnerRow(name, int(tasks), int(running_n), int(failed_n), _seconds(busy_us)),
            int(busy_us or 0),
        )


def _all_owners(
    sql: _Dialect, window: Window, now: datetime, owner: str | None, after: OwnerKey | None
) -> _Query:
    """Every owner, each figure from one grouping of all the runs in the window."""
    overlap = _overlap(sql, window, now)
    failed = and_(RUN_FAILED, window.contains(TaskRun.ended_at))
    # The covering index on (owner, task_pk, …) hands the runs over in owner order, so
    # the grouping needs no sort, and COUNT(DISTINCT task_pk) sorts each owner's few.
    per_owner = (
        _runs_in(select(TaskRun.owner.label("owner")), window, now, owner)
        .add_columns(
            func.count(TaskRun.task_pk.distinct()).label("tasks"),
            func.count().filter(failed).label("failed"),
            func.coalesce(func.sum(overlap), sql.zero).label("busy"),
        )
        .group_by(TaskRun.owner)
        .subquery("per_owner")
    )
    # Running tasks are few: their runs are found from their side, once, rather than
    # every run being looked up among them. Owners are joined by equality, so the runs
    # without an owner get theirs on their own.
    running_runs = _runs_in(
        select(TaskRun.owner.label("owner"), func.count(TaskRun.task_pk.distinct()).label("n"))
        .join(Task, Task.id == TaskRun.task_pk)
        .where(Task.status == "running"),
        window,
        now,
        owner,
    )
    running = running_runs.group_by(TaskRun.owner).subquery("running")
    running_unowned = (
        running_runs.with_only_columns(func.count(TaskRun.task_pk.distinct()))
        .where(TaskRun.owner.is_(None))
        .scalar_subquery()
    )
    running_n = case(
        (per_owner.c.owner.is_(None), running_unowned),
        else_=func.coalesce(running.c.n, 0),
    )
    # Sorted on the microseconds (the same order as the spans): a million rows sort
    # faster on a bigint than on an interval, and the output needs them anyway.
    busy_us = sql.total_us(per_owner.c.busy).label("busy_us")
    query = (
        select(per_owner.c.owner, per_owner.c.tasks, running_n, per_owner.c.failed, busy_us)
        .outerjoin(running, running.c.owner == per_owner.c.owner)
        .order_by(busy_us.desc(), per_owner.c.owner.asc().nulls_last())
    )
    if after is not None:
        query = query.where(_comes_after(sql, per_owner.c.busy, per_owner.c.owner, after))
    return query


def _top_owners(
    sql: _Dialect,
    window: Window,
    now: datetime,
    owner: str | None,
    limit: int,
    after: OwnerKey | None,
) -> _Query:
    """The first `limit` owners: ranked on their transcoding alone, then counted.

    Ranking needs only the sum of each owner's time: with an owner per task, that
    grouping of every run into as many groups is the whole cost, and COUNT(DISTINCT)
    over a million groups would nearly double it. The database keeps the top rows
    as it goes (LIMIT over ORDER BY), and only those owners' tasks, running tasks and
    failed runs are then counted, each a short range of the index that leads with the
    owner.
    """
    busy = func.coalesce(func.sum(_overlap(sql, window, now)), sql.zero)
    # Grouped in owner order: read in that order from the covering index, the grouping
    # needs neither a sort nor a hash table, where hashing hundreds of thousands of
    # owners (which PostgreSQL prefers for a window of weeks) took twice as long; a
    # short window's runs are few, and sorting them costs next to nothing.
    ranked = (
        _runs_in(select(TaskRun.owner.label("owner"), busy.label("busy")), window, now, owner)
        .group_by(TaskRun.owner)
        .order_by(TaskRun.owner)
        .subquery("ranked")
    )
    top_query = select(ranked.c.owner, ranked.c.busy)
    if after is not None:
        top_query = top_query.where(_comes_after(sql, ranked.c.busy, ranked.c.owner, after))
    order = (ranked.c.busy.desc(), ranked.c.owner.asc().nulls_last())
    top = top_query.order_by(*order).limit(limit).subquery("top")

    def per_top_owner(figure: Any, *conditions: ColumnElement[bool], running: bool = False) -> Any:
        """The figure over the runs in the window of each top owner (or of no owner)."""

        def of(match: ColumnElement[bool]) -> Any:
            query = _runs_in(select(figure), window, now, None).where(match, *conditions)
            if running:
                query = query.join(Task, Task.id == TaskRun.task_pk).where(Task.status == "running")
            return query.correlate(top).scalar_subquery()

        # Owners are matched by equality, so the runs without one are counted on their
        # own, once, by a subquery that does not depend on the row.
        return case(
            (top.c.owner.is_(None), of(TaskRun.owner.is_(None))),
            else_=of(TaskRun.owner == top.c.owner),
        )

    distinct_tasks = func.count(TaskRun.task_pk.distinct())
    failed = and_(RUN_FAILED, window.contains(TaskRun.ended_at))
    return select(
        top.c.owner,
        per_top_owner(distinct_tasks),
        per_top_owner(distinct_tasks, running=True),
        per_top_owner(func.count(), failed),
        sql.total_us(top.c.busy),
    ).order_by(top.c.busy.desc(), top.c.owner.asc().nulls_last())


def _comes_after(sql: _Dialect, busy: Any, name: Any, after: OwnerKey) -> ColumnElement[bool]:
    """Owners after `after` in the report's order: less time, or as much and later by name."""
    at = sql.span_of_us(after.busy_us)
    later_name = literal(False) if after.owner is None else or_(name > after.owner, name.is_(None))
    return or_(busy < at, and_(busy == at, later_name))


def _runs_in(query: _Query, window: Window, now: datetime, owner: str | None) -> _Query:
    """Runs that overlap the window; a run ended in the window counts even without a start."""
    conditions: list[ColumnElement[bool]] = []
    if window.until is not None:
        # Its start (or without one, its end) before `until`; spelled out rather than
        # COALESCE(started_at, ended_at), of which PostgreSQL has no statistics: it
        # guessed a third of the runs, and for a window of weeks chose to hash a million
        # owners (spilling to disk) rather than read them in order from the index.
        until = _ts(window.until)
        conditions.append(
            or_(
                TaskRun.started_at < until,
                and_(TaskRun.started_at.is_(None), TaskRun.ended_at < until),
            )
        )
    if window.since is not None:
        ongoing: ColumnElement[bool] = TaskRun.ended_at.is_(None)
        if now < window.since:
            ongoing = literal(False)
        conditions.append(or_(TaskRun.ended_at >= _ts(window.since), ongoing))
    if owner is not None:
        conditions.append(TaskRun.owner == owner)
    return query.where(*conditions) if conditions else query


def _overlap(
    sql: _Dialect,
    window: Window,
    now: datetime,
    day_start: Any = None,
    day_end: Any = None,
) -> Any:
    """The part of a run inside the window (and day): an interval, or 0/NULL when none."""
    lo_terms: list[Any] = [TaskRun.started_at]
    hi_terms: list[Any] = [func.coalesce(TaskRun.ended_at, _ts(now))]
    if window.since is not None:
        lo_terms.append(_ts(window.since))
    if window.until is not None:
        hi_terms.append(_ts(window.until))
    if day_start is not None:
        lo_terms.append(day_start)
        hi_terms.append(day_end)
    lo = sql.greatest(*lo_terms)
    hi = sql.least(*hi_terms)
    return case(
        (and_(TaskRun.started_at.is_not(None), hi > lo), sql.span(lo, hi)),
        else_=null(),
    )


# --- daily --------------------------------------------------------------------------------


def daily_window(window: Window, now: datetime | None = None) -> Window:
    """The window `daily` reports on: until defaults to now, since to 30 UTC days before."""
    until = window.until or now or utcnow()
    since = window.since
    if since is None:
        # The last DEFAULT_DAYS days that [since, until) touches, the day of until included
        # unless until is its first instant.
        since = _midnight(_ceil_day(until)) - timedelta(days=DEFAULT_DAYS)
    return Window(since, until)


def day_count(since: datetime, until: datetime) -> int:
    """How many UTC days [since, until) touches."""
    if until <= since:
        return 0
    last = until - timedelta(microseconds=1)
    return (last.date() - since.date()).days + 1


def daily(
    session: Session,
    window: Window | None = None,
    owner: str | None = None,
    now: datetime | None = None,
) -> list[DayRow]:
    """Per UTC day of the window: runs started, stopped, failed, ended unseen, and
    transcoding seconds; the runs ended on a day are stopped + failed + ended unseen.

    The whole days of the window that can no longer change come from run_days (see
    manager/rollups.py), the rest is worked out from the runs by `day_figures`.
    """
    now = now or utcnow()
    window = daily_window(window or Window(), now)
    assert window.since is not None  # noqa: S101
    assert window.until is not None  # noqa: S101
    figures: list[rollups.DayFigures] | None = None
    bind = session.get_bind()
    first_whole = _ceil_day(window.since)
    end_whole = min(window.until.date(), rollups.final_days_until(now))
    if owner is None and isinstance(bind, Engine) and first_whole < end_whole:
        stored = rollups.run_days(bind, first_whole, end_whole, now, final_day_figures)
        if stored is not None:
            head = day_figures(session, Window(window.since, _midnight(first_whole)), None, now)
            tail = day_figures(session, Window(_midnight(end_whole), window.until), None, now)
            figures = head + stored + tail
    if figures is None:
        figures = day_figures(session, window, owner, now)
    return [
        DayRow(day.isoformat(), started, stopped, failed, unseen, _seconds(busy_us))
        for day, started, stopped, failed, unseen, busy_us in figures
    ]


def final_day_figures(
    session: Session, start: date, end: date, now: datetime
) -> list[rollups.DayFigures]:
    """The figures of the whole days [start, end), for run_days."""
    return day_figures(session, Window(_midnight(start), _midnight(end)), None, now)


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time())


def _ceil_day(value: datetime) -> date:
    return value.date() if value == _midnight(value.date()) else value.date() + timedelta(days=1)


def day_figures(
    session: Session, window: Window, owner: str | None, now: datetime
) -> list[rollups.DayFigures]:
    """Per UTC day of [since, until): runs started, stopped, failed, ended unseen, busy us.

    The seconds come from a sweep over the day boundaries, not from a join of every run
    with every day it touches: the runs overlapping the window, clipped to it (a running
    one to `now`), are grouped by (start day, end day). Each group adds to its start day
    the time from the starts to the next midnight, to its end day the time from that
    midnight to the ends (a run within one day: its whole length), and one full day per
    run to every day in between, counted +n on the day after the start day and -n on the
    end day and summed up over the days in order. Runs started, and runs ended by how
    they ended, are counted day by day, each a range of the index on started_at or
    ended_at.
    """
    assert window.since is not None  # noqa: S101
    assert window.until is not None  # noqa: S101
    n_days = day_count(window.since, window.until)
    if n_days == 0:
        return []
    first = window.since.date()
    sql = _Dialect(session)

    def owned(query: _Query) -> _Query:
        return query if owner is None else query.where(TaskRun.owner == owner)

    since, until = window.since, window.until

    def event(k: Any, busy: Any = 0, full: Any = 0) -> _Query:
        """A row of additions to day k: busy microseconds, runs under way all day from k."""
        return select(
            k.label("k"),
            (literal(busy, BigInteger) if isinstance(busy, int) else busy).label("busy"),
            (literal(full, BigInteger) if isinstance(full, int) else full).label("full"),
        )

    # The runs overlapping the window, clipped to it: those ended in or after it (a
    # range of the ended_at index) and, unless `now` is before it, those still going.
    def clipped(end: Any, *conditions: ColumnElement[bool]) -> _Query:
        lo = sql.greatest(TaskRun.started_at, _ts(since))
        hi = sql.least(end, _ts(until))
        start_day, start_offset = sql.day_and_offset(lo, first)
        end_day, end_offset = sql.day_and_offset(hi, first)
        return owned(
            select(
                start_day.label("a"),
                end_day.label("b"),
                start_offset.label("lo"),
                end_offset.label("hi"),
                # started_at < until follows from hi > lo; it lets the planner read a
                # window near the start of the history by the started_at index.
            ).where(
                TaskRun.started_at.is_not(None),
                TaskRun.started_at < _ts(until),
                hi > lo,
                *conditions,
            )
        )

    branches = [clipped(TaskRun.ended_at, TaskRun.ended_at >= _ts(since))]
    if now >= since:
        branches.append(clipped(_ts(now), TaskRun.ended_at.is_(None)))
    runs = union_all(*branches).subquery("runs")
    spans = (
        select(
            runs.c.a,
            runs.c.b,
            func.count().label("n"),
            sql.total_us(func.sum(runs.c.lo)).label("lo_us"),
            sql.total_us(func.sum(runs.c.hi)).label("hi_us"),
        )
        .group_by(runs.c.a, runs.c.b)
        .cte("spans")
    )
    day_us = literal(_DAY_US, BigInteger)
    head = case(
        (spans.c.a == spans.c.b, spans.c.hi_us - spans.c.lo_us),
        else_=spans.c.n * day_us - spans.c.lo_us,
    )
    crosses = spans.c.a < spans.c.b
    events = union_all(
        event(spans.c.a, busy=head),
        event(spans.c.b, busy=spans.c.hi_us).where(crosses),
        event(spans.c.a + 1, full=spans.c.n).where(crosses),
        event(spans.c.b, full=-spans.c.n).where(crosses),
    ).subquery("events")

    k = literal(0, Integer).label("k")
    seed = select(k).cte("days", recursive=True)
    days = seed.union_all(select((seed.c.k + 1).label("k")).where(seed.c.k + 1 < n_days))
    # Runs under way all day long on day k: those that entered on a day up to k, less
    # those that left.
    full_days = func.sum(func.coalesce(func.sum(events.c.full), 0)).over(order_by=days.c.k)
    day_start, day_end = sql.day_bounds(days.c.k, first)

    def per_day(column: Any, *conditions: ColumnElement[bool]) -> Any:
        """Runs whose `column` falls on the day: a range of the index on it, counted."""
        return owned(
            select(func.count()).where(
                window.contains(column), column >= day_start, column < day_end, *conditions
            )
        ).scalar_subquery()

    query = (
        select(
            days.c.k,
            per_day(TaskRun.started_at),
            per_day(TaskRun.ended_at, RUN_STOPPED),
            per_day(TaskRun.ended_at, RUN_FAILED),
            per_day(TaskRun.ended_at, RUN_ENDED_UNSEEN),
            func.coalesce(func.sum(events.c.busy), 0) + full_days * day_us,
        )
        .select_from(days)
        .outerjoin(events, events.c.k == days.c.k)
        .group_by(days.c.k)
        .order_by(days.c.k)
    )
    return [
        (
            first + timedelta(days=int(day)),
            int(n_started),
            int(n_stopped),
            int(n_failed),
            int(n_unseen),
            int(busy_us or 0),
        )
        for day, n_started, n_stopped, n_failed, n_unseen, busy_us in session.execute(query)
    ]


# --- stuck --------------------------------------------------------------------------------


def stuck(
    session: Session,
    now: datetime | None = None,
    silent_for: int = DEFAULT_SILENT_FOR,
    owner: str | None = None,
) -> Iterator[StuckTask]:
    """Tasks stopping for over 120 s without a stop callback, and running ones gone silent.

    Longest stuck first. `since` is when the task became stopping (its updated_at), or its
    last delivery.
    """
    now = now or utcnow()
    stopping_since = Task.updated_at
    running_since = func.coalesce(Task.last_delivery_at, Task.updated_at)
    silent_cutoff = _ts(now - timedelta(seconds=silent_for))
    is_stopping = and_(Task.status == "stopping", Task.updated_at < _ts(now - STOPPING_GRACE))
    is_silent = and_(
        Task.status == "running",
        or_(
            Task.last_delivery_at < silent_cutoff,
            and_(Task.last_delivery_at.is_(None), Task.updated_at < silent_cutoff),
        ),
    )
    since = case((Task.status == "stopping", stopping_since), else_=running_since)
    query = select(Task.task_id, Task.owner, Task.status, since.label("since")).where(
        or_(is_stopping, is_silent)
    )
    if owner is not None:
        query = query.where(Task.owner == owner)
    query = query.order_by(since.asc(), Task.task_id.asc())
    for task_id, task_owner, status, since_at in _stream(session, query):
        reason = "no_stop_callback" if status == "stopping" else "no_delivery"
        yield StuckTask(task_id, task_owner, status, _naive(since_at), reason)


# --- helpers ------------------------------------------------------------------------------


def row_values(row: OwnerRow | DayRow | StuckTask) -> tuple[Any, ...]:
    """A report row's fields in column order."""
    return _FIELD_GETTERS[type(row)](row)  # type: ignore[no-any-return]


def flatten(report: dict[str, Any]) -> dict[str, Any]:
    """{"tasks": {"running": 1}} → {"tasks.running": 1}: the summary's CSV row."""
    flat: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            for sub, inner in value.items():
                flat[f"{key}.{sub}"] = inner
        else:
            flat[key] = value
    return flat


def _stream(session: Session, query: _Query) -> Iterator[Any]:
    """Rows from a server-side cursor, fetched in batches, so memory stays flat.

    Through the session's connection (Core): these rows are tuples, and the ORM's
    per-row handling costs as much again as the rest of the Python side.
    """
    connection = session.connection()
    result = connection.execute(query.execution_options(yield_per=STREAM_BATCH))
    try:
        yield from result
    finally:
        result.close()


def _counts(session: Session, query: _Query) -> dict[str, int]:
    return {key: int(n) for key, n in session.execute(query).all()}


def _counts_each(
    session: Session,
    column: Any,
    values: tuple[str, ...],
    *alternatives: list[ColumnElement[bool]],
) -> dict[str, int]:
    """Rows per value of `column` matching any of the disjoint `alternatives`.

    One COUNT per value and alternative, UNION ALL: each an index range when an index
    leads with `column`.
    """
    query = union_all(
        *(
            select(literal(value, String), func.count()).where(column == value, *conditions)
            for value in values
            for conditions in alternatives
        )
    )
    counts = dict.fromkeys(values, 0)
    for key, n in session.execute(query):
        counts[key] += int(n)
    return counts


def _ts(value: datetime) -> Any:
    return literal(value, DateTime)


def _naive(value: Any) -> datetime:
    # SQLite hands back the stored string when a CASE hides the column type.
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _seconds(total_us: Any) -> int:
    """Microseconds → whole seconds, rounded half up."""
    return (int(total_us or 0) + _US // 2) // _US


class _Dialect:
    """The few expressions PostgreSQL and SQLite spell differently.

    Spans of time are intervals on PostgreSQL and integer microseconds on SQLite;
    `total_us` turns either into integer microseconds, once per aggregate.
    """

    def __init__(self, session: Session) -> None:
        self.pg = session.get_bind().dialect.name == "postgresql"
        if self.pg:
            # For this transaction only: sorts and hashes of a million rows fit in
            # memory, JIT compilation costs more than it saves on these queries, and
            # the indexes they read are cached, so index-only range scans are cheap
            # (at the default cost of 4 the planner picks sequential scans instead).
            session.execute(text("SET LOCAL work_mem = '64MB'"))
            session.execute(text("SET LOCAL jit = off"))
            session.execute(text("SET LOCAL random_page_cost = 1.1"))
        self.zero: Any = literal(timedelta(0)) if self.pg else literal(0, BigInteger)
        self.no_span: Any = cast(null(), Interval if self.pg else BigInteger)

    def span_of_us(self, us: int) -> Any:
        """A span of `us` microseconds, comparable with the sums of spans."""
        if self.pg:
            return literal(timedelta(microseconds=us), Interval)
        return literal(us, BigInteger)

    def greatest(self, *terms: Any) -> Any:
        if len(terms) == 1:
            return terms[0]
        return func.greatest(*terms) if self.pg else func.max(*terms)

    def least(self, *terms: Any) -> Any:
        if len(terms) == 1:
            return terms[0]
        return func.least(*terms) if self.pg else func.min(*terms)

    def span(self, lo: Any, hi: Any) -> Any:
        if self.pg:
            return hi - lo
        return self._us(hi) - self._us(lo)

    def total_us(self, span: Any) -> Any:
        if self.pg:
            return cast(func.round(extract("epoch", span) * _US), BigInteger)
        return span

    def day_index(self, column: Any, first: date) -> Any:
        """Whole UTC days from `first` to the column's day."""
        if self.pg:
            return cast(column, Date) - literal(first, Date)
        start = literal(first.isoformat() + " 00:00:00.000000", String)
        return (self._us(column) - self._us(start)) // _DAY_US

    def day_and_offset(self, value: Any, first: date) -> tuple[Any, Any]:
        """Whole UTC days from `first` to the value's day, and the time since its midnight.

        The time is an interval on PostgreSQL and integer microseconds on SQLite.
        """
        if self.pg:
            return self.day_index(value, first), value - func.date_trunc("day", value)
        since_first = self._us(value) - self._us(
            literal(first.isoformat() + " 00:00:00.000000", String)
        )
        return since_first // _DAY_US, since_first % _DAY_US

    def day_bounds(self, k: Any, first: date) -> tuple[Any, Any]:
        """Start and end of day `first + k`, comparable with the stored timestamps."""
        if self.pg:
            start = literal(datetime.combine(first, time()), DateTime) + k * literal(
                timedelta(days=1)
            )
            return start, start + literal(timedelta(days=1))
        # SQLAlchemy stores SQLite datetimes as 'YYYY-MM-DD HH:MM:SS.ffffff' text.
        base = literal(first.isoformat(), String)

        def at(offset: Any) -> Any:
            day = func.date(base, literal("+", String).concat(cast(offset, String)).concat(" days"))
            return type_coerce(day.concat(" 00:00:00.000000"), DateTime)

        return at(k), at(k + 1)

    @staticmethod
    def _us(value: Any) -> Any:
        text_value = type_coerce(value, String)
        seconds = cast(func.strftime("%s", text_value), BigInteger)
        micros = cast(func.substr(text_value.concat(".000000"), 21, 6), BigInteger)
        return seconds * _US + micros
