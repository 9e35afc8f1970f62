"""The one JSON error shape, and the statuses the domain's errors map to."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

from manager.errors import Conflict, DomainError, Invalid, NotConfigured, NotFound
from manager.metrics import count_database_error

log = logging.getLogger(__name__)

STATUS_OF: dict[type[DomainError], int] = {
    Invalid: 400,
    NotFound: 404,
    Conflict: 409,
    NotConfigured: 503,
}


class HttpError(Exception):
    """An error only the web edge has (401 without a token): a status and a code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def status_for(exc: Exception, statuses: Mapping[type[Any], int], default: int = 400) -> int:
    """The status an error's kind is answered with: its own class's, or its nearest base's."""
    for kind in type(exc).__mro__:
        if kind in statuses:
            return statuses[kind]
    return default


def error_body(code: str, message: str) -> bytes:
    """The error shape, serialised as Flask's jsonify would (for the callback endpoint,
    which answers without Flask)."""
    error = {"error": {"code": code, "message": message}}
    return json.dumps(error, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    return Response(error_body(code, message), mimetype="application/json"), status


def http_error_parts(exc: HTTPException) -> tuple[int, str, str]:
    """A werkzeug HTTP error as (status, code, message): 405 -> method_not_allowed."""
    code = (exc.name or "error").lower().replace(" ", "_").replace("'", "")
    return exc.code or 500, code, exc.description or exc.name


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(DomainError)
    def _domain_error(exc: DomainError) -> tuple[Response, int]:
        return error_response(status_for(exc, STATUS_OF), exc.code, exc.message)

    @app.errorhandler(HttpError)
    def _http_only_error(exc: HttpError) -> tuple[Response, int]:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        response, status = error_response(*http_error_parts(exc))
        # What the error's own answer says besides its HTML: Allow on a 405 (RFC 9110).
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response, status

    @app.errorhandler(SQLAlchemyError)
    def _database_error(exc: SQLAlchemyError) -> tuple[Response, int]:
        count_database_error(request.blueprint or "app")
        log.warning("database unavailable: %s", type(exc).__name__)
        return error_response(503, "database_unavailable", "the database cannot be reached")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred")
