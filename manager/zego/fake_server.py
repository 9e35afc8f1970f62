"""The fake ZEGOCLOUD over HTTP: its API at `/`, control endpoints under `/_fake/`, and a
server on 127.0.0.1 for tests, benchmarks and `manager fake-zego`."""

from __future__ import annotations

import threading
import time
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from manager.zego.fake import Failure, FakeZego


def create_fake_app(fake: FakeZego) -> Flask:
    """The fake as a WSGI app: the API at `/`, control endpoints under `/_fake/`."""
    app = Flask("fake_zego")

    @app.post("/")
    def api() -> tuple[Response, int]:
        status, envelope = fake.handle(request.args.to_dict(), request.get_data())
        if fake.answer_delay > 0:
            time.sleep(fake.answer_delay)
        return jsonify(envelope), status

    @app.post("/_fake/tasks")
    def seed() -> Response:
        """One task ({task_id, owner, sequence}) or many ({"tasks": [...], "notify": false})."""
        data = request.get_json(force=True)
        notify = bool(data.get("notify", True))
        for item in data.get("tasks", [data]):
            sequence = int(item.get("sequence", 0))
            fake.seed(str(item["task_id"]), str(item["owner"]), sequence, notify)
        return jsonify({"ok": True})

    @app.post("/_fake/tasks/<task_id>/fail")
    def fail_task(task_id: str) -> Response:
        fake.fail_task(task_id)
        return jsonify({"ok": True})

    @app.post("/_fake/failures")
    def failures() -> Response:
        data = request.get_json(force=True)
        fake.fail_next(
            Failure(
                code=data.get("code"),
                http_status=data.get("http_status"),
                delay=float(data.get("delay", 0)),
                times=int(data.get("times", 1)),
            )
        )
        return jsonify({"ok": True})

    @app.get("/_fake/stats")
    def stats() -> Response:
        return jsonify(fake.stats())

    return app


class _KeepAliveHandler(WSGIRequestHandler):
    # Keep connections open as ZEGOCLOUD's gateway would; a new TCP connection and
    # thread for every call only adds jitter to the arrival times the limit counts.
    protocol_version = "HTTP/1.1"

    def log_request(self, *_args: Any, **_kwargs: Any) -> None:
        pass


class FakeServer:
    """The fake served on 127.0.0.1 from a background thread."""

    def __init__(self, fake: FakeZego, port: int = 0, host: str = "127.0.0.1") -> None:
        self.fake = fake
        self._server: BaseWSGIServer = make_server(
            host, port, create_fake_app(fake), threaded=True, request_handler=_KeepAliveHandler
        )
        self.url = f"http://{host}:{self._server.server_port}/"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        self._server.serve_forever()
