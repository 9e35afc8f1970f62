"""`manager worker`'s event sender: the outbox's due sends, POSTed as Standard Webhooks.

One loop keeps up to `threads` requests in flight: it claims what is due
(manager/events/sending.py) while there is room, hands each claim to a pool of
threads that sign and POST it, and records the answers in batches, so that neither
a slow receiver nor a distant database holds up the rest. Requests are signed by the
`standardwebhooks` library (webhook-id, webhook-timestamp, webhook-signature over
id.timestamp.body), with every secret the subscription signs with now; they time out
after `timeout` seconds and follow no redirect.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import urllib3
from sqlalchemy import Engine
from standardwebhooks.webhooks import Webhook

from manager.clock import utcnow
from manager.db import write_connection
from manager.events.secrets import Sealer, SecretUnreadable
from manager.events.sending import (
    MAX_ANSWER,
    Answer,
    Claimed,
    Recorded,
    RetryPolicy,
    claim,
    record,
)
from manager.metrics import count_event_outcomes, count_event_send

log = logging.getLogger(__name__)

DEFAULT_THREADS = 32
DEFAULT_TIMEOUT = 10.0
# Answers are recorded at least this often, or as soon as this many wait.
RECORD_EVERY = 0.1
RECORD_BATCH = 200
# With nothing due, look again after this long.
IDLE_SLEEP = 0.25
# Read at most this much of an answer; a longer one is cut off (and its connection closed).
READ_AT_MOST = 64 * 1024
USER_AGENT = "manager-events/1"


@dataclass
class EventSender:
    """Sends the outbox, from one process; several may run against one database."""

    engine: Engine
    sealer: Sealer
    threads: int = DEFAULT_THREADS
    timeout: float = DEFAULT_TIMEOUT
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    rng: random.Random = field(default_factory=random.Random)
    _connections: urllib3.PoolManager | None = field(default=None, repr=False)
    _signers: dict[tuple[str, ...], list[Webhook]] = field(default_factory=dict, repr=False)

    @property
    def lease(self) -> timedelta:
        """How long a claim lasts: the longest a request may take, twice, and a margin."""
        return timedelta(seconds=2 * self.timeout + 5)

    def run_once(self) -> Recorded:
        """Send what is due now, once, and record the answers."""
        claimed = self._claim(self.threads * 4)
        if not claimed:
            return Recorded()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="event-sender") as pool:
            answers = list(pool.map(self.send, claimed))
        return self._record(answers)

    def run_forever(self, stop: threading.Event) -> None:
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="event-sender")
        in_flight: dict[Future[Answer], Claimed] = {}
        answers: list[Answer] = []
        last_record = time.monotonic()
        try:
            while not stop.is_set():
                room = self.threads * 2 - len(in_flight)
                found = 0
                if room >= self.threads:
                    for claimed in self._claim_quietly(room):
                        in_flight[pool.submit(self.send, claimed)] = claimed
                        found += 1
                if in_flight:
                    done, _ = wait(
                        list(in_flight), timeout=RECORD_EVERY, return_when=FIRST_COMPLETED
                    )
                    for future in done:
                        del in_flight[future]
                        answers.append(future.result())
                elif not found:
                    stop.wait(IDLE_SLEEP)
                due = time.monotonic() - last_record >= RECORD_EVERY
                if answers and (due or len(answers) >= RECORD_BATCH or not in_flight):
                    self._record_quietly(answers)
                    answers = []
                    last_record = time.monotonic()
            for future in list(in_flight):
                answers.append(future.result())
            self._record_quietly(answers)
        finally:
            pool.shutdown(wait=True)

    # --- one request ------------------------------------------------------------------

    def send(self, claimed: Claimed) -> Answer:
        """Sign and POST one event; never raises: a failure is an answer too."""
        try:
            answer = self._post(claimed)
        except Exception as exc:  # a bug here must not stop the sender's loop
            log.exception("sending event %s failed", claimed.webhook_id)
            answer = Answer(claimed, utcnow(), 0, error=f"not sent: {type(exc).__name__}")
        count_event_send(answer.delivered, answer.elapsed_ms / 1000)
        if not answer.delivered:
            log.info(
                "event %s to subscription %s: attempt %s failed (%s)",
                claimed.webhook_id,
                claimed.subscription_id,
                claimed.attempt,
                answer.status if answer.status is not None else answer.error,
                extra={"attempt": claimed.attempt, "elapsed_ms": answer.elapsed_ms},
            )
        return answer

    def _post(self, claimed: Claimed) -> Answer:
        started = time.monotonic()
        at = utcnow()
        try:
            headers = self._headers(claimed)
        except SecretUnreadable as exc:
            log.warning("event %s cannot be signed: %s", claimed.webhook_id, exc)
            return Answer(claimed, at, 0, error=f"not sent: {exc}")
        try:
            response = self._pool.request(
                "POST",
                claimed.url,
                body=claimed.body.encode(),
                headers=headers,
                timeout=urllib3.Timeout(connect=min(self.timeout, 5.0), read=self.timeout),
                redirect=False,
                retries=False,
                preload_content=False,
            )
            text = _first_bytes(response)
            answer = Answer(claimed, at, _ms(started), status=response.status, answer=text)
        except urllib3.exceptions.TimeoutError:
            answer = Answer(claimed, at, _ms(started), error="no answer: timed out")
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.NewConnectionError, OSError):
            answer = Answer(claimed, at, _ms(started), error="no answer: connection failed")
        except urllib3.exceptions.HTTPError as exc:
            # Only the kind: a message may quote the URL, which may hold a token.
            answer = Answer(claimed, at, _ms(started), error=f"no answer: {type(exc).__name__}")
        return answer

    def _headers(self, claimed: Claimed) -> dict[str, str]:
        now = datetime.now(UTC)
        signatures = [
            signer.sign(claimed.webhook_id, now, claimed.body)
            for signer in self._signers_of(claimed.sealed_secrets)
        ]
        return {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": claimed.webhook_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": " ".join(signatures),
        }

    def _signers_of(self, sealed: tuple[str, ...]) -> list[Webhook]:
        # Keyed by the sealed secrets, so a rotation is a new key: never stale.
        signers = self._signers.get(sealed)
        if signers is None:
            signers = [Webhook(self.sealer.open(s)) for s in sealed]
            if len(self._signers) > 1000:
                self._signers.clear()
            self._signers[sealed] = signers
        return signers

    @property
    def _pool(self) -> urllib3.PoolManager:
        """Keep-alive connections, shared by the sending threads: urllib3 is requests'
        own transport, without the layers a webhook does not need (they cost half the
        CPU of a request); it reads no proxy or .netrc from the worker's environment."""
        if self._connections is None:
            self._connections = urllib3.PoolManager(num_pools=64, maxsize=self.threads)
        return self._connections

    # --- the database -------------------------------------------------------------------

    def _claim(self, limit: int) -> list[Claimed]:
        with write_connection(self.engine) as conn:
            return claim(conn, now=utcnow(), limit=limit, lease=self.lease)

    def _record(self, answers: list[Answer]) -> Recorded:
        with write_connection(self.engine) as conn:
            recorded = record(conn, answers, policy=self.policy, now=utcnow(), rng=self.rng)
        count_event_outcomes(recorded.delivered, recorded.failed, len(recorded.disabled))
        for sub_id in recorded.disabled:
            log.warning("subscription %s disabled: its receiver keeps failing", sub_id)
        return recorded

    def _claim_quietly(self, limit: int) -> list[Claimed]:
        try:
            return self._claim(limit)
        except Exception:  # the database may be away: try again on the next turn
            log.exception("could not claim events to send")
            time.sleep(IDLE_SLEEP)
            return []

    def _record_quietly(self, answers: list[Answer]) -> None:
        """Record, trying again while the database is away: an unrecorded answer only
        means the send goes out again once its lease ends, with the same webhook-id."""
        for wait_for in (0.0, 0.5, 1.0, 2.0, 4.0):
            time.sleep(wait_for)
            try:
                self._record(answers)
                return
            except Exception:
                log.exception("could not record %s event answers", len(answers))


def _first_bytes(response: urllib3.BaseHTTPResponse) -> str:
    """The start of the answer, for the delivery log. An answer read to its end (a short
    one) gives its connection back to be kept; a longer one's is closed."""
    read = b""
    while len(read) <= READ_AT_MOST:
        chunk = response.read(8192)
        if not chunk:
            break
        read += chunk
    if len(read) <= READ_AT_MOST:
        response.release_conn()
    else:
        response.close()
    # No NUL: PostgreSQL's text cannot hold it.
    return read[:MAX_ANSWER].decode("utf-8", "replace").replace("\x00", "\ufffd")[:MAX_ANSWER]


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
