"""The log: JSON lines for machines, a readable line for a terminal (LOG_FORMAT).

Every line carries the fields of its context: the request's id (`bind_request_id`,
set by the web edge for the whole request) and whatever a caller passes with
`extra=` (task_id, stop_request_id, attempt, zego_code, zego_request_id, ...).
JSON lines are python-json-logger's: one object per line with time, level, logger,
message and those fields.

No secret is ever logged: the server secret, callback secrets, tokens and
signatures stay out of every message and every field by construction (callers
log ids and codes, never a request's parameters or headers), and a test reads
the log of a whole lifecycle to hold it so.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from pythonjsonlogger.json import JsonFormatter

# The fields a line may carry besides time, level, logger and message, in the order
# the text format shows them.
CONTEXT_FIELDS = (
    "request_id",
    "task_id",
    "sequence",
    "owner",
    "stop_request_id",
    "attempt",
    "outcome",
    "state",
    "zego_code",
    "zego_request_id",
    "elapsed_ms",
)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "manager_request_id", default=None
)


@contextmanager
def bind_request_id(request_id: str) -> Iterator[None]:
    """Every line logged inside the block carries `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class ContextFilter(logging.Filter):
    """Puts the request's id on each record logged while it is bound."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = _request_id.get()
            if request_id is not None:
                record.request_id = request_id
        return True


class TextFormatter(logging.Formatter):
    """The terminal's line: time, level, logger, message, then `key=value` fields."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [
            f"{name}={getattr(record, name)}" for name in CONTEXT_FIELDS if hasattr(record, name)
        ]
        if not fields:
            return line
        head, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return f"{head} [{' '.join(fields)}]{newline}{rest}"


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",
    )


def formatter(log_format: str) -> logging.Formatter:
    return json_formatter() if log_format == "json" else TextFormatter()


def resolve_format(configured: str | None, *, service: bool, stream: TextIO | None = None) -> str:
    """LOG_FORMAT when set; else text on a terminal, and json for a service (serve,
    worker) whose output is read by a machine."""
    if configured is not None:
        return configured
    stream = sys.stderr if stream is None else stream
    if stream.isatty() or not service:
        return "text"
    return "json"


def configure(log_format: str, level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the root logger's lines to `stream` (stderr) in `log_format`, once: a second
    call replaces the handler this module installed, never another one."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ManagerHandler)]:
        root.removeHandler(old)
    handler = _ManagerHandler(stream)
    handler.setFormatter(formatter(log_format))
    handler.addFilter(ContextFilter())
    root.addHandler(handler)
    root.setLevel(level)


class _ManagerHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` installs, told apart from any other on the root logger.

    Without a stream of its own it writes to whatever sys.stderr is when a line is
    written, as logging's last-resort handler does (a test runner swaps it)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream)
        self._own_stream = stream

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr if self._own_stream is None else self._own_stream

    @stream.setter
    def stream(self, value: TextIO) -> None:
        self._own_stream = value


def gunicorn_logconfig(log_format: str) -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: its own lines (and the access log, when on) in the
    same format as the app's, on stderr."""
    factory = (
        "manager.logs.json_formatter" if log_format == "json" else "manager.logs.TextFormatter"
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"manager": {"()": factory}},
        "filters": {"context": {"()": "manager.logs.ContextFilter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "manager",
                "filters": ["context"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
        },
    }
