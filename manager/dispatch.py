"""Send stop attempts: take a shared rate slot, call ZEGOCLOUD, record the answer.

Used by the stop endpoint (one attempt, waiting briefly for a slot) and by the
worker (many attempts, slotted ahead and sent by its sender threads or process,
see worker.py). No database transaction is open during the call.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings
from .db import begin_write, write_transaction
from .lifecycle import utcnow
from .models import StopRequest
from .queries import find_task
from .ratelimit import CLOCK_ERROR, SEND_TOLERANCE, SharedRateLimiter
from .stopping import Job, RetryPolicy, prepare_attempt, record_attempts, release, request_stop
from .zego.client import ClientConfig, ZegoClient, ZegoReply

log = logging.getLogger(__name__)

RATE_LIMITER_NAME = "zego_api"
CLOSED_WINDOW_WARNING_EVERY = 60.0  # seconds
# A call's answer is stored again after 0.2 s, then 0.4 s, before the endpoint gives up.
RECORD_RETRIES = 3
RECORD_RETRY_DELAY = 0.2
NAME_LENGTH = 64  # stop_requests.claimed_by and stop_attempts.worker


def process_name(role: str) -> str:
    """role:host:pid, within NAME_LENGTH: a Kubernetes pod's host name can be 63 long."""
    role_and_pid = f"{role}::{os.getpid()}"
    host = socket.gethostname()[: NAME_LENGTH - len(role_and_pid)]
    return f"{role}:{host}:{os.getpid()}"


def send_in_window(
    client: ZegoClient, job: Job, earliest: float, latest: float
) -> tuple[ZegoReply | None, float]:
    """Call StopCloudTranscode between the monotonic times `earliest` and `latest`.

    The request is signed first, so that little stands between the check and the
    send. Returns the reply, or None and nothing sent when the call could not leave
    by `latest` (a busy machine, a slow thread): late calls bunched onto punctual
    ones would break the limit, so the caller takes a fresh slot. Also returns how
    late after `earliest` the call left (or would have).
    """
    prepared = client.prepare_stop(job.task_id, job.user_id, job.sequence)
    while (now := time.monotonic()) < earliest:
        time.sleep(earliest - now)
    if now > latest:
        return None, now - earliest
    return client.send(prepared), now - earliest


