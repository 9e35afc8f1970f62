"""Text a column can hold: the rule the API, the CLI and the reports share.

PostgreSQL refuses NUL in text, and an unpaired surrogate (JSON's "\\ud800", or how
Python passes on a command-line argument's bytes that are not UTF-8) cannot be
encoded as UTF-8 at all: either would fail at the database as a 503 or a traceback,
so they are refused up front as bad input.
"""

from __future__ import annotations

import re

from manager.errors import Invalid

MAX_REASON_LENGTH = 500  # stop_requests.reason and stop_batches.reason are String(500)
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored in a text column, as a phrase to follow its name."""
    if _UNSTORABLE.search(value):
        return "must not contain NUL characters or unpaired surrogates"
    return None


def check_storable(name: str, value: str, code: str = "invalid_parameter") -> str:
    """`value`, or a 400 naming `name` when no text column can hold it."""
    problem = text_problem(value)
    if problem is not None:
        raise Invalid(code, f"{name} {problem}")
    return value


def reason_problem(reason: str) -> str | None:
    """Why a stop reason cannot be stored, or None."""
    if len(reason) > MAX_REASON_LENGTH:
        return f"must be at most {MAX_REASON_LENGTH} characters"
    return text_problem(reason)
