"""`manager worker`: sends queued stop requests within the shared rate limit.

Several workers (and app processes) may run against one database: work is
claimed under a lease, so no request is sent by two of them at once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Protocol

from .db import write_transaction
from .dispatch import Dispatcher, log_call, send_in_window
from .housekeeping import prune_nonces
from .lifecycle import utcnow
from .stopping import Job, claim_due, queue_restop, release, stuck_stopping
from .zego.client import ClientConfig, ZegoClient, ZegoReply

log = logging.getLogger(__name__)

# Keep this worker's reserved slots at least this far ahead of now, so that a slow
# pass of the claiming thread (a busy database, a loaded host) never leaves the
# limiter idle. An operator's own stop waits behind at most about this much.
LOOKAHEAD = 0.25
# Answers are recorded in batches, at least this often.
RECORD_EVERY = 0.25
# Sender threads wake for their slots: a short switch interval hands them the GIL
# soon after, whatever else their process is doing.
SWITCH_INTERVAL = 0.0005
STARTUP_TIMEOUT = 60.0
READY = "ready"


@dataclass(frozen=True)
class Slotted:
    """A claimed job, when it may leave (monotonic times), and when its claim must be let go."""

    job: Job
    earliest: float
    latest: float
    send_by: float


@dataclass(frozen=True)
class Sent:
    """What became of a slotted job: ZEGOCLOUD's reply, or None when it missed its slot."""

    item: Slotted
    reply: ZegoReply | None
    late: float


class SenderDied(Exception):
    """The sender process is gone; what it held stays claimed until the leases run out."""


class Senders(Protocol):
    def submit(self, item: Slotted) -> None: ...
    def take(self, timeout: float | None) -> list[Sent]: ...
    def close(self) -> None: ...


class ThreadSenders:
    """Sender threads: each takes the next slotted job, signs it, waits and sends it,
    so a slow answer never makes the next call late."""

    def __init__(self, client: ZegoClient, threads: int) -> None:
        self._client = client
        self._jobs: queue.SimpleQueue[Slotted | None] = queue.SimpleQueue()
        self._sent: queue.SimpleQueue[Sent] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._send_loop, name=f"stop-sender-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _send_loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            try:
                reply, late = send_in_window(self._client, item.job, item.earliest, item.latest)
            except Exception:  # a bug worth seeing; the lease returns the job to the queue
                log.exception("stop attempt failed")
                reply, late = None, 0.0
            self._sent.put(Sent(item, reply, late))

    def submit(self, item: Slotted) -> None:
        self._jobs.put(item)

    def take(self, timeout: float | None) -> list[Sent]:
        """What the senders finished, waiting up to `timeout` (None: forever) for the first."""
        taken: list[Sent] = []
        try:
            if timeout is not None and timeout <= 0:
                taken.append(self._sent.get_nowait())
            else:
                taken.append(self._sent.get(timeout=timeout))
            while True:
                taken.append(self._sent.get_nowait())
        except queue.Empty:
            return taken

    def close(self) -> None:
        """Let every submitted job go (or miss its slot), then stop the threads."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


class ProcessSenders:
    """ThreadSenders in a child process of their own, reached through two pipes.

    The claiming thread's database work holds its process's GIL for a millisecond
    or more at a time, and on a busy host the scheduler may pause it there; a sender
    thread of the same process then waits for the GIL and misses its slot, or worse,
    sends late. A child that only waits and sends shares its GIL with no such work.
    """

    def __init__(self, config: ClientConfig, threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        child_jobs, self._jobs = context.Pipe(duplex=False)
        self._sent, child_sent = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_sender_process,
            args=(child_jobs, child_sent, config, threads),
            name="stop-sender",
            daemon=True,
        )
        self._process.start()
        child_jobs.close()
        child_sent.close()
        # No slot is reserved before the child can send in it (it starts in about a second).
        if not self._sent.poll(STARTUP_TIMEOUT) or self._sent.recv() != READY:
            self.close()
            raise SenderDied("the sender process did not start")

    def submit(self, item: Slotted) -> None:
        try:
            self._jobs.send(item)
        except OSError as exc:
            raise SenderDied("the sender process is gone") from exc

    def take(self, timeout: float | None) -> list[Sent]:
        taken: list[Sent] = []
        try:
            ready = self._sent.poll(None if timeout is None else max(0.0, timeout))
            while ready:
                taken.append(self._sent.recv())
                ready = self._sent.poll(0)
        except (EOFError, OSError) as exc:
            if not taken:
                raise SenderDied("the sender process is gone") from exc
        return taken

    def close(self) -> None:
        """Stop the child once it has sent (or dropped) what it holds."""
        try:
            self._jobs.send(None)
        except OSError:
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._jobs.close()
        self._sent.close()


def _sender_process(jobs: Connection, sent: Connection, config: ClientConfig, threads: int) -> None:
    """The sender child: slotted jobs in through one pipe, what became of them out the other."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent says when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.setswitchinterval(SWITCH_INTERVAL)
    senders = ThreadSenders(config.make(), threads)
    closed = threading.Event()
    sent.send(READY)

    def forward() -> None:
        while True:
            taken = senders.take(0.05)
            for item in taken:
                sent.send(item)
            if closed.is_set() and not taken:
                return

    forwarder = threading.Thread(target=forward, name="stop-sender-results")
    forwarder.start()
    try:
        while (item := jobs.recv()) is not None:
            senders.submit(item)
    except EOFError:  # the parent is gone
        pass
    senders.close()
    closed.set()
    forwarder.join()


