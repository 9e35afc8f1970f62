"""POST /callbacks/zego: verify, record and apply ZEGOCLOUD transcode callbacks.

The webhook is the service's hot path, so its POSTs do not go through Flask's request
handling: create_app puts `CallbackRoute` in front of the Flask app, and it hands them
to `CallbackEndpoint`, a function of the WSGI environ. Under load (bench/callbacks.py,
4 gunicorn workers) Flask's per-request work (app and request contexts, the session,
URL matching, signals, the Response object) cost about 0.2 ms of CPU per callback,
over a quarter of the app's share; the endpoint needs none of it. Every other request,
including other methods on these paths, goes to Flask as before. The blueprint keeps
the routes, so that Flask still knows them (a GET is a 405), and its view answers
through the same endpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, request
from sqlalchemy import Table, bindparam, insert
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import get_content_length, get_input_stream

from manager.callbacks.deliveries import ReplayedCallback
from manager.callbacks.fast_path import apply_optimistically
from manager.callbacks.store import apply_callback
from manager.clock import utcnow
from manager.config import MAX_BODY_BYTES, Settings
from manager.db import write_connection, write_then_read
from manager.metrics import CALLBACK_LATENCY, count_database_error, count_delivery, count_fold
from manager.models import Delivery
from manager.vocabulary import Verdict
from manager.web.edges import StartResponse, WsgiApp
from manager.web.errors import error_body, http_error_parts, status_for
from manager.web.openapi import Answer, documented, json_answer
from manager.zego.callbacks import (
    EVENT_START,
    EVENT_STOP,
    CallbackError,
    ForeignCallback,
    MalformedCallback,
    UnverifiedCallback,
    decode_body,
    parse_callback,
    verify_callback,
)

log = logging.getLogger(__name__)


class BodyTooLarge(CallbackError):
    """A body over MAX_BODY_BYTES, refused unread."""


class CallbacksNotConfigured(CallbackError):
    """ZEGO_APP_ID or ZEGO_CALLBACK_SECRET is not set: nothing can be verified."""


# The answer to each kind of refusal.
STATUS_OF: dict[type[CallbackError], int] = {
    MalformedCallback: 400,
    UnverifiedCallback: 401,
    ForeignCallback: 403,
    ReplayedCallback: 409,
    BodyTooLarge: 413,
    CallbacksNotConfigured: 503,
}


bp = Blueprint("callbacks", __name__)

# Enough to audit any real callback; a flood of junk cannot grow the table fast.
STORED_BODY_BYTES = 16 * 1024
INT32_MAX = 2**31 - 1  # deliveries.body_size is an Integer
ENDPOINT = "manager.callback_endpoint"  # the app.extensions key of the app's endpoint

# The paths the blueprint routes, and the Event each one implies.
PATHS: Mapping[str, str | None] = {
    "/callbacks/zego": None,
    f"/callbacks/zego/{EVENT_START}": EVENT_START,
    f"/callbacks/zego/{EVENT_STOP}": EVENT_STOP,
}


_CALLBACK_ANSWERS: dict[int, Answer] = {
    200: json_answer("Stored: applied, duplicate, or stale.", "CallbackAnswer"),
    400: json_answer("The body or a field is malformed; the message names it.", "Error"),
    401: json_answer("invalid_signature, or stale_timestamp (outside CALLBACK_MAX_AGE).", "Error"),
    403: json_answer("wrong_appid: signed, but for another Appid.", "Error"),
    409: json_answer("nonce_reused: a Timestamp and Nonce seen with another body.", "Error"),
    413: json_answer(
        f"body_too_large: over {MAX_BODY_BYTES // 1024} KiB, declared or chunked.", "Error"
    ),
    503: json_answer(
        "database_unavailable (ZEGOCLOUD retries), or not_configured: ZEGO_APP_ID and "
        "ZEGO_CALLBACK_SECRET are not set.",
        "Error",
    ),
}
_CALLBACK_DESCRIPTION = (
    "No bearer token: the body's Signature (over a callback secret, Timestamp and Nonce) "
    "is verified, then Appid, then Timestamp. Every request is recorded as a delivery. "
    "The body is JSON, or URL-encoded: the JSON percent-encoded, the fields as form "
    "fields, or one form field holding the JSON; numbers may come as strings. A 2xx is "
    "sent only after the delivery is committed."
)


def _callback_body(schema: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {"schema": "CallbackForm"},
        },
    }


@bp.post("/callbacks/zego")
@documented(
    "Receive a transcode_start or transcode_stop callback",
    description=_CALLBACK_DESCRIPTION,
    body=_callback_body("Callback"),
    responses=_CALLBACK_ANSWERS,
)
def receive() -> Response:
    """Flask's route to the endpoint. CallbackRoute answers these POSTs before Flask sees
    them, so this runs only where the app is served without it; a test holds the two
    entry points to the same answers."""
    return _answer(None)


@bp.post(f"/callbacks/zego/<any({EVENT_START}, {EVENT_STOP}):path_event>")
@documented(
    "Receive a callback of the event the path names",
    description=_CALLBACK_DESCRIPTION + " Event may be left out; if given, it must match.",
    path_parameters={"path_event": {"description": "the callback's Event"}},
    body=_callback_body("EventCallback"),
    responses={**_CALLBACK_ANSWERS, 404: "NotFound"},
)
def receive_event(path_event: str) -> Response:
    """As `receive`, for the paths that name the Event."""
    return _answer(path_event)


def _answer(path_event: str | None) -> Response:
    status, body = current_app.extensions[ENDPOINT].handle(request.environ, path_event)
    return Response(body, status=status, mimetype="application/json")


class CallbackRoute:
    """WSGI middleware: POSTs to the callback paths go to the endpoint, the rest to Flask."""

    def __init__(self, wsgi_app: WsgiApp, endpoint: CallbackEndpoint) -> None:
        self.wsgi_app = wsgi_app
        self.endpoint = endpoint

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in PATHS or environ.get("REQUEST_METHOD") != "POST":
            return self.wsgi_app(environ, start_response)
        status, body = self.endpoint.handle(environ, PATHS[path])
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        # The status line werkzeug's Response would send.
        start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'unknown').upper()}", headers)
        return [body]


class CallbackEndpoint:
    """The webhook: a callback's WSGI environ in, (HTTP status, JSON body) out."""

    def __init__(self, app: Flask) -> None:
        # Settings and engines are looked up per request, as a view looks them up.
        self.extensions = app.extensions

    def handle(self, environ: dict[str, Any], path_event: str | None) -> tuple[int, bytes]:
        started = time.perf_counter()
        try:
            return self._handle(environ, path_event, utcnow())
        except HTTPException as exc:  # from werkzeug's input stream, as Flask would answer
            status, code, message = http_error_parts(exc)
            return status, error_body(code, message)
        except Exception:
            log.exception("unhandled error")
            return 500, error_body("internal_error", "an unexpected error occurred")
        finally:
            CALLBACK_LATENCY.observe(time.perf_counter() - started)

    def _handle(
        self, environ: dict[str, Any], path_event: str | None, received_at: Any
    ) -> tuple[int, bytes]:
        raw, size = _read_body(environ)
        remote_addr = environ.get("REMOTE_ADDR")
        try:
            if size > MAX_BODY_BYTES:
                raise BodyTooLarge("body_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes")
            settings: Settings = self.extensions["manager.settings"]
            if settings.zego_app_id is None or not settings.callback_secrets:
                raise CallbacksNotConfigured(
                    "not_configured", "ZEGO_APP_ID and ZEGO_CALLBACK_SECRET must be set"
                )
            cb = parse_callback(decode_body(raw, environ.get("CONTENT_TYPE")), path_event)
            verify_callback(
                cb,
                secrets_=settings.callback_secrets,
                app_id=settings.zego_app_id,
                now=time.time(),
                max_age=settings.callback_max_age,
            )
            # Core connections rather than an ORM Session: this is the hot path.
            # Either way the delivery is committed before the answer below is sent.
            delivery: dict[str, Any] = {
                "raw_body": raw[:STORED_BODY_BYTES],
                "body_size": size,
                "received_at": received_at,
                "remote_addr": remote_addr,
            }
            outcome = None
            autocommit = self.extensions.get("manager.autocommit_engine")
            if autocommit is not None:
                with autocommit.connect() as conn:
                    outcome = apply_optimistically(conn, cb, **delivery)
            if outcome is None:
                engine = autocommit or self.extensions["manager.engine"]
                outcome = write_then_read(engine, lambda conn: apply_callback(conn, cb, **delivery))
        except CallbackError as exc:
            return self._reject(exc, raw, size, received_at, remote_addr)
        except SQLAlchemyError as exc:
            count_database_error("callbacks")
            # Only the store raises this, so the callback was parsed and verified.
            log.warning(
                "callback not committed: %s",
                type(exc).__name__,
                extra={"task_id": cb.task_id, "sequence": cb.sequence},
            )
            return 503, error_body("database_unavailable", "the callback could not be stored")
        count_delivery(outcome.verdict, outcome.reason)
        count_fold(outcome.refolded)
        return 200, _ANSWERS[outcome.verdict]

    def _reject(
        self,
        exc: CallbackError,
        raw: bytes,
        size: int,
        received_at: Any,
        remote_addr: str | None,
    ) -> tuple[int, bytes]:
        """Record the refused delivery in its own transaction, then answer with the error."""
        values = dict.fromkeys(_AUDIT_COLUMNS)
        values.update((k, v) for k, v in exc.fields.items() if k in _AUDIT_COLUMNS)
        values.update(
            received_at=received_at,
            verdict=Verdict.REJECTED,
            reason=exc.code,
            remote_addr=remote_addr,
            body_size=size,
            raw_body=raw[:STORED_BODY_BYTES],
        )
        try:
            with write_connection(self.extensions["manager.engine"]) as conn:
                conn.execute(_INSERT_REJECTED, values)
        except SQLAlchemyError as db_exc:
            count_database_error("callbacks")
            log.warning("rejected callback not recorded: %s", type(db_exc).__name__)
            return 503, error_body("database_unavailable", "the callback could not be stored")
        count_delivery(Verdict.REJECTED, exc.code)
        return status_for(exc, STATUS_OF), error_body(exc.code, exc.message)


