"""Text a column can hold: the rules the callbacks, the API, the CLI and the reports share.

Identifiers (task ids, owners, token names) follow one rule wherever they come
from: the one a callback's TaskId and UserId follow (manager/zego/callbacks.py),
UTF-8 text without control characters. A stop's reason is an operator's prose, where
a newline or a tab is fine: it needs only to be storable. PostgreSQL refuses NUL in
text, and an unpaired surrogate (JSON's "\\ud800", or how Python passes on a
command-line argument's bytes that are not UTF-8) cannot be encoded as UTF-8 at all;
either would fail at the database as a 503 or a traceback, so both are refused up
front as bad input.
"""

from __future__ import annotations

import re

from manager.errors import Invalid
from manager.zego.callbacks import identifier_problem

MAX_REASON_LENGTH = 500  # stop_requests.reason and stop_batches.reason are String(500)
_UNSTORABLE_IN_PROSE = re.compile("[\x00\ud800-\udfff]")


def text_problem(value: str) -> str | None:
    """Why a string cannot be an identifier, as a phrase to follow its name."""
    return identifier_problem(value)


def check_storable(name: str, value: str, code: str = "invalid_parameter") -> str:
    """`value`, or Invalid naming `name` when it cannot be an identifier."""
    problem = text_problem(value)
    if problem is not None:
        raise Invalid(code, f"{name} {problem}")
    return value


def reason_problem(reason: str) -> str | None:
    """Why a stop reason cannot be stored, or None."""
    if len(reason) > MAX_REASON_LENGTH:
        return f"must be at most {MAX_REASON_LENGTH} characters"
    if _UNSTORABLE_IN_PROSE.search(reason):
        return "must not contain NUL characters or unpaired surrogates"
    return None
