"""`manager worker`: sends queued stop requests within the shared rate limit.

Several workers (and app processes) may run against one database: work is
claimed under a lease, so no request is sent by two of them at once.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from .db import write_transaction
from .dispatch import Dispatcher
from .lifecycle import utcnow
from .stopping import Job, claim_due, queue_restop, release, stuck_stopping
from .zego.client import ZegoReply

log = logging.getLogger(__name__)


class StopWorker:
    """Claims due stop requests and sends them from a thread pool, in reserved rate slots.

    Claiming tops the pool up as attempts finish, so sending never waits for a whole
    batch; the slots for a claimed batch are reserved with one statement.
    """

    def __init__(self, dispatcher: Dispatcher, threads: int = 8, batch: int = 32) -> None:
        self.dispatcher = dispatcher
        self.threads = threads
        self.batch = batch
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="stop-sender")
        self._in_flight: set[Future[tuple[Job, ZegoReply]]] = set()

    def requeue_stuck(self) -> None:
        with write_transaction(self.dispatcher.sessions) as session:
            for task in stuck_stopping(session, utcnow()):
                if queue_restop(session, task, utcnow()):
                    log.warning("task %s still stopping: queued another stop", task.task_id)

    def claim_and_submit(self, limit: int) -> int:
        """Claim up to `limit` due requests and hand them to the pool; returns how many."""
        policy = self.dispatcher.policy
        with write_transaction(self.dispatcher.sessions) as session:
            jobs = claim_due(
                session, claimant=self.dispatcher.name, limit=limit, policy=policy, now=utcnow()
            )
        if not jobs:
            return 0
        # A claimed job may wait for its slot for up to half of its lease.
        waits = self.dispatcher.limiter.reserve_many(len(jobs), policy.lease.total_seconds() / 2)
        if waits is None:
            with write_transaction(self.dispatcher.sessions) as session:
                for job in jobs:
                    release(session, job.stop_request_id)
            return 0
        for job, delay in zip(jobs, waits, strict=True):
            self._in_flight.add(self._pool.submit(self._call, job, delay))
        return len(jobs)

    def _call(self, job: Job, delay: float) -> tuple[Job, ZegoReply]:
        return job, self.dispatcher.call(job, delay)

    def _collect(self, timeout: float | None) -> int:
        """Record the attempts finished so far, in one transaction."""
        if not self._in_flight:
            return 0
        done, self._in_flight = wait(self._in_flight, timeout=timeout, return_when=FIRST_COMPLETED)
        # An error here is a bug worth seeing; the lease returns the job to the queue.
        self.dispatcher.record([future.result() for future in done])
        return len(done)

    def run_once(self) -> int:
        """Re-queue stuck tasks, then claim and send one batch; returns attempts made."""
        self.requeue_stuck()
        self.claim_and_submit(self.batch)
        made = 0
        while self._in_flight:
            made += self._collect(timeout=None)
        return made

    def run_forever(self, stop: threading.Event, idle_sleep: float = 0.5) -> None:
        last_restop_check = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() - last_restop_check > idle_sleep * 10:
                    self.requeue_stuck()
                    last_restop_check = time.monotonic()
                room = 2 * self.threads - len(self._in_flight)
                claimed = self.claim_and_submit(min(room, self.batch)) if room > 0 else 0
                if claimed == 0 and not self._in_flight:
                    stop.wait(idle_sleep)
                else:
                    self._collect(timeout=0.05 if claimed else idle_sleep)
            except Exception:  # keep the worker alive; leases return the claimed work
                log.exception("worker pass failed")
                stop.wait(idle_sleep)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
