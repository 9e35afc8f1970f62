"""What every answer of the app holds to, whatever the route: a body cap that holds
however the body comes, declared or chunked, a request id, and headers every answer
carries.

(The callback route answers before Flask and keeps the same cap itself:
manager/web/callbacks.py. `AnswerHeaders` wraps both, so its headers are on every
answer.)
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import get_content_length

from manager.config import MAX_BODY_BYTES
from manager.logs import bind_request_id

# MAX_BULK_TASKS ids of up to 256 characters, quoted and separated, with room to spare.
BULK_BODY_BYTES = 3 * 1024 * 1024
# Routes that take more than MAX_BODY_BYTES, by endpoint.
BODY_CAPS = {"api.bulk_stop": BULK_BODY_BYTES}
# No scripts at all; no framing (the stop buttons must not be clickjacked).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def cap_body() -> None:
    """Refuse a body over the route's cap (413) before any view reads it.

    A declared length over the cap is refused by werkzeug as soon as the body is read.
    A chunked body (gunicorn terminates the input) has no length to check, and werkzeug
    would cut it at the cap without a word: it is read here, at most one byte past the
    cap, and handed on as a body of known length, so that no view acts on a body cut
    short.
    """
    limit = BODY_CAPS.get(request.endpoint or "", MAX_BODY_BYTES)
    request.max_content_length = limit
    environ = request.environ
    # werkzeug's reading of the length: none for a chunked body, whatever is declared.
    if get_content_length(environ) is not None or not environ.get("wsgi.input_terminated"):
        return
    body = environ["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise RequestEntityTooLarge()
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # now a body of known length


def content_policy(response: Response) -> Response:
    """Every HTML answer: the content policy."""
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    return response


# A caller's request id is taken as it is when it looks like one (a UUID, a trace id,
# a load balancer's id): short, printable, nothing a log reader could mistake.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def request_id_of(environ: dict[str, Any]) -> str:
    """The request's `X-Request-Id` when it is a plausible id; else a new one."""
    given = environ.get("HTTP_X_REQUEST_ID", "")
    if REQUEST_ID.fullmatch(given):
        return str(given)
    return uuid.uuid4().hex


class AnswerHeaders:
    """WSGI middleware around the whole app, the callback route included: each request
    gets an id, bound to every log line written while it is handled and echoed as
    `X-Request-Id`; every answer says `X-Content-Type-Options: nosniff`."""

    def __init__(self, wsgi_app: WsgiApp) -> None:
        self.wsgi_app = wsgi_app

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request_id = request_id_of(environ)

        def start_with_headers(status: str, headers: list[tuple[str, str]], *rest: Any) -> Any:
            headers.append(("X-Request-Id", request_id))
            if not any(name.lower() == "x-content-type-options" for name, _ in headers):
                headers.append(("X-Content-Type-Options", "nosniff"))
            return start_response(status, headers, *rest)

        with bind_request_id(request_id):
            return self.wsgi_app(environ, start_with_headers)


def init_app(app: Flask) -> None:
    """The Flask hooks; `AnswerHeaders` is put around the finished app by create_app."""
    app.before_request(cap_body)
    app.after_request(content_policy)