@dataclass
class Dispatcher:
    sessions: sessionmaker[Session]
    client_config: ClientConfig
    limiter: SharedRateLimiter
    policy: RetryPolicy
    name: str
    rng: random.Random
    client: ZegoClient = field(init=False, repr=False)
    _last_closed_warning: float = field(default=-math.inf, init=False, repr=False)

    def __post_init__(self) -> None:
        self.client = self.client_config.make()

    def send(self, job: Job, max_wait: float) -> str | None:
        """Make one attempt and return the request's new state; None when no rate slot
        came within max_wait (the job is released)."""
        give_up_at = time.monotonic() + max_wait
        slot = self.limiter.reserve(max_wait)
        while slot is not None:
            reply, late = send_in_window(self.client, job, *self.send_window(slot))
            if reply is not None:
                log_call(job, reply, late)
                return self._record_answer(job, reply)
            slot = self.limiter.reserve(give_up_at - time.monotonic())  # late: a fresh slot
        with write_transaction(self.sessions) as session:
            release(session, job.stop_request_id, self.name)
        return None

    def send_window(self, slot: float) -> tuple[float, float]:
        """When a call in the slot at monotonic time `slot` may leave: (earliest, latest).

        Up to SEND_TOLERANCE late; a clock offset known less well than CLOCK_ERROR
        narrows the window from both sides, so that the call still lands within the
        spread ratelimit.py budgets for (and closes it, sending nothing, when the
        database is too slow to tell its time within SEND_TOLERANCE / 2 more).
        """
        error = self.limiter.clock_error()
        margin = max(0.0, error - CLOCK_ERROR)
        if 2 * margin >= SEND_TOLERANCE:
            self._warn_window_closed(error)
        return slot + margin, slot + SEND_TOLERANCE - margin

    def _warn_window_closed(self, error: float) -> None:
        # Every call then misses its slot and nothing is sent: say so, once a minute,
        # rather than only in the debug log of each missed slot.
        now = time.monotonic()
        if now - self._last_closed_warning < CLOSED_WINDOW_WARNING_EVERY:
            return
        self._last_closed_warning = now
        log.warning(
            "stop calls cannot be timed: the database clock is known only to within "
            "%.1f ms (a round trip of about %.0f ms), more than the %.0f ms send "
            "tolerance allows; no StopCloudTranscode call is sent until it improves",
            1000 * error,
            2000 * error,
            1000 * (SEND_TOLERANCE / 2 + CLOCK_ERROR),
        )

    def _record_answer(self, job: Job, reply: ZegoReply) -> str:
        """Store the answer of a call that went out, trying again while the database
        refuses: a lost answer would leave the request to be sent again, with a new
        Sequence, after its lease."""
        for retry in range(1, RECORD_RETRIES):
            try:
                return self.record([(job, reply)])[0]
            except SQLAlchemyError:
                time.sleep(RECORD_RETRY_DELAY * retry)
        try:
            return self.record([(job, reply)])[0]
        except SQLAlchemyError as exc:
            log.error(
                "answer not recorded: task=%s seq=%s outcome=%s code=%s request_id=%s (%s)",
                job.task_id,
                job.sequence,
                reply.outcome,
                reply.code,
                reply.request_id,
                type(exc).__name__,
            )
            raise

    def record(self, results: list[tuple[Job, ZegoReply]]) -> list[str]:
        """Store the answers, all in one transaction; each request's new state."""
        with write_transaction(self.sessions) as session:
            return record_attempts(
                session, results, worker=self.name, policy=self.policy, now=utcnow(), rng=self.rng
            )


def log_call(job: Job, reply: ZegoReply, late: float) -> None:
    log.info(
        "StopCloudTranscode task=%s seq=%s outcome=%s code=%s request_id=%s late_ms=%.1f",
        job.task_id,
        job.sequence,
        reply.outcome,
        reply.code,
        reply.request_id,
        1000 * late,
    )


def make_dispatcher(
    settings: Settings, engine: Engine, sessions: sessionmaker[Session], role: str
) -> Dispatcher:
    from .errors import ApiError

    if settings.zego_app_id is None or not settings.zego_server_secret:
        raise ApiError(503, "not_configured", "ZEGO_APP_ID and ZEGO_SERVER_SECRET must be set")
    return Dispatcher(
        sessions=sessions,
        client_config=ClientConfig(
            settings.zego_api_url,
            settings.zego_app_id,
            settings.zego_server_secret,
            settings.zego_timeout,
        ),
        limiter=SharedRateLimiter(engine, RATE_LIMITER_NAME, settings.zego_rate_limit),
        policy=RetryPolicy(max_attempts=settings.stop_max_attempts),
        name=process_name(role),
        rng=random.Random(),  # noqa: S311 - jitter, not cryptography
    )


def stop_task_now(
    session: Session,
    dispatcher: Dispatcher,
    task_id: str,
    *,
    app_id: int | None,
    requested_by: str,
    reason: str | None,
    force: bool,
    max_wait: float = 2.0,
) -> tuple[StopRequest, bool]:
    """Store a stop (commit), then make its first attempt; returns (request, created).

    A stop already in flight for the task is returned instead of a new one. The
    session must have no transaction open, and the dispatcher must exist already:
    making it may touch the database, which a SQLite write lock would block.
    """
    begin_write(session)
    task = find_task(session, task_id, app_id)
    stop, created = request_stop(
        session,
        task,
        requested_by=requested_by,
        reason=reason,
        force=force,
        claimant=dispatcher.name,
        policy=dispatcher.policy,
        now=utcnow(),
    )
    job = prepare_attempt(session, stop) if created else None
    session.commit()  # stored before it is sent
    if job is not None:
        dispatcher.send(job, max_wait=max_wait)
    session.expire_all()
    return session.get_one(StopRequest, stop.id), created
