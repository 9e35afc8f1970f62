"""Bearer-token guard for the operator API."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import g, request

from manager.access.tokens import authenticate, note_use
from manager.clock import utcnow
from manager.db import begin_write
from manager.services import get_session
from manager.web.errors import HttpError

F = TypeVar("F", bound=Callable[..., Any])
# Marks the views `require_token` guards: the OpenAPI document gives them the bearer
# token's security and its 401 (manager/web/openapi.py).
GUARD_MARK = "requires_token"


def current_token_name() -> str | None:
    """The operator named by the request's bearer token, or None when absent or invalid."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return sign_in(token.strip())


def sign_in(token: str) -> str | None:
    """The name of the active token, noting its use at most once a minute.

    The read ends before the note's write begins (BEGIN IMMEDIATE on SQLite): a read
    that turns into a write can fail with SQLITE_BUSY when another writer came first.
    Either way the view then starts a transaction of its own.
    """
    session = get_session()
    now = utcnow()
    use = authenticate(session, token, now)
    session.commit()
    if use is not None and use.stale:
        begin_write(session)
        note_use(session, use, now)
        session.commit()
    return None if use is None else use.name


def require_token(view: F) -> F:
    """The view, answering 401 unless the request carries an active bearer token."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        name = current_token_name()
        if name is None:
            raise HttpError(401, "unauthorized", "a valid bearer token is required")
        g.operator = name
        return view(*args, **kwargs)

    setattr(wrapper, GUARD_MARK, True)
    return wrapper  # type: ignore[return-value]
