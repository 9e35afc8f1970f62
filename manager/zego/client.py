"""ZEGOCLOUD server API client: signed calls, the JSON envelope, and return-code classes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import requests

from manager.zego.guard import GuardedAdapter, SendGuard, guarded
from manager.zego.signing import api_signature, new_nonce

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """ZEGOCLOUD's answer to a call, classified: done, worth another try, or refused."""

    SUCCESS = "success"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


# (connect, read) seconds; the connect timeout is just over a multiple of 3 s, TCP's
# retransmission window, as requests' documentation advises.
DEFAULT_TIMEOUT = (3.05, 10.0)

# Connections kept open to ZEGOCLOUD: one per call that may be in flight at once.
DEFAULT_POOL_SIZE = 32

# SPEC 3.3 and zego-reference.md section 7: worth another try later.
BAD_INPUT = 110200002  # "Input parameter error", a Sequence not above ZEGO's among them
RETRYABLE_CODES = frozenset(
    {
        110200001,  # failed, retry
        110200151,  # transcoding task failed, retry
        110200190,  # overload (start)
        110200191,  # overload (stop)
        110200194,  # overload (generic)
        100000015,  # gateway internal error
    }
)


@dataclass(frozen=True)
class ZegoReply:
    outcome: Outcome
    code: int | None
    message: str
    request_id: str | None
    http_status: int | None
    elapsed_ms: int

    @property
    def ok(self) -> bool:
        return self.outcome == Outcome.SUCCESS


@dataclass(frozen=True)
class PreparedCall:
    """A signed request and the send settings Session.request would use for it."""

    request: requests.PreparedRequest
    settings: dict[str, Any]


def classify(code: int) -> Outcome:
    if code == 0:
        return Outcome.SUCCESS
    return Outcome.RETRYABLE if code in RETRYABLE_CODES else Outcome.PERMANENT


class ZegoClient:
    """Calls one ZEGOCLOUD API endpoint; every dependency is passed in."""

    def __init__(
        self,
        http: requests.Session,
        base_url: str,
        app_id: int,
        server_secret: str,
        *,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = new_nonce,
    ) -> None:
        self._http = http
        self._base_url = base_url
        self._app_id = app_id
        self._secret = server_secret
        self._timeout = timeout
        self._clock = clock
        self._nonce = nonce

    def __repr__(self) -> str:  # never show the secret
        return f"ZegoClient(base_url={self._base_url!r}, app_id={self._app_id})"

    def stop_cloud_transcode(self, task_id: str, user_id: str, sequence: int) -> ZegoReply:
        return self.send(self.prepare_stop(task_id, user_id, sequence))

    def prepare_stop(self, task_id: str, user_id: str, sequence: int) -> PreparedCall:
        """A signed StopCloudTranscode, ready to send (the Timestamp may be 10 minutes off)."""
        body = {"TaskId": task_id, "UserId": user_id, "Sequence": sequence}
        return self.prepare("StopCloudTranscode", body)

    def start_cloud_transcode(self, body: dict[str, Any]) -> ZegoReply:
        return self.call("StartCloudTranscode", body)

    def signed_params(self, action: str) -> dict[str, str]:
        """The common query parameters, with a fresh nonce, Timestamp and Signature."""
        nonce = self._nonce()
        timestamp = int(self._clock())
        return {
            "Action": action,
            "AppId": str(self._app_id),
            "SignatureNonce": nonce,
            "Timestamp": str(timestamp),
            "Signature": api_signature(self._app_id, nonce, self._secret, timestamp),
            "SignatureVersion": "2.0",
        }

    def call(self, action: str, body: dict[str, Any]) -> ZegoReply:
        """POST one signed request; network failures and 5xx come back as retryable."""
        return self.send(self.prepare(action, body))

    def prepare(self, action: str, body: dict[str, Any]) -> PreparedCall:
        """Sign and encode a request now, so that sending it later costs as little as can be."""
        request = requests.Request(
            "POST", self._base_url, params=self.signed_params(action), json=body
        )
        prepared = self._http.prepare_request(request)
        # What Session.request would add from the environment (proxies, CA bundle), now.
        settings = self._http.merge_environment_settings(prepared.url, {}, None, None, None)
        return PreparedCall(prepared, dict(settings))

    def send(self, prepared: PreparedCall, guard: SendGuard | None = None) -> ZegoReply:
        """Send a prepared request once; network failures and 5xx come back as retryable.

        With a guard, nothing is sent once its deadline has passed (guard.DeadlinePassed
        is raised), and guard.written_at tells when the request's last byte left.
        """
        started = time.monotonic()
        try:
            if guard is None:
                response = self._send(prepared)
            else:
                with guarded(guard):
                    response = self._send(prepared)
        except requests.Timeout:
            return self._reply(Outcome.RETRYABLE, None, "timed out", None, None, started)
        except requests.RequestException as exc:
            return self._reply(
                Outcome.RETRYABLE, None, f"{type(exc).__name__}", None, None, started
            )
        return self._parse(response, started)

    def _send(self, prepared: PreparedCall) -> requests.Response:
        return self._http.send(prepared.request, timeout=self._timeout, **prepared.settings)

    def _parse(self, response: requests.Response, started: float) -> ZegoReply:
        status = response.status_code
        try:
            envelope = response.json()
            code = int(envelope["Code"])
            message = str(envelope.get("Message", ""))[:500]
            request_id = envelope.get("RequestId")
        except (ValueError, KeyError, TypeError):
            retryable = status == 429 or status >= 500
            outcome: Outcome = Outcome.RETRYABLE if retryable else Outcome.PERMANENT
            return self._reply(
                outcome, None, f"HTTP {status} without a ZEGO envelope", None, status, started
            )
        if status == 429 or status >= 500:
            outcome = Outcome.RETRYABLE
        elif status >= 400 and code == 0:
            outcome = Outcome.PERMANENT
        else:
            outcome = classify(code)
        return self._reply(
            outcome, code, message, None if request_id is None else str(request_id), status, started
        )

    @staticmethod
    def _reply(
        outcome: Outcome,
        code: int | None,
        message: str,
        request_id: str | None,
        http_status: int | None,
        started: float,
    ) -> ZegoReply:
        elapsed = int((time.monotonic() - started) * 1000)
        return ZegoReply(outcome, code, message, request_id, http_status, elapsed)


@dataclass(frozen=True)
class ClientConfig:
    """What a process needs to make its own client (a worker's sender process does)."""

    base_url: str
    app_id: int
    server_secret: str = field(repr=False)
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    pool_size: int = DEFAULT_POOL_SIZE

    def make(self) -> ZegoClient:
        return make_client(
            self.base_url, self.app_id, self.server_secret, self.timeout, self.pool_size
        )


def make_client(
    base_url: str,
    app_id: int,
    server_secret: str,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    pool_size: int = DEFAULT_POOL_SIZE,
) -> ZegoClient:
    """A client with its own pooled Session, as the service uses it.

    The pool keeps `pool_size` connections open, so that as many calls can be in
    flight at once without opening new ones (block=False: more still go, on
    connections closed after use).
    """
    http = requests.Session()
    adapter = GuardedAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
    http.mount("http://", adapter)
    http.mount("https://", adapter)
    return ZegoClient(http, base_url, app_id, server_secret, timeout=timeout)