# The 200 answers, serialised once, as jsonify would: {"code": 0, "verdict": ...}.
_ANSWERS: dict[str, bytes] = {
    verdict: (json.dumps({"code": 0, "verdict": verdict}, separators=(",", ":")) + "\n").encode()
    for verdict in (Verdict.APPLIED, Verdict.DUPLICATE, Verdict.STALE)
}


def _read_body(environ: dict[str, Any]) -> tuple[bytes, int]:
    """The body and its size, reading at most one byte past the cap whatever is claimed.

    A body over the cap comes back empty, with a size above MAX_BODY_BYTES.
    """
    declared = get_content_length(environ)
    if declared is not None:
        if declared > MAX_BODY_BYTES:
            # The client's claim, unread; capped so that it fits the Integer column.
            return b"", min(declared, INT32_MAX)
        # The common case: the declared length, straight from the server's stream
        # (never past the end of this request); shorter if the client sent less.
        raw = _read(environ["wsgi.input"], declared)
        return raw, len(raw)
    if environ.get("wsgi.input_terminated"):
        # Chunked: the server ends the stream where the chunks end. Werkzeug's own
        # limited stream would return the first 64 KiB of a larger body as if whole.
        stream = environ["wsgi.input"]
    else:
        # What Flask's request.stream is: empty unless the server terminates the stream.
        stream = get_input_stream(environ, max_content_length=MAX_BODY_BYTES)
    try:
        raw = _read(stream, MAX_BODY_BYTES + 1)
    except RequestEntityTooLarge:
        return b"", MAX_BODY_BYTES + 1
    if len(raw) > MAX_BODY_BYTES:
        return b"", MAX_BODY_BYTES + 1
    return raw, len(raw)


def _read(stream: Any, limit: int) -> bytes:
    """Up to `limit` bytes: until the limit or the end of the stream."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = stream.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


_DELIVERIES = cast(Table, Delivery.__table__)
# What a refusal may know of the callback: CallbackError.fields, as far as they were read.
_AUDIT_COLUMNS = frozenset(
    c.name for c in _DELIVERIES.columns if c.name not in ("id", "event_key", "task_pk")
)
_INSERT_REJECTED = insert(_DELIVERIES).values({c: bindparam(c) for c in sorted(_AUDIT_COLUMNS)})
