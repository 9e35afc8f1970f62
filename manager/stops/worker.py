"""`manager worker`: sends queued stop requests within the shared rate limit.

Several workers (and app processes) may run against one database: work is
claimed under a lease, so no request is sent by two of them at once, and the rate
limit is shared through leased units (ratelimit.py).

Threads share the work, so that no database round trip holds up another kind of
work: with the database 50 ms away a transaction takes a few hundred milliseconds.
- the main thread claims due requests, CLAIM_AHEAD seconds of the units' rate;
- the keeper keeps the units of the rate leased: renews them ahead of expiry, takes
  more while claimed work waits, gives idle ones back, and returns to the queue
  the work that found no unit within `patience`;
- the recorder stores the answers, in batches of whatever came meanwhile;
- the pacer hands each claimed job to a sender as soon as a unit may start a call;
- the senders (a pool as large as the calls that may be in flight at once) sign,
  send and wait for ZEGOCLOUD's answer, so a slow answer holds up nothing else.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from manager.callbacks.nonces import prune_nonces
from manager.callbacks.retention import Pruned, prune
from manager.clock import utcnow
from manager.config import MAX_CALLBACK_MAX_AGE
from manager.db import write_transaction
from manager.events.retention import prune_events
from manager.metrics import count_pruned, count_restop
from manager.stops.claims import claim_due, release
from manager.stops.dispatch import Dispatcher, send_on_unit
from manager.stops.ratelimit import Grant, unit_calls
from manager.stops.requests import Job
from manager.stops.restops import queue_restop, stuck_stopping
from manager.zego.client import ZegoReply

log = logging.getLogger(__name__)

# Calls a worker may have in flight at once, by default: 100 calls/s with ZEGOCLOUD
# answering within about 600 ms. Each is a thread and a pooled connection.
DEFAULT_THREADS = 64
# Answers are recorded in batches, at least this often...
RECORD_EVERY = 0.25
# ...or as soon as this many wait.
RECORD_BATCH = 64
# How often the keeper looks at the units and the waiting work.
KEEP_EVERY = 0.05
# Claimed work kept ready for the pacer: this many seconds of the units' rate...
CLAIM_AHEAD = 2.0
# ...and at least this many requests: a worker without units claims a few to ask for some.
MIN_CLAIM = 8
# A claimed request that finds no unit of the rate for this long goes back to the
# queue (another process may hold the units) saying why it waits.
PATIENCE = 5.0
# A unit unused this long, while no claimed request waits, goes back to the database.
IDLE_RETURN = 0.5
# After asking for units and getting none, wait this long before asking again.
ACQUIRE_BACKOFF = 0.25
TIDY_EVERY = 5.0
# Old deliveries are pruned in passes of at most PRUNE_BATCHES batches, PRUNE_PAUSE
# seconds apart, in a thread of their own so that stops never wait for them; a pass that
# did not reach the cutoff is followed by the next at once, else after PRUNE_EVERY.
PRUNE_EVERY = 60.0
PRUNE_BATCHES = 50
PRUNE_PAUSE = 0.5


@dataclass(frozen=True)
class Waiting:
    """A claimed request waiting for a unit; given back to the queue at `give_up_at`."""

    job: Job
    give_up_at: float


@dataclass(frozen=True)
class Sent:
    """What became of a job handed to a sender: its reply, or None when it was not sent
    (`sent` False: the unit's lease ran out first) or its fate is unknown (a bug)."""

    job: Job
    reply: ZegoReply | None
    sent: bool


@dataclass
class Pruning:
    """The worker's share of DELIVERY_RETENTION_DAYS: passes of manager.callbacks.retention
    and of manager.events.retention."""

    engine: Engine
    retention_days: int
    # Writes delivery_hours up to `now` (manager.reports.rollups.fill, passed in by the
    # edge that builds the worker: the reports sit above this domain).
    count_hours: Callable[[Engine, datetime], object]
    batches: int = PRUNE_BATCHES
    pause: float = PRUNE_PAUSE
    resume_after: int = 0  # where the last pass stopped; only saves a rescan

    def run_pass(self) -> Pruned:
        now = utcnow()
        # A delivery is deleted only once its hour is in delivery_hours: count them first.
        self.count_hours(self.engine, now)
        pruned = prune(
            self.engine,
            now=now,
            retention_days=self.retention_days,
            max_batches=self.batches,
            pause=self.pause,
            after_id=self.resume_after,
        )
        self.resume_after = pruned.resume_after
        events = prune_events(
            self.engine,
            now=now,
            retention_days=self.retention_days,
            max_batches=self.batches,
            pause=self.pause,
        )
        if events:
            log.info("pruned %d outbound events older than %d days", events, self.retention_days)
        count_pruned(pruned.bodies, pruned.deliveries, pruned.tasks, events)
        if pruned.bodies or pruned.deliveries or pruned.tasks:
            log.info(
                "pruned deliveries older than %d days: %d bodies dropped, %d deliveries"
                " deleted, %d task histories folded into their last run",
                self.retention_days,
                pruned.bodies,
                pruned.deliveries,
                pruned.tasks,
                extra={"batches": pruned.batches},
            )
        return pruned


class StopWorker:
    """Claims due stop requests and sends each as soon as a leased unit of the rate allows."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        threads: int = DEFAULT_THREADS,
        batch: int = MIN_CLAIM,
        *,
        patience: float = PATIENCE,
        tidy_nonces: bool = False,
        pruning: Pruning | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.share = dispatcher.limiter
        self.batch = batch
        self.patience = patience
        # Keep the nonce ledger to the widest freshness window any process may use: a
        # process of its own CALLBACK_MAX_AGE must not prune pairs another one still
        # treats as fresh.
        self.tidy_nonces = tidy_nonces
        self.pruning = pruning
        self._units_total = len(unit_calls(self.share.rate))
        self._pending: deque[Waiting] = deque()
        self._changed = threading.Condition()
        self._in_flight = 0
        self._closing = False
        self._results: queue.SimpleQueue[Sent] = queue.SimpleQueue()
        self._answers: list[tuple[Job, ZegoReply]] = []
        self._oldest_answer = math.inf
        self._next_acquire = -math.inf
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="stop-sender")
        self._pacer = threading.Thread(target=self._pace, name="stop-pacer", daemon=True)
        self._pacer.start()

    # -- the pacer and the senders -------------------------------------------------------

    def _pace(self) -> None:
        """Hand the next waiting job to a sender whenever a unit may start a call."""
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if self._closing:
                    return
            grant = self.share.checkout(time.monotonic() + 0.1)
            if grant is None:
                continue
            with self._changed:
                if not self._pending or self._closing:
                    self.share.finish(grant, None)
                    continue
                job = self._pending.popleft().job
                self._in_flight += 1
            self._pool.submit(self._send, job, grant)

    def _send(self, job: Job, grant: Grant) -> None:
        try:
            reply = send_on_unit(self.dispatcher.client, self.share, job, grant)
            self._results.put(Sent(job, reply, reply is not None))
        except Exception:  # a bug worth seeing; the claim's lease returns the request later
            log.exception(
                "stop attempt failed: task=%s seq=%s",
                job.task_id,
                job.sequence,
                extra={"task_id": job.task_id, "stop_request_id": job.stop_request_id},
            )
            self._results.put(Sent(job, None, True))

    # -- the main thread: the database ------------------------------------------------------

    def tidy(self) -> None:
        """Re-queue stuck tasks, and keep the nonce ledger to its window."""
        with write_transaction(self.dispatcher.sessions) as session:
            for task in stuck_stopping(session, utcnow()):
                if queue_restop(session, task, utcnow()):
                    count_restop()
                    log.warning(
                        "task %s still stopping with no stop callback: queued another stop",
                        task.task_id,
                        extra={"task_id": task.task_id, "owner": task.owner},
                    )
        if self.tidy_nonces:
            with write_transaction(self.dispatcher.sessions) as session:
                pruned = prune_nonces(session, utcnow(), MAX_CALLBACK_MAX_AGE)
            if pruned:
                log.info("deleted %d callback nonces older than the freshness window", pruned)

    def claim(self, limit: int) -> int:
        """Claim up to `limit` due requests for the pacer; returns how many."""
        policy = self.dispatcher.policy
        with write_transaction(self.dispatcher.sessions) as session:
            jobs = claim_due(
                session, claimant=self.dispatcher.name, limit=limit, policy=policy, now=utcnow()
            )
        give_up_at = time.monotonic() + self.patience
        with self._changed:
            self._pending.extend(Waiting(job, give_up_at) for job in jobs)
            self._changed.notify_all()
        return len(jobs)

    def claim_more(self) -> int:
        """Keep CLAIM_AHEAD seconds of the held units' rate waiting (at least `batch`)."""
        target = max(self.batch, math.ceil(self.share.calls_per_second() * CLAIM_AHEAD))
        with self._changed:
            waiting = len(self._pending)
        if waiting > target // 2:
            return 0
        return self.claim(target - waiting)

    def keep_share(self) -> None:
        """Renew the units ahead of expiry; take more while jobs wait; return idle ones."""
        if self.share.renew_due():
            self.share.renew()
        with self._changed:
            waiting = len(self._pending)
        held = self.share.held()
        now = time.monotonic()
        if waiting and held < self._units_total and now >= self._next_acquire:
            if self.share.acquire(min(waiting, self._units_total - held)) == 0:
                self._next_acquire = now + ACQUIRE_BACKOFF
        if not waiting:
            self.share.release(idle_for=IDLE_RETURN)

    def give_up_waiting(self) -> int:
        """Put back in the queue the claimed jobs that found no unit within `patience`."""
        now = time.monotonic()
        with self._changed:
            late = [w.job for w in self._pending if w.give_up_at <= now]
            if late:
                self._pending = deque(w for w in self._pending if w.give_up_at > now)
        if late:
            self.dispatcher.wait_for_share(late, self.patience)
        return len(late)

    def collect(self, timeout: float | None = 0.0) -> int:
        """Take the senders' results, waiting up to `timeout` (None: forever) for the first."""
        taken: list[Sent] = []
        try:
            if timeout is None or timeout > 0:
                taken.append(self._results.get(timeout=timeout))
            while True:
                taken.append(self._results.get_nowait())
        except queue.Empty:
            pass
        for sent in taken:
            with self._changed:
                self._in_flight -= 1
                if not sent.sent:  # its unit's lease ran out first: another unit, soon
                    self._pending.appendleft(Waiting(sent.job, time.monotonic() + self.patience))
                    self._changed.notify_all()
            if sent.reply is not None:
                self._answers.append((sent.job, sent.reply))
                self._oldest_answer = min(self._oldest_answer, time.monotonic())
        return len(taken)

    def record(self, force: bool = False) -> int:
        """Store the answers gathered so far in one transaction, when enough have come."""
        due = time.monotonic() - self._oldest_answer >= RECORD_EVERY
        if not self._answers or not (force or due or len(self._answers) >= RECORD_BATCH):
            return 0
        # Dropped only once stored: if the database fails, the next pass tries again.
        answers = self._answers
        self.dispatcher.record(answers)
        self._answers, self._oldest_answer = [], math.inf
        return len(answers)

    def busy(self) -> bool:
        with self._changed:
            return bool(self._pending or self._in_flight)

    def step(self) -> int:
        """One pass of the main thread (without claiming); returns answers recorded."""
        self.collect()
        self.keep_share()
        self.give_up_waiting()
        return self.record(force=not self.busy())

    def run_once(self) -> int:
        """Tidy up (and prune, one pass), then claim one batch and send it; returns
        attempts recorded."""
        self.tidy()
        if self.pruning is not None:
            self.pruning.run_pass()
        self.claim(self.batch)
        made = 0
        while self.busy():
            made += self.step()
            self.collect(timeout=0.05)
        made += self.step() + self.record(force=True)
        self.share.release()
        return made

    def run_forever(self, stop: threading.Event, idle_sleep: float = 0.5) -> None:
        """Claim (here), keep the units and record (in threads of their own) until
        `stop` is set, then drain."""
        helpers = [
            threading.Thread(target=self._keep, args=(stop,), name="stop-keeper"),
            threading.Thread(target=self._record_all, args=(stop,), name="stop-recorder"),
        ]
        if self.pruning is not None:
            helpers.append(threading.Thread(target=self._prune_all, args=(stop,), name="pruner"))
        for thread in helpers:
            thread.start()
        last_tidy = -math.inf
        while not stop.is_set():
            try:
                if time.monotonic() - last_tidy > TIDY_EVERY:
                    self.tidy()
                    last_tidy = time.monotonic()
                claimed = self.claim_more()
                stop.wait(idle_sleep if not claimed and not self.busy() else KEEP_EVERY)
            except Exception:  # keep the worker alive; leases return the claimed work
                log.exception("worker pass failed")
                stop.wait(idle_sleep)
        for thread in helpers:
            thread.join()
        self.drain()

    def _keep(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.keep_share()
                self.give_up_waiting()
            except Exception:  # the units' leases run out by themselves if this fails
                log.exception("keeping the rate units failed")
            stop.wait(KEEP_EVERY)

    def _record_all(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.collect(timeout=KEEP_EVERY)
                self.record()
            except Exception:  # kept, and tried again on the next pass
                log.exception("recording answers failed")
                stop.wait(RECORD_EVERY)

    def _prune_all(self, stop: threading.Event) -> None:
        assert self.pruning is not None  # noqa: S101 - started only with one
        while not stop.is_set():
            try:
                pruned = self.pruning.run_pass()
                # Again at once only while there is more and no other process prunes.
                more = not pruned.done and not pruned.busy
            except Exception:  # tried again on the next pass; nothing half-done stays
                log.exception("pruning old deliveries failed")
                more = False
            stop.wait(PRUNE_PAUSE if more else PRUNE_EVERY)

    def drain(self) -> None:
        """Stop pacing, record every answer, and give back what was not sent."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._pacer.join()
        while self.busy_sending():
            self.collect(timeout=None)
        with self._changed:
            unsent = [w.job for w in self._pending]
            self._pending.clear()
        if unsent:
            with write_transaction(self.dispatcher.sessions) as session:
                release(session, [job.stop_request_id for job in unsent], self.dispatcher.name)
        self.record(force=True)
        self.share.release()

    def busy_sending(self) -> bool:
        with self._changed:
            return self._in_flight > 0

    def close(self) -> None:
        if not self._closing:
            self.drain()
        self._pool.shutdown(wait=True)
