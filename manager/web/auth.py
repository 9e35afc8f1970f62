"""Bearer-token guard for the operator API."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import g, request

from manager.access.tokens import authenticate
from manager.services import get_session
from manager.web.errors import HttpError

F = TypeVar("F", bound=Callable[..., Any])


def current_token_name() -> str | None:
    """The operator named by the request's bearer token, or None when absent or invalid."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    session = get_session()
    name = authenticate(session, token.strip())
    # Commit last_used_at, and end the read so the view starts its own transaction.
    session.commit()
    return name


def require_token(view: F) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        name = current_token_name()
        if name is None:
            raise HttpError(401, "unauthorized", "a valid bearer token is required")
        g.operator = name
        return view(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
