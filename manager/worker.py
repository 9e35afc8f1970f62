"""`manager worker`: sends queued stop requests within the shared rate limit.

Several workers (and app processes) may run against one database: work is
claimed under a lease, so no request is sent by two of them at once.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from .db import write_transaction
from .dispatch import Dispatcher
from .lifecycle import utcnow
from .stopping import claim_due, queue_restop, stuck_stopping

log = logging.getLogger(__name__)


class StopWorker:
    def __init__(self, dispatcher: Dispatcher, threads: int = 8, batch: int = 32) -> None:
        self.dispatcher = dispatcher
        self.threads = threads
        self.batch = batch
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="stop-sender")

    def run_once(self) -> int:
        """Re-queue stuck tasks, then claim and send one batch; returns attempts made."""
        sessions = self.dispatcher.sessions
        with write_transaction(sessions) as session:
            for task in stuck_stopping(session, utcnow()):
                if queue_restop(session, task, utcnow()):
                    log.warning("task %s still stopping: queued another stop", task.task_id)
        with write_transaction(sessions) as session:
            jobs = claim_due(
                session,
                claimant=self.dispatcher.name,
                limit=self.batch,
                policy=self.dispatcher.policy,
                now=utcnow(),
            )
        # A claimed job may wait for its rate slot up to most of its lease.
        max_wait = self.dispatcher.policy.lease.total_seconds() / 2
        results = list(self._pool.map(lambda job: self.dispatcher.send(job, max_wait), jobs))
        return sum(1 for r in results if r is not None)

    def run_forever(self, stop: threading.Event, idle_sleep: float = 0.5) -> None:
        while not stop.is_set():
            try:
                sent = self.run_once()
            except Exception:  # keep the worker alive; the lease returns the work
                log.exception("worker pass failed")
                sent = 0
            if sent == 0:
                stop.wait(idle_sleep)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
