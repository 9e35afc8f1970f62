"""What every answer of the app holds to, whatever the route: a body cap that holds
however the body comes, declared or chunked, and headers every answer carries.

(The callback route answers before Flask and keeps the same cap itself:
manager/web/callbacks.py.)
"""

from __future__ import annotations

import io

from flask import Flask, Response, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import get_content_length

from manager.config import MAX_BODY_BYTES

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


def secure_headers(response: Response) -> Response:
    """Every answer: no content sniffing; every HTML answer: the content policy."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if response.mimetype == "text/html":
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    return response


def init_app(app: Flask) -> None:
    app.before_request(cap_body)
    app.after_request(secure_headers)
