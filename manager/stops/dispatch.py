"""Send stop attempts: take a unit of the shared rate limit, call ZEGOCLOUD, record the answer.

Used by the stop endpoint, the CLI and the dashboard (one attempt, leasing a unit
for it and giving it back at once) and by the worker (many attempts on the units it
keeps leased, see worker.py). No database transaction is open during the call.
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

from manager.clock import utcnow
from manager.config import Settings
from manager.db import begin_write, write_transaction
from manager.errors import NotConfigured
from manager.metrics import count_stop_attempt, count_stop_wait, count_zego_call
from manager.models import StopRequest
from manager.stops.attempts import record_attempts
from manager.stops.claims import release
from manager.stops.policy import RetryPolicy
from manager.stops.ratelimit import Grant, RateShare
from manager.stops.requests import Job, prepare_attempt, request_stop
from manager.tasks.queries import find_task
from manager.vocabulary import StopState, WaitReason
from manager.zego.client import DEFAULT_POOL_SIZE, ClientConfig, ZegoClient, ZegoReply
from manager.zego.guard import DeadlinePassed, SendGuard

log = logging.getLogger(__name__)

RATE_LIMITER_NAME = "zego_api"
STOP_ACTION = "StopCloudTranscode"
# A call's answer is stored again after 0.2 s, then 0.4 s, before the endpoint gives up.
RECORD_RETRIES = 3
RECORD_RETRY_DELAY = 0.2
NAME_LENGTH = 64  # stop_requests.claimed_by and stop_attempts.worker
# How often a process without a unit asks for one again while a stop waits.
ACQUIRE_RETRY = 0.1
# An operator's stop (API, CLI, dashboard) waits this long for a unit of the rate
# before it is left to the worker.
FIRST_ATTEMPT_MAX_WAIT = 2.0
# Warnings that could repeat for every stop come at most this often.
WARN_EVERY = 60.0


def process_name(role: str) -> str:
    """role:host:pid, within NAME_LENGTH: a Kubernetes pod's host name can be 63 long."""
    role_and_pid = f"{role}::{os.getpid()}"
    host = socket.gethostname()[: NAME_LENGTH - len(role_and_pid)]
    return f"{role}:{host}:{os.getpid()}"


def send_on_unit(
    client: ZegoClient, limiter: RateShare, job: Job, grant: Grant
) -> ZegoReply | None:
    """Call StopCloudTranscode on a checked-out unit, and check the unit back in.

    The request is signed first. Returns None, nothing sent, when the unit's lease
    ran out before the connection was ready to write. Whatever else happens the
    unit counts the call as sent: when its last byte left, or, where that is not
    known (an error mid-way), when the call returned.
    """
    prepared = client.prepare_stop(job.task_id, job.user_id, job.sequence)
    # The unit is checked in as soon as the request is out, not when its answer comes.
    guard = SendGuard(deadline=grant.deadline, on_written=lambda at: limiter.finish(grant, at))
    try:
        reply = client.send(prepared, guard)
    except DeadlinePassed:
        limiter.finish(grant, None)
        return None
    except BaseException:
        if guard.written_at is None:
            limiter.finish(grant, time.monotonic())
        raise
    if guard.written_at is None:  # the request failed part-way: it may have gone
        limiter.finish(grant, time.monotonic())
    count_zego_call(STOP_ACTION, reply.code, reply.http_status, reply.elapsed_ms / 1000)
    if unanswered(reply):
        count_stop_wait(WaitReason.ZEGO_UNREACHABLE, 1)
    return reply


def unanswered(reply: ZegoReply) -> bool:
    """No answer came at all: ZEGOCLOUD could not be reached, or did not answer in time."""
    return reply.http_status is None and reply.code is None