class StopWorker:
    """Claims due stop requests, reserves their rate slots ahead, and sends each in its slot.

    One thread claims, reserves slots in batches (one statement per batch) and records
    answers in batches; the senders (threads, or threads in a process of their own)
    sign each job, wait for its slot and send it. A call that misses its slot comes
    back to be given a fresh one.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        threads: int = 4,
        batch: int = 16,
        *,
        separate_process: bool = False,
        nonce_max_age: int | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        # CALLBACK_MAX_AGE, to keep the nonce ledger to its window; None leaves it be.
        self.nonce_max_age = nonce_max_age
        self.threads = threads
        self.batch = batch
        self.separate_process = separate_process
        # A claimed job may wait for its slot for up to half of its lease.
        self._patience = dispatcher.policy.lease.total_seconds() / 2
        self._unslotted: list[tuple[Job, float]] = []  # (job, send_by)
        self._answers: list[tuple[Job, ZegoReply]] = []
        self._oldest_answer = math.inf
        self._outstanding = 0  # handed to the senders, not back yet
        self._last_slot = -math.inf
        self._senders = self._start_senders()

    def _start_senders(self) -> Senders:
        if self.separate_process:
            return ProcessSenders(self.dispatcher.client_config, self.threads)
        return ThreadSenders(self.dispatcher.client, self.threads)

    def _restart_senders(self) -> None:
        # What the dead process held stays claimed until the leases expire, then goes
        # out again with a new Sequence: whether it was sent cannot be known.
        log.error("sender process died holding %d calls; starting another", self._outstanding)
        self._outstanding = 0
        self._senders.close()
        self._senders = self._start_senders()

    def requeue_stuck(self) -> None:
        with write_transaction(self.dispatcher.sessions) as session:
            for task in stuck_stopping(session, utcnow()):
                if queue_restop(session, task, utcnow()):
                    log.warning("task %s still stopping: queued another stop", task.task_id)

    def tidy(self) -> None:
        """Re-queue stuck tasks, and keep the nonce ledger to its window."""
        self.requeue_stuck()
        if self.nonce_max_age is not None:
            with write_transaction(self.dispatcher.sessions) as session:
                pruned = prune_nonces(session, utcnow(), self.nonce_max_age)
            if pruned:
                log.info("deleted %d callback nonces older than the freshness window", pruned)

    def claim(self, limit: int) -> int:
        """Claim up to `limit` due requests, to be slotted; returns how many."""
        policy = self.dispatcher.policy
        with write_transaction(self.dispatcher.sessions) as session:
            jobs = claim_due(
                session, claimant=self.dispatcher.name, limit=limit, policy=policy, now=utcnow()
            )
        send_by = time.monotonic() + self._patience
        self._unslotted += [(job, send_by) for job in jobs]
        return len(jobs)

    def slot_claimed(self) -> None:
        """Reserve slots for the claimed jobs (one statement) and hand them to the senders."""
        if not self._unslotted:
            return
        now = time.monotonic()
        expired = [job for job, send_by in self._unslotted if send_by <= now]
        waiting = [(job, send_by) for job, send_by in self._unslotted if send_by > now]
        slots = None
        if waiting:
            max_wait = min(send_by for _, send_by in waiting) - now
            slots = self.dispatcher.limiter.reserve_many(len(waiting), max_wait)
        if slots is None:
            expired += [job for job, _ in waiting]
            waiting = []
        self._unslotted = []
        self._release(expired)
        for (job, send_by), slot in zip(waiting, slots or [], strict=True):
            earliest, latest = self.dispatcher.send_window(slot)
            item = Slotted(job, earliest, latest, send_by)
            try:
                self._senders.submit(item)
            except SenderDied:
                self._restart_senders()
                self._senders.submit(item)  # a late start only makes it miss its slot
            self._outstanding += 1
            self._last_slot = max(self._last_slot, slot)

    def collect(self, timeout: float | None) -> int:
        """Take the senders' results, waiting up to `timeout` (None: forever, 0: not at all)
        for the first of them; returns how many were taken."""
        try:
            taken = self._senders.take(timeout)
        except SenderDied:
            self._restart_senders()
            return 0
        for sent in taken:
            self._outstanding -= 1
            if sent.reply is None:  # missed its slot: slot it again
                job, late_ms = sent.item.job, 1000 * sent.late
                log.debug(
                    "task=%s seq=%s missed its slot by %.1f ms", job.task_id, job.sequence, late_ms
                )
                self._unslotted.append((sent.item.job, sent.item.send_by))
            else:
                log_call(sent.item.job, sent.reply, sent.late)
                self._answers.append((sent.item.job, sent.reply))
                self._oldest_answer = min(self._oldest_answer, time.monotonic())
        return len(taken)

    def record(self, force: bool = False) -> int:
        """Store the answers gathered so far in one transaction, when enough have come."""
        due = time.monotonic() - self._oldest_answer >= RECORD_EVERY
        if not self._answers or not (force or due or len(self._answers) >= self.batch):
            return 0
        # Dropped only once stored: if the database fails, the next pass tries again.
        answers = self._answers
        self.dispatcher.record(answers)
        self._answers, self._oldest_answer = [], math.inf
        return len(answers)

    def _release(self, jobs: list[Job]) -> None:
        if jobs:
            with write_transaction(self.dispatcher.sessions) as session:
                for job in jobs:
                    release(session, job.stop_request_id, self.dispatcher.name)

    def run_once(self) -> int:
        """Tidy up, then claim and send one batch; returns attempts recorded."""
        self.tidy()
        self.claim(self.batch)
        made = 0
        while self._unslotted or self._outstanding:
            self.slot_claimed()
            if self._outstanding:
                self.collect(timeout=None)
            made += self.record(force=not self._outstanding)
        return made + self.record(force=True)

    def run_forever(self, stop: threading.Event, idle_sleep: float = 0.5) -> None:
        """Keep slots reserved LOOKAHEAD ahead while there is work; wake only to refill
        or to record, so that the senders have the processor when their slots come."""
        last_restop_check = -math.inf
        while not stop.is_set():
            idle = False
            try:
                if time.monotonic() - last_restop_check > idle_sleep * 10:
                    self.tidy()
                    last_restop_check = time.monotonic()
                self.collect(timeout=0)
                if self._last_slot - time.monotonic() < LOOKAHEAD:
                    idle = self.claim(self.batch) == 0 and not self._unslotted
                    self.slot_claimed()
                self.record(force=not self._outstanding)
                if idle or not self._outstanding:
                    stop.wait(idle_sleep if idle else 0.05)
                    continue
                now = time.monotonic()
                wake = min(self._last_slot - LOOKAHEAD, self._oldest_answer + RECORD_EVERY)
                stop.wait(min(max(wake - now, 0.01), RECORD_EVERY))
            except Exception:  # keep the worker alive; leases return the claimed work
                log.exception("worker pass failed")
                stop.wait(idle_sleep)
        self.drain()

    def drain(self) -> None:
        """Let the slotted calls go, record every answer, give back what was not sent."""
        while self._outstanding:
            self.collect(timeout=None)
        self._release([job for job, _ in self._unslotted])
        self._unslotted = []
        self.record(force=True)

    def close(self) -> None:
        self._senders.close()
