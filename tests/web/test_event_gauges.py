"""The outbox's gauges on /metrics, read from the database at scrape time: the sends
pending, the oldest one's age, and the subscriptions by state."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from flask.testing import FlaskClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from manager.clock import utcnow
from manager.events.health import Outbox
from manager.events.secrets import Sealer, new_key
from manager.events.subscriptions import create_subscription
from manager.models import EventSend, Subscription
from manager.web.gauges import event_gauges

from ..conftest import callback
from ..test_observability import scraped
from .test_dashboard import send

SUBSCRIPTIONS = "manager_subscriptions"


def by_state(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    return {
        labels[0][1]: value for (name, labels), value in metrics.items() if name == SUBSCRIPTIONS
    }


def test_an_empty_outbox_reads_zero(client: FlaskClient) -> None:
    metrics = scraped(client)
    assert metrics[("manager_events_pending", ())] == 0
    assert metrics[("manager_events_oldest_pending_seconds", ())] == 0
    assert by_state(metrics) == {"enabled": 0, "disabled": 0, "failing": 0}


def test_the_outbox_gauges_read_the_database(client: FlaskClient, db: Session) -> None:
    sealer = Sealer((new_key(),))
    now = utcnow()
    healthy, failing, disabled, gone = (
        create_subscription(db, sealer, url=f"https://{name}.example/hook", now=now).subscription.id
        for name in ("healthy", "failing", "disabled", "gone")
    )
    db.commit()
    assert send(client, callback(task_id="t-1", sequence=1)) == 200  # task.started
    assert send(client, callback("transcode_stop", task_id="t-1", sequence=2)) == 200  # 2 more
    an_hour_ago = utcnow() - timedelta(hours=1)
    db.execute(
        update(EventSend)
        .where(EventSend.subscription_id == healthy)
        .values(state="delivered", completed_at=now)
    )
    db.execute(
        update(EventSend)
        .where(EventSend.subscription_id == gone)
        .values(state="failed", completed_at=now)
    )
    db.execute(
        update(EventSend)
        .where(EventSend.subscription_id == disabled, EventSend.version == 1)
        .values(created_at=an_hour_ago)
    )
    db.execute(
        update(Subscription).where(Subscription.id == failing).values(failing_since=an_hour_ago)
    )
    db.execute(
        update(Subscription)
        .where(Subscription.id.in_([disabled, gone]))
        .values(disabled_at=now, disabled_reason="by an operator", failing_since=an_hour_ago)
    )
    db.commit()

    metrics = scraped(client)
    assert metrics[("manager_events_pending", ())] == 6  # failing's three and disabled's
    assert 3590 < metrics[("manager_events_oldest_pending_seconds", ())] < 3700
    # A disabled subscription is not counted failing, whatever its failing_since.
    assert by_state(metrics) == {"enabled": 2, "disabled": 2, "failing": 1}


NOW = datetime(2024, 5, 14, 12, 0)


@pytest.mark.parametrize(
    ("oldest", "age"),
    [
        (None, 0.0),
        (NOW - timedelta(minutes=5), 300.0),
        (NOW + timedelta(seconds=3), 0.0),  # a writer's clock ahead of this one
    ],
)
def test_the_oldest_pending_age(oldest: datetime | None, age: float) -> None:
    gauges = {g.name: g for g in event_gauges(Outbox(1, oldest, 1, 0, 0), NOW)}
    assert gauges["manager_events_oldest_pending_seconds"].values == {(): age}
    assert gauges[SUBSCRIPTIONS].labels == ("state",)
