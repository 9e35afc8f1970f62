"""The domain's errors: what our rules say no with, without HTTP.

Each carries a snake_case `code` that callers see as is and a message naming the
problem (for invalid input, the field). The web edge maps the kinds to statuses
and the one JSON error shape (manager/web/errors.py); the CLI to messages and
exit codes (manager/cli/__init__.py).
"""

from __future__ import annotations


class DomainError(Exception):
    """A rule of ours refused; `code` names the refusal."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Invalid(DomainError):
    """The input breaks a rule; the message names the field."""


class NotFound(DomainError):
    """What was asked for does not exist."""


class Conflict(DomainError):
    """The request clashes with the current state (already stopped, already exists)."""


class NotConfigured(DomainError):
    """The service lacks the settings this needs (ZEGO_APP_ID, ZEGO_SERVER_SECRET)."""
