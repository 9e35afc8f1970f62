"""`manager worker`: sends queued stop requests within the shared rate limit.

Several workers (and app processes) may run against one database: work is
claimed under a lease, so no request is sent by two of them at once.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

from .db import write_transaction
from .dispatch import Dispatcher
from .lifecycle import utcnow
from .stopping import Job, claim_due, queue_restop, release, stuck_stopping
from .zego.client import ZegoReply

log = logging.getLogger(__name__)

# Keep this worker's reserved slots at least this far ahead of now, so that a slow
# pass of the claiming thread (a busy database, a loaded host) never leaves the
# limiter idle. An operator's own stop waits behind at most about this much.
LOOKAHEAD = 0.25
# Answers are recorded in batches, at least this often.
RECORD_EVERY = 0.25


@dataclass(frozen=True)
class Slotted:
    """A claimed job, its rate slot (monotonic time) and when its claim must be let go."""

    job: Job
    slot: float
    send_by: float


class StopWorker:
    """Claims due stop requests, reserves their rate slots ahead, and sends each in its slot.

    One thread claims, reserves slots in batches (one statement per batch) and records
    answers in batches; `threads` sender threads each take the next slotted job, sign
    it, wait for its slot and send it, so a slow answer never makes the next call late.
    A call that misses its slot comes back to be given a fresh one.
    """

    def __init__(self, dispatcher: Dispatcher, threads: int = 4, batch: int = 16) -> None:
        self.dispatcher = dispatcher
        self.threads = threads
        self.batch = batch
        # A claimed job may wait for its slot for up to half of its lease.
        self._patience = dispatcher.policy.lease.total_seconds() / 2
        self._slotted: queue.SimpleQueue[Slotted | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Slotted, ZegoReply | None]] = queue.SimpleQueue()
        self._unslotted: list[tuple[Job, float]] = []  # (job, send_by)
        self._answers: list[tuple[Job, ZegoReply]] = []
        self._oldest_answer = math.inf
        self._outstanding = 0  # handed to the senders, not back yet
        self._last_slot = -math.inf
        self._senders = [
            threading.Thread(target=self._send_loop, name=f"stop-sender-{i}", daemon=True)
            for i in range(threads)
        ]
        for sender in self._senders:
            sender.start()

    # -- the sender threads ---------------------------------------------------------

    def _send_loop(self) -> None:
        while (item := self._slotted.get()) is not None:
            try:
                reply = self.dispatcher.call_in_slot(item.job, item.slot)
            except Exception:  # a bug worth seeing; the lease returns the job to the queue
                log.exception("stop attempt failed")
                reply = None
            self._done.put((item, reply))

    # -- the claiming thread --------------------------------------------------------

    def requeue_stuck(self) -> None:
        with write_transaction(self.dispatcher.sessions) as session:
            for task in stuck_stopping(session, utcnow()):
                if queue_restop(session, task, utcnow()):
                    log.warning("task %s still stopping: queued another stop", task.task_id)

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
            self._slotted.put(Slotted(job, slot, send_by))
            self._outstanding += 1
            self._last_slot = max(self._last_slot, slot)

    def collect(self, timeout: float | None) -> int:
        """Take the senders' results, waiting up to `timeout` (None: forever, 0: not at all)
        for the first of them; returns how many were taken."""
        taken = 0
        try:
            if timeout == 0:
                item, reply = self._done.get_nowait()
            else:
                item, reply = self._done.get(timeout=timeout)
            while True:
                taken += 1
                self._outstanding -= 1
                if reply is None:  # missed its slot: slot it again
                    self._unslotted.append((item.job, item.send_by))
                else:
                    self._answers.append((item.job, reply))
                    self._oldest_answer = min(self._oldest_answer, time.monotonic())
                item, reply = self._done.get_nowait()
        except queue.Empty:
            pass
        return taken

    def record(self, force: bool = False) -> int:
        """Store the answers gathered so far in one transaction, when enough have come."""
        due = time.monotonic() - self._oldest_answer >= RECORD_EVERY
        if not self._answers or not (force or due or len(self._answers) >= self.batch):
            return 0
        answers, self._answers, self._oldest_answer = self._answers, [], math.inf
        self.dispatcher.record(answers)
        return len(answers)

    def _release(self, jobs: list[Job]) -> None:
        if jobs:
            with write_transaction(self.dispatcher.sessions) as session:
                for job in jobs:
                    release(session, job.stop_request_id)

    def run_once(self) -> int:
        """Re-queue stuck tasks, then claim and send one batch; returns attempts recorded."""
        self.requeue_stuck()
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
        or to record, so the sender threads have the processor when their slots come."""
        last_restop_check = -math.inf
        while not stop.is_set():
            idle = False
            try:
                if time.monotonic() - last_restop_check > idle_sleep * 10:
                    self.requeue_stuck()
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
        for _ in self._senders:
            self._slotted.put(None)
        for sender in self._senders:
            sender.join()
