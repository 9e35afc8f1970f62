"""A fast local receiver of outbound events for bench/events.py: verifies every request.

    .venv/bin/python bench/events_receiver.py --port 8123 --secrets SECRETS.json \
        --log-dir DIR [--processes 2]

SECRETS.json maps a path to the Standard Webhooks secret of the subscription whose URL
it is ({"/s/1": "whsec_...", ...}). Each process (--processes, sharing the port through
SO_REUSEPORT) is a plain asyncio HTTP/1.1 server with keep-alive, so that it costs far
less per request than the sender it measures: it reads each request, checks its
signature with `standardwebhooks.webhooks.Webhook(secret).verify(body, headers)`, and
answers 200 (400 when the signature does not verify, 404 for an unknown path).

Each process appends one tab-separated line per request to DIR/received-<pid>.tsv:
the wall clock in ns at arrival, the path, webhook-id, 1/0 verified, the event's type,
task_id and version, and the status answered. It flushes on SIGTERM or SIGINT and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

MAX_HEAD = 16 * 1024
MAX_BODY = 1024 * 1024

_ANSWERS = {
    200: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok",
    400: b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nbad",
    404: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
}


class Receiver(asyncio.Protocol):
    """One connection: requests read one after another (keep-alive), each answered."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._close()
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            if length > MAX_BODY or "chunked" in headers.get("transfer-encoding", ""):
                self._close()
                return
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            parts = head[0].split(" ")
            path = parts[1] if len(parts) > 1 else ""
            status = self.server.handle(parts[0], path, headers, body)
            assert self.transport is not None
            self.transport.write(_ANSWERS[status])
            if headers.get("connection", "").lower() == "close":
                self._close()
                return

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Server:
    def __init__(self, secrets: dict[str, str], log: Path) -> None:
        self.webhooks = {path: Webhook(secret) for path, secret in secrets.items()}
        self.out = log.open("a", buffering=1024 * 1024)

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
        now = time.time_ns()
        webhook = self.webhooks.get(path)
        if method != "POST" or webhook is None:
            return 404
        try:
            payload: Any = webhook.verify(body, headers)
            verified = 1
        except (WebhookVerificationError, ValueError):
            payload, verified = {}, 0
        status = 200 if verified else 400
        self._log(now, path, headers, verified, payload, status)
        return status

    def _log(
        self, now: int, path: str, headers: dict[str, str], verified: int, payload: Any, status: int
    ) -> None:
        data = payload.get("data", {}) if isinstance(payload, dict) else {}
        task = data.get("task", {}) if isinstance(data, dict) else {}
        self.out.write(
            f"{now}\t{path}\t{headers.get('webhook-id', '')}\t{verified}\t"
            f"{payload.get('type', '') if isinstance(payload, dict) else ''}\t"
            f"{task.get('task_id', '')}\t{data.get('version', '')}\t{status}\n"
        )

    def close(self) -> None:
        self.out.close()


def serve(port: int, secrets: dict[str, str], log_dir: Path) -> None:
    server = Server(secrets, log_dir / f"received-{os.getpid()}.tsv")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        srv = await loop.create_server(lambda: Receiver(server), sock=sock)
        await stopping.wait()
        srv.close()

    try:
        asyncio.run(main())
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secrets", type=Path, required=True, help="JSON: path -> whsec_ secret")
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args(argv)
    secrets = json.loads(args.secrets.read_text())
    args.log_dir.mkdir(parents=True, exist_ok=True)
    children = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            try:
                serve(args.port, secrets, args.log_dir)
            finally:
                os._exit(0)
        children.append(pid)

    def forward(sig: int, _frame: object) -> None:
        for child in children:
            try:
                os.kill(child, sig)
            except ProcessLookupError:
                pass

    # The parent serves too; its SIGTERM is handled by its own loop, then passed on.
    try:
        serve(args.port, secrets, args.log_dir)
    finally:
        forward(signal.SIGTERM, None)
        for child in children:
            os.waitpid(child, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
