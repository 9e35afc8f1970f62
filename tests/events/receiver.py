"""A subscription's receiver for the tests: a real HTTP server that verifies every
request with the standardwebhooks library's own verifier (not our signing code), and
can be told to fail."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass
class Received:
    webhook_id: str
    type: str
    version: int
    task: dict[str, Any]
    data: dict[str, Any]


@dataclass
class Receiver:
    """What reached the server: every verified request, in arrival order."""

    secret: str = ""
    fail_rate: float = 0.0  # the share of requests answered 500 (before looking at them)
    status: int = 204  # what a verified request is answered with (kept only if 2xx)
    delay: float = 0.0  # seconds before a verified request is answered
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    received: list[Received] = field(default_factory=list)
    refused: int = 0  # requests whose signature did not verify
    failed: int = 0  # requests answered 500 on purpose
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def highest(self) -> dict[str, Received]:
        """The body with the highest version per task: what a consumer keeps."""
        best: dict[str, Received] = {}
        with self.lock:
            for r in self.received:
                task_id = r.task["task_id"]
                if task_id not in best or r.version > best[task_id].version:
                    best[task_id] = r
        return best

    def ids(self) -> set[str]:
        with self.lock:
            return {r.webhook_id for r in self.received}


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with receiver.lock:
                fail = receiver.rng.random() < receiver.fail_rate
            if fail:
                with receiver.lock:
                    receiver.failed += 1
                self._answer(500, b"try later")
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                Webhook(receiver.secret).verify(body, headers)
            except WebhookVerificationError:
                with receiver.lock:
                    receiver.refused += 1
                self._answer(400, b"bad signature")
                return
            payload = json.loads(body)
            time.sleep(receiver.delay)
            if receiver.status >= 300:  # refused after all: not kept
                self._answer(receiver.status, b"")
                return
            with receiver.lock:
                receiver.headers.append(headers)
                receiver.received.append(
                    Received(
                        headers["webhook-id"],
                        payload["type"],
                        payload["data"]["version"],
                        payload["data"]["task"],
                        payload["data"],
                    )
                )
            self._answer(receiver.status, b"")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A sender that went away mid-request (a killed worker) is no error here."""


@contextmanager
def serve(receiver: Receiver) -> Iterator[Receiver]:
    server = _Server(("127.0.0.1", 0), _handler(receiver))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_port}/hooks/manager"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
