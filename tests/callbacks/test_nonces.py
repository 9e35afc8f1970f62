"""The worker keeps the nonce ledger to the freshness window, and replays stay refused."""

from __future__ import annotations

import time
from datetime import datetime

from flask.testing import FlaskCliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from manager.callbacks.nonces import SKEW_MARGIN_SECONDS, prune_nonces
from manager.models import CallbackNonce

MAX_AGE = 300


def add_nonces(db: Session, ages: dict[str, int], now: int) -> None:
    db.add_all(
        CallbackNonce(
            zego_timestamp=now - age, nonce=name, body_sha256="0" * 64, seen_at=datetime(2026, 1, 1)
        )
        for name, age in ages.items()
    )
    db.commit()


def kept(db: Session) -> set[str]:
    db.rollback()
    return set(db.execute(select(CallbackNonce.nonce)).scalars())


def test_pairs_older_than_the_window_and_the_margin_go(app: object, db: Session) -> None:
    now = datetime(2026, 3, 1, 12, 0, 0)
    now_ts = 1772366400  # 2026-03-01 12:00:00 UTC
    limit = MAX_AGE + SKEW_MARGIN_SECONDS
    add_nonces(db, {"fresh": 10, "edge": limit, "old": limit + 1, "ancient": 10**6}, now_ts)
    assert prune_nonces(db, now, MAX_AGE) == 2
    db.commit()
    assert kept(db) == {"fresh", "edge"}


def test_the_worker_prunes_the_ledger(app: object, db: Session, runner: FlaskCliRunner) -> None:
    now = int(time.time())
    # The suite's CALLBACK_MAX_AGE is the default 300 s; another process may have set the
    # largest allowed (7 days), so the worker keeps what that process still treats as fresh.
    add_nonces(db, {"fresh": 5, "hours": 2 * 3600, "days": 6 * 86400, "old": 10 * 86400}, now)
    result = runner.invoke(args=["worker", "--once"])
    assert result.exit_code == 0, result.output
    assert kept(db) == {"fresh", "hours", "days"}
