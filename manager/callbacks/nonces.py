"""Housekeeping the worker does between batches: the nonce ledger kept to its window.

The ledger only has to answer for (Timestamp, Nonce) pairs inside the freshness
window: an older Timestamp is refused as stale before the ledger is asked. So pairs
older than the window, and an hour for clock skew, are deleted. The worker prunes
with the widest window any process may use (7 days, the largest CALLBACK_MAX_AGE),
not its own: an app process set wider would otherwise find a fresh pair gone. The
delete is a range of the ledger's key, which leads with the Timestamp.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import delete
from sqlalchemy.orm import Session

from manager.models import CallbackNonce

SKEW_MARGIN_SECONDS = 3600


def prune_nonces(session: Session, now: datetime, max_age: int) -> int:
    """Delete the ledger's pairs too old to be asked about; returns how many."""
    cutoff = int(now.replace(tzinfo=UTC).timestamp()) - max_age - SKEW_MARGIN_SECONDS
    result = session.execute(delete(CallbackNonce).where(CallbackNonce.zego_timestamp < cutoff))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
