"""A local stand-in for ZEGOCLOUD's transcode API, for tests, benchmarks and `manager demo`.

It checks what zego-reference.md documents: the common parameters and their
signature, the AppId, the 10-minute skew, the owning UserId and an increasing
Sequence per task; it allows `rate_limit` calls in any one-second window; it can
be told to fail; and after a start or a successful stop it POSTs a correctly
signed transcode_start / transcode_stop callback, retrying as ZEGOCLOUD does.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from manager.zego.signing import api_signature, new_nonce, signed_callback

log = logging.getLogger(__name__)

MAX_SKEW = 600
CALLBACK_RETRY_DELAYS = (2, 4, 8, 16, 32)
THROTTLED = {"StartCloudTranscode": 110200190, "StopCloudTranscode": 110200191}


@dataclass
class FakeTask:
    owner: str
    sequence: int
    running: bool = True
    stops: list[int] = field(default_factory=list)


@dataclass
class Failure:
    """A planned failure for the next `times` API calls."""

    code: int | None = None
    http_status: int | None = None
    delay: float = 0.0
    times: int = 1


class FakeZego:
    def __init__(
        self,
        *,
        app_id: int,
        server_secret: str,
        callback_secret: str,
        callback_url: str | None = None,
        rate_limit: int = 100,
        callback_retry_delays: tuple[float, ...] = CALLBACK_RETRY_DELAYS,
        clock: Callable[[], float] = time.time,
        answer_delay: float = 0.0,
    ) -> None:
        self.app_id = app_id
        # Seconds between handling a call (counting it, applying it) and answering it:
        # ZEGOCLOUD in another region answers in hundreds of milliseconds.
        self.answer_delay = answer_delay
        self._server_secret = server_secret
        self._callback_secret = callback_secret
        self.callback_url = callback_url
        self.rate_limit = rate_limit
        self._retry_delays = callback_retry_delays
        self._clock = clock
        self._lock = threading.Lock()
        self.tasks: dict[str, FakeTask] = {}
        self._failures: deque[Failure] = deque()
        self._window: deque[float] = deque()
        self.calls: list[dict[str, Any]] = []
        self.throttled = 0
        self.max_in_window = 0
        self.callbacks_sent: list[dict[str, Any]] = []
        self._http = requests.Session()

    # -- control ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget tasks, calls and planned failures (the configuration stays)."""
        with self._lock:
            self.tasks.clear()
            self._failures.clear()
            self._window.clear()
            self.calls.clear()
            self.callbacks_sent.clear()
            self.throttled = 0
            self.max_in_window = 0
            self.callback_url = None

    def fail_next(self, failure: Failure) -> None:
        with self._lock:
            self._failures.append(failure)

    def seed(self, task_id: str, owner: str, sequence: int = 0, notify: bool = True) -> None:
        """A task that a client started, as if StartCloudTranscode had been called."""
        with self._lock:
            self.tasks[task_id] = FakeTask(owner=owner, sequence=sequence)
        if notify:
            self._send_event(
                "transcode_start",
                task_id,
                owner,
                sequence,
                Status="TranscodeStarted",
                Details={
                    "Input": {"StreamId": f"in-{task_id}"},
                    "Outputs": [{"StreamId": f"out-{task_id}", "Width": 1280, "Height": 720}],
                },
            )

    def fail_task(self, task_id: str) -> None:
        """The task hits an error and ZEGOCLOUD stops it on its own (StopReason 1)."""
        with self._lock:
            task = self.tasks[task_id]
            task.running = False
        self._send_event(
            "transcode_stop",
            task_id,
            task.owner,
            task.sequence,
            Status="TranscodeStopped",
            StopReason=1,
        )

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stops: dict[str, list[int]] = {
                t: list(v.stops) for t, v in self.tasks.items() if v.stops
            }
            times = [c["at"] for c in self.calls]
            return {
                "calls": len(self.calls),
                "accepted_stops": sum(len(v) for v in stops.values()),
                "first_call_at": min(times, default=None),
                "last_call_at": max(times, default=None),
                "throttled": self.throttled,
                "max_calls_in_one_second": self.max_in_window,
                "stops": stops,
                "running": sorted(t for t, v in self.tasks.items() if v.running),
                "callbacks_sent": len(self.callbacks_sent),
            }

    # -- the API -----------------------------------------------------------------------

    def handle(self, params: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """One API request; returns (HTTP status, ZEGO envelope)."""
        now = self._clock()
        action = params.get("Action", "")
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        task_id, _user, sequence = (
            _ids(payload) if isinstance(payload, dict) else (None, None, None)
        )
        refusal = self._check_common(params, now)
        if refusal is not None:
            return self._answer(now, action, task_id, sequence, 200, *refusal)
        if not self._take_rate_slot(now):
            code = THROTTLED.get(action, 110200194)
            return self._answer(now, action, task_id, sequence, 200, code, "request overload")
        failure = self._next_failure()
        if failure is not None:
            # A slow answer is a lost request: nothing is applied (504 once the wait is over).
            time.sleep(failure.delay)
            if failure.code is not None:
                return self._answer(now, action, task_id, sequence, 200, failure.code, "injected")
            status = failure.http_status or 504
            return self._answer(now, action, task_id, sequence, status, -1, "injected failure")
        if not isinstance(payload, dict):
            return self._answer(now, action, None, None, 200, 110200004, "cannot parse body")
        if action == "StopCloudTranscode":
            return self._stop(now, payload)
        return self._start(now, payload)

    def _check_common(self, params: dict[str, str], now: float) -> tuple[int, str] | None:
        action = params.get("Action")
        if not action:
            return 100000006, "Action is empty"
        if action not in THROTTLED:
            return 100000007, "Action is not supported"
        app_id = params.get("AppId", "")
        if not app_id.isdigit():
            return 100000001, "AppId format is wrong"
        if int(app_id) != self.app_id:
            return 100000010, "could not get the ServerSecret"
        timestamp = params.get("Timestamp", "")
        if not timestamp:
            return 100000002, "Timestamp is empty"
        if not timestamp.isdigit():
            return 100000003, "Timestamp format is wrong"
        nonce = params.get("SignatureNonce", "")
        if not nonce:
            return 100000008, "SignatureNonce is empty"
        signature = params.get("Signature", "")
        if not signature:
            return 100000009, "Signature is empty"
        version = params.get("SignatureVersion")
        if not version:
            return 100000013, "SignatureVersion is empty"
        if version != "2.0":
            return 100000014, "SignatureVersion is not supported"
        if abs(now - int(timestamp)) > MAX_SKEW:
            return 100000004, "signature expired"
        expected = api_signature(self.app_id, nonce, self._server_secret, int(timestamp))
        if not hmac.compare_digest(expected, signature):
            return 100000005, "signature error"
        return None

    def _take_rate_slot(self, now: float) -> bool:
        with self._lock:
            while self._window and self._window[0] <= now - 1.0:
                self._window.popleft()
            if len(self._window) >= self.rate_limit:
                self.throttled += 1
                return False
            self._window.append(now)
            self.max_in_window = max(self.max_in_window, len(self._window))
            return True

    def _next_failure(self) -> Failure | None:
        with self._lock:
            if not self._failures:
                return None
            failure = self._failures[0]
            failure.times -= 1
            if failure.times <= 0:
                self._failures.popleft()
            return failure

    def _stop(self, now: float, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        task_id, user_id, sequence = _ids(payload)
        if not task_id or not user_id:
            return self._answer(
                now,
                "StopCloudTranscode",
                task_id,
                sequence,
                200,
                110200002,
                "TaskId and UserId are required",
            )
        with self._lock:
            task = self.tasks.get(task_id)
            if task is None:
                code, message = 110209001, "task does not exist"
            elif task.owner != user_id:
                code, message = 110200160, "only the owner may stop the task"
            elif sequence is not None and sequence <= task.sequence:
                code, message = 110200002, f"Sequence must be above {task.sequence}"
            else:
                task.sequence = sequence if sequence is not None else task.sequence
                task.running = False
                task.stops.append(task.sequence)
                code, message = 0, "success"
        reply = self._answer(now, "StopCloudTranscode", task_id, sequence, 200, code, message)
        if code == 0 and task is not None:
            self._send_event(
                "transcode_stop",
                task_id,
                user_id,
                task.sequence,
                Status="TranscodeStopped",
                StopReason=0,
            )
        return reply

    def _start(self, now: float, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        task_id, user_id, sequence = _ids(payload)
        if not task_id or not user_id or "TranscodeInput" not in payload:
            return self._answer(
                now,
                "StartCloudTranscode",
                task_id,
                sequence,
                200,
                110200002,
                "TaskId, UserId and TranscodeInput are required",
            )
        with self._lock:
            task = self.tasks.get(task_id)
            status = "TranscodeUpdated" if task is not None and task.running else "TranscodeStarted"
            if task is not None and task.owner != user_id:
                code, message = 110200160, "only the owner may update the task"
            elif task is not None and sequence is not None and sequence <= task.sequence:
                code, message = 110200002, f"Sequence must be above {task.sequence}"
            else:
                self.tasks[task_id] = FakeTask(
                    owner=user_id, sequence=sequence or 0, stops=task.stops if task else []
                )
                code, message = 0, "success"
        reply = self._answer(now, "StartCloudTranscode", task_id, sequence, 200, code, message)
        if code == 0:
            details = {
                "Input": payload.get("TranscodeInput"),
                "Outputs": payload.get("TranscodeOutput"),
            }
            self._send_event(
                "transcode_start", task_id, user_id, sequence or 0, Status=status, Details=details
            )
        return reply

    def _answer(
        self,
        now: float,
        action: str,
        task_id: str | None,
        sequence: int | None,
        http_status: int,
        code: int,
        message: str,
    ) -> tuple[int, dict[str, Any]]:
        request_id = new_nonce()
        with self._lock:
            self.calls.append(
                {
                    "at": now,
                    "action": action,
                    "task_id": task_id,
                    "sequence": sequence,
                    "code": code,
                }
            )
        return http_status, {"Code": code, "Message": message, "RequestId": request_id}

    # -- callbacks ---------------------------------------------------------------------

    def _send_event(
        self, event: str, task_id: str, user_id: str, sequence: int, **fields: Any
    ) -> None:
        if not self.callback_url:
            return
        payload = {
            "Event": event,
            "Appid": str(self.app_id),
            "TaskId": task_id,
            "UserId": user_id,
            "Sequence": sequence,
            **fields,
        }
        body = signed_callback(self._callback_secret, payload, int(self._clock()), new_nonce())
        thread = threading.Thread(target=self._deliver, args=(body,), daemon=True)
        thread.start()

    def _deliver(self, body: dict[str, Any]) -> None:
        """Deliver once, then retry on anything but a 2xx, like ZEGOCLOUD (then give up)."""
        assert self.callback_url is not None  # noqa: S101
        for delay in (0.0, *self._retry_delays):
            time.sleep(delay)
            try:
                response = self._http.post(self.callback_url, json=body, timeout=5)
                if 200 <= response.status_code < 300:
                    with self._lock:
                        self.callbacks_sent.append(body)
                    return
            except requests.RequestException as exc:
                log.info("callback not delivered: %s", type(exc).__name__)


def _ids(payload: dict[str, Any]) -> tuple[str | None, str | None, int | None]:
    task_id = payload.get("TaskId")
    user_id = payload.get("UserId")
    sequence = payload.get("Sequence")
    return (
        None if task_id is None else str(task_id),
        None if user_id is None else str(user_id),
        sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else None,
    )
