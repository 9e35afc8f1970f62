"""Operator bearer tokens: created once, stored as SHA-256, revocable."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.errors import Conflict, Invalid, NotFound
from manager.models import ApiToken
from manager.stops.restops import RESTOP_BY

LAST_USED_RESOLUTION = timedelta(minutes=1)
TOKEN_PREFIX = "mgr_"  # noqa: S105 - a marker for secret scanners, not a secret


@dataclass(frozen=True)
class TokenInfo:
    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a plain SHA-256 is enough: no dictionary to attack.
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str) -> str:
    """Store a new token under `name` and return it; it is never shown again."""
    name = name.strip()
    if not name or len(name) > 128:
        raise Invalid("invalid_name", "a token name is 1 to 128 characters")
    if name == RESTOP_BY:
        # Stop requests record their token's name; this one marks the worker's re-stops.
        raise Invalid("invalid_name", f"the token name {name!r} is reserved")
    if session.execute(select(ApiToken.id).where(ApiToken.name == name)).first():
        raise Conflict("token_exists", f"a token named {name!r} already exists")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_hash=hash_token(token), created_at=utcnow()))
    session.flush()
    return token


def list_tokens(session: Session) -> list[TokenInfo]:
    rows = session.execute(select(ApiToken).order_by(ApiToken.name)).scalars()
    return [TokenInfo(t.name, t.created_at, t.revoked_at, t.last_used_at) for t in rows]


def revoke_token(session: Session, name: str) -> None:
    result = session.execute(
        update(ApiToken)
        .where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    if result.rowcount == 0:  # type: ignore[attr-defined]
        raise NotFound("unknown_token", f"no active token named {name!r}")


@dataclass(frozen=True)
class TokenUse:
    """An active token presented: its name, and whether its last use is worth noting."""

    token_id: int
    name: str
    stale: bool


def authenticate(session: Session, token: str, now: datetime) -> TokenUse | None:
    """The active token `token` names, or None. Reads only: noting the use is a write of
    its own (note_use), so that on SQLite a read never has to become a write."""
    row = session.execute(
        select(ApiToken.id, ApiToken.name, ApiToken.last_used_at).where(
            ApiToken.token_hash == hash_token(token), ApiToken.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        return None
    stale = row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION
    return TokenUse(row.id, row.name, stale)


def note_use(session: Session, use: TokenUse, now: datetime) -> None:
    """Set the token's last_used_at, unless another request did within the resolution."""
    session.execute(
        update(ApiToken)
        .where(
            ApiToken.id == use.token_id,
            or_(
                ApiToken.last_used_at.is_(None),
                ApiToken.last_used_at < now - LAST_USED_RESOLUTION,
            ),
        )
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
