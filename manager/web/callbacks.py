"""POST /callbacks/zego: verify, record and apply ZEGOCLOUD transcode callbacks."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, cast

from flask import Blueprint, Response, current_app, request
from sqlalchemy import Table, bindparam, insert
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import RequestEntityTooLarge

from .. import MAX_BODY_BYTES, get_settings
from ..db import write_connection
from ..errors import error_response
from ..lifecycle import apply_callback, utcnow
from ..metrics import CALLBACK_LATENCY, FAST_PATH, LOCKED_PATH, count_delivery
from ..models import Delivery
from ..pg_fastpath import try_apply
from ..zego.callbacks import CallbackError, decode_body, parse_callback, verify_callback

log = logging.getLogger(__name__)
bp = Blueprint("callbacks", __name__)

# Enough to audit any real callback; a flood of junk cannot grow the table fast.
STORED_BODY_BYTES = 16 * 1024
INT32_MAX = 2**31 - 1  # deliveries.body_size is an Integer


@bp.post("/callbacks/zego", defaults={"path_event": None})
@bp.post("/callbacks/zego/<any(transcode_start, transcode_stop):path_event>")
def receive(path_event: str | None) -> tuple[Response, int]:
    started = time.perf_counter()
    received_at = utcnow()
    try:
        response = _receive(path_event, received_at)
    finally:
        CALLBACK_LATENCY.observe(time.perf_counter() - started)
    return response


def _receive(path_event: str | None, received_at: Any) -> tuple[Response, int]:
    raw, size = _read_body()
    try:
        if size > MAX_BODY_BYTES:
            raise CallbackError(413, "body_too_large", f"the body exceeds {MAX_BODY_BYTES} bytes")
        settings = get_settings()
        if settings.zego_app_id is None or not settings.callback_secrets:
            raise CallbackError(
                503, "not_configured", "ZEGO_APP_ID and ZEGO_CALLBACK_SECRET must be set"
            )
        cb = parse_callback(decode_body(raw, request.content_type), path_event)
        verify_callback(
            cb,
            secrets_=settings.callback_secrets,
            app_id=settings.zego_app_id,
            now=time.time(),
            max_age=settings.callback_max_age,
        )
        # Core connections rather than the request's Session: this is the hot path.
        # Either way the delivery is committed before the answer below is sent.
        engine = current_app.extensions["manager.engine"]
        delivery: dict[str, Any] = {
            "raw_body": raw[:STORED_BODY_BYTES],
            "body_size": size,
            "received_at": received_at,
            "remote_addr": request.remote_addr,
        }
        outcome = None
        fast_engine = current_app.extensions.get("manager.autocommit_engine")
        if fast_engine is not None:
            with fast_engine.connect() as conn:
                outcome = try_apply(conn, cb, **delivery)
            (LOCKED_PATH if outcome is None else FAST_PATH).inc()
        if outcome is None:
            with write_connection(engine) as conn:
                outcome = apply_callback(conn, cb, **delivery)
    except CallbackError as exc:
        return _reject(exc, raw, size, received_at)
    except SQLAlchemyError as exc:
        log.warning("callback not committed: %s", type(exc).__name__)
        return error_response(503, "database_unavailable", "the callback could not be stored")
    count_delivery(outcome.verdict, outcome.reason)
    return Response(_ANSWERS[outcome.verdict], mimetype="application/json"), 200


# The 200 answers, serialised once, as jsonify would: {"code": 0, "verdict": ...}.
_ANSWERS = {
    verdict: json.dumps({"code": 0, "verdict": verdict}, separators=(",", ":")) + "\n"
    for verdict in ("applied", "duplicate", "stale")
}


def _read_body() -> tuple[bytes, int]:
    """The body and its size, reading at most one byte past the cap whatever is claimed.

    A body over the cap comes back empty, with a size above MAX_BODY_BYTES.
    """
    environ = request.environ
    declared = request.content_length
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
        stream = request.stream
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


def _reject(exc: CallbackError, raw: bytes, size: int, received_at: Any) -> tuple[Response, int]:
    """Record the refused delivery in its own transaction, then answer with the error."""
    values = dict.fromkeys(_AUDIT_COLUMNS)
    values.update((k, v) for k, v in exc.fields.items() if k in _AUDIT_COLUMNS)
    values.update(
        received_at=received_at,
        verdict="rejected",
        reason=exc.code,
        remote_addr=request.remote_addr,
        body_size=size,
        raw_body=raw[:STORED_BODY_BYTES],
    )
    try:
        with write_connection(current_app.extensions["manager.engine"]) as conn:
            conn.execute(_INSERT_REJECTED, values)
    except SQLAlchemyError as db_exc:
        log.warning("rejected callback not recorded: %s", type(db_exc).__name__)
        return error_response(503, "database_unavailable", "the callback could not be stored")
    count_delivery("rejected", exc.code)
    return error_response(exc.status, exc.code, exc.message)


_DELIVERIES = cast(Table, Delivery.__table__)
# What a refusal may know of the callback: CallbackError.fields, as far as they were read.
_AUDIT_COLUMNS = frozenset(
    c.name for c in _DELIVERIES.columns if c.name not in ("id", "event_key", "task_pk")
)
_INSERT_REJECTED = insert(_DELIVERIES).values({c: bindparam(c) for c in sorted(_AUDIT_COLUMNS)})
