"""Domain errors and the one JSON error shape every response uses."""

from __future__ import annotations

import json
import logging

from flask import Flask, Response
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status and a snake_case code, shown to the caller as is."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


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
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> tuple[Response, int]:
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        return error_response(*http_error_parts(exc))

    @app.errorhandler(SQLAlchemyError)
    def _database_error(exc: SQLAlchemyError) -> tuple[Response, int]:
        log.warning("database unavailable: %s", type(exc).__name__)
        return error_response(503, "database_unavailable", "the database cannot be reached")

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred")