class Throttled:
    """Logs a warning at most once per WARN_EVERY seconds."""

    def __init__(self) -> None:
        self._last = -math.inf

    def warn(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last >= WARN_EVERY:
            self._last = now
            log.warning(message, *args)


@dataclass
class Dispatcher:
    sessions: sessionmaker[Session]
    client_config: ClientConfig
    limiter: RateShare
    policy: RetryPolicy
    name: str
    rng: random.Random
    client: ZegoClient = field(init=False, repr=False)
    no_share: Throttled = field(default_factory=Throttled, init=False, repr=False)

    def __post_init__(self) -> None:
        self.client = self.client_config.make()

    def send(self, job: Job, max_wait: float) -> str | None:
        """Make one attempt and return the request's new state; None when no unit of the
        rate came within max_wait (the job goes back to the queue, saying why)."""
        grant = self.take_unit(time.monotonic() + max_wait)
        reply = None if grant is None else send_on_unit(self.client, self.limiter, job, grant)
        self.give_back_units()
        if reply is None:
            self.wait_for_share([job], max_wait)
            return None
        return self._record_answer(job, reply)

    def take_unit(self, until: float) -> Grant | None:
        """A unit that may start a call now: one held, or one leased for the purpose,
        waiting for it until the monotonic time `until`."""
        while True:
            grant = self.limiter.try_checkout()
            if grant is not None:
                return grant
            if self.limiter.acquire(1):
                return self.limiter.checkout(until)
            if time.monotonic() + ACQUIRE_RETRY >= until:
                return None
            time.sleep(ACQUIRE_RETRY)

    def give_back_units(self) -> None:
        """Return the units not in use, so that a worker or another stop may have them."""
        try:
            self.limiter.release()
        except SQLAlchemyError:  # they return by themselves when their lease runs out
            log.warning("could not give back rate units; their lease will run out")

    def wait_for_share(self, jobs: list[Job], waited: float) -> None:
        """Put jobs back in the queue that found no share of the rate limit, and say so."""
        count_stop_wait(WaitReason.RATE_LIMIT, len(jobs))
        self.no_share.warn(
            "no share of the ZEGOCLOUD rate limit for %.1f s (every unit in use by other "
            "processes, or the database too slow to lease one): %d stop(s) left queued",
            waited,
            len(jobs),
        )
        with write_transaction(self.sessions) as session:
            release(
                session, [job.stop_request_id for job in jobs], self.name, WaitReason.RATE_LIMIT
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
        """Store the answers, all in one transaction; each request's new state. Each
        attempt is logged and counted once stored."""
        with write_transaction(self.sessions) as session:
            states = record_attempts(
                session, results, worker=self.name, policy=self.policy, now=utcnow(), rng=self.rng
            )
        for (job, reply), state in zip(results, states, strict=True):
            log_attempt(job, reply, state)
            count_stop_attempt("no_answer" if unanswered(reply) else reply.outcome, state)
        return states


def log_attempt(job: Job, reply: ZegoReply, state: str) -> None:
    """One line per recorded attempt: what ZEGOCLOUD answered and what follows."""
    fields = {
        "task_id": job.task_id,
        "stop_request_id": job.stop_request_id,
        "attempt": job.attempts_before + 1,
        "outcome": "no_answer" if unanswered(reply) else str(reply.outcome),
        "state": state,
        "zego_code": reply.code,
        "zego_request_id": reply.request_id,
        "elapsed_ms": reply.elapsed_ms,
    }
    if state == StopState.FAILED:
        log.warning(
            "stop request %d gave up after attempt %d: %s",
            job.stop_request_id,
            job.attempts_before + 1,
            reply.message,
            extra=fields,
        )
    elif state == StopState.SUCCEEDED:
        log.info("stop accepted by ZEGOCLOUD for task %s", job.task_id, extra=fields)
    elif unanswered(reply):
        log.warning(
            "ZEGOCLOUD not reached for task %s (%s); the stop is retried",
            job.task_id,
            reply.message,
            extra=fields,
        )
    else:
        log.info(
            "stop not accepted yet for task %s (%s); the stop is retried",
            job.task_id,
            reply.message,
            extra=fields,
        )


def make_dispatcher(
    settings: Settings,
    engine: Engine,
    sessions: sessionmaker[Session],
    role: str,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
) -> Dispatcher:
    """The engine should be in autocommit (PostgreSQL) where one is at hand: a unit's
    lease, renewal or return is then one statement, one round trip."""

    if settings.zego_app_id is None or not settings.zego_server_secret:
        raise NotConfigured("not_configured", "ZEGO_APP_ID and ZEGO_SERVER_SECRET must be set")
    return Dispatcher(
        sessions=sessions,
        client_config=ClientConfig(
            settings.zego_api_url,
            settings.zego_app_id,
            settings.zego_server_secret,
            settings.zego_timeout,
            pool_size,
        ),
        limiter=RateShare(engine, RATE_LIMITER_NAME, settings.zego_rate_limit),
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
    max_wait: float | None = None,
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
        dispatcher.send(job, FIRST_ATTEMPT_MAX_WAIT if max_wait is None else max_wait)
    session.expire_all()
    return session.get_one(StopRequest, stop.id), created
