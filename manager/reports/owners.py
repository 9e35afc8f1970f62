"""The owners report (SPEC 3.4): per owner, tasks with a run in the window, of those
running, failed runs, and transcoding seconds; a whole listing or a page of it.

Most transcoding first, ties by owner (no owner last). The rows are yielded from a
server-side cursor: iterate them while the session is open.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, or_, select
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.models import Task, TaskRun
from manager.reports.dialect import Dialect, Query, seconds
from manager.reports.queries import RUN_FAILED, overlap, runs_in, stream
from manager.reports.window import Window
from manager.vocabulary import TaskStatus

OWNERS_LIMIT = 100  # owners listed by default where a list is read, not exported
MAX_OWNERS_LIMIT = 10_000


@dataclass(frozen=True)
class OwnerRow:
    """One owner's line of the owners report."""

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
        """More owners follow this page."""
        return self.next_key is not None


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
    sql = Dialect(session)
    if limit is None:
        query = _all_owners(sql, window, now, owner, after)
    else:
        query = _top_owners(sql, window, now, owner, limit, after)
    for name, tasks, running_n, failed_n, busy_us in stream(session, query):
        yield (
            OwnerRow(name, int(tasks), int(running_n), int(failed_n), seconds(busy_us)),
            int(busy_us or 0),
        )


def _all_owners(
    sql: Dialect, window: Window, now: datetime, owner: str | None, after: OwnerKey | None
) -> Query:
    """Every owner, each figure from one grouping of all the runs in the window."""
    failed = and_(RUN_FAILED, window.contains(TaskRun.ended_at))
    # The covering index on (owner, task_pk, …) hands the runs over in owner order, so
    # the grouping needs no sort, and COUNT(DISTINCT task_pk) sorts each owner's few.
    per_owner = (
        runs_in(select(TaskRun.owner.label("owner")), window, now, owner)
        .add_columns(
            func.count(TaskRun.task_pk.distinct()).label("tasks"),
            func.count().filter(failed).label("failed"),
            func.coalesce(func.sum(overlap(sql, window, now)), sql.zero).label("busy"),
        )
        .group_by(TaskRun.owner)
        .subquery("per_owner")
    )
    running, running_unowned = _running_per_owner(window, now, owner)
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


def _running_per_owner(window: Window, now: datetime, owner: str | None) -> tuple[Any, Any]:
    """Running tasks with a run in the window: per owner (a subquery), and of no owner.

    Running tasks are few: their runs are found from their side, once, rather than
    every run being looked up among them. Owners are joined by equality, so the runs
    without an owner get theirs on their own.
    """
    running_runs = runs_in(
        select(TaskRun.owner.label("owner"), func.count(TaskRun.task_pk.distinct()).label("n"))
        .join(Task, Task.id == TaskRun.task_pk)
        .where(Task.status == TaskStatus.RUNNING),
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
    return running, running_unowned


def _top_owners(
    sql: Dialect,
    window: Window,
    now: datetime,
    owner: str | None,
    limit: int,
    after: OwnerKey | None,
) -> Query:
    """The first `limit` owners: ranked on their transcoding alone, then counted.

    Ranking needs only the sum of each owner's time: with an owner per task, that
    grouping of every run into as many groups is the whole cost, and COUNT(DISTINCT)
    over a million groups would nearly double it. The database keeps the top rows
    as it goes (LIMIT over ORDER BY), and only those owners' tasks, running tasks and
    failed runs are then counted, each a short range of the index that leads with the
    owner.
    """
    top = _ranked_owners(sql, window, now, owner, limit, after)

    def per_top_owner(figure: Any, *conditions: ColumnElement[bool], running: bool = False) -> Any:
        """The figure over the runs in the window of each top owner (or of no owner)."""

        def of(match: ColumnElement[bool]) -> Any:
            query = runs_in(select(figure), window, now, None).where(match, *conditions)
            if running:
                query = query.join(Task, Task.id == TaskRun.task_pk).where(
                    Task.status == TaskStatus.RUNNING
                )
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


def _ranked_owners(
    sql: Dialect,
    window: Window,
    now: datetime,
    owner: str | None,
    limit: int,
    after: OwnerKey | None,
) -> Any:
    """The first `limit` owners (after the key) and their time: the subquery `top`."""
    busy = func.coalesce(func.sum(overlap(sql, window, now)), sql.zero)
    # Grouped in owner order: read in that order from the covering index, the grouping
    # needs neither a sort nor a hash table, where hashing hundreds of thousands of
    # owners (which PostgreSQL prefers for a window of weeks) took twice as long; a
    # short window's runs are few, and sorting them costs next to nothing.
    ranked = (
        runs_in(select(TaskRun.owner.label("owner"), busy.label("busy")), window, now, owner)
        .group_by(TaskRun.owner)
        .order_by(TaskRun.owner)
        .subquery("ranked")
    )
    top_query = select(ranked.c.owner, ranked.c.busy)
    if after is not None:
        top_query = top_query.where(_comes_after(sql, ranked.c.busy, ranked.c.owner, after))
    order = (ranked.c.busy.desc(), ranked.c.owner.asc().nulls_last())
    return top_query.order_by(*order).limit(limit).subquery("top")


def _comes_after(sql: Dialect, busy: Any, name: Any, after: OwnerKey) -> ColumnElement[bool]:
    """Owners after `after` in the report's order: less time, or as much and later by name."""
    at = sql.span_of_us(after.busy_us)
    later_name = literal(False) if after.owner is None else or_(name > after.owner, name.is_(None))
    return or_(busy < at, and_(busy == at, later_name))
