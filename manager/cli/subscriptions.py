"""`manager subscriptions` (who receives the outbound events) and `manager events replay`.

A subscription's signing secret is printed once, by the command that made it (create,
rotate-secret), on stdout; the note that it is not shown again goes to stderr.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from manager.cli.common import echo_table, new_session, stop_reason
from manager.cli.errors import domain_errors
from manager.clock import iso, utcnow
from manager.db import begin_write
from manager.errors import Invalid
from manager.events.health import Health, health_by_subscription
from manager.events.replay import replay
from manager.events.secrets import Sealer, new_key
from manager.events.subscriptions import (
    WithSecret,
    create_subscription,
    disable_subscription,
    enable_subscription,
    event_types_of,
    list_subscriptions,
    rotate_secret,
    subscription_json,
)
from manager.models import Subscription
from manager.params import parse_time
from manager.tasks.queries import MAX_ROW_ID
from manager.vocabulary import EventType, values

subscriptions_cli = AppGroup("subscriptions", help="Who receives the tasks' outbound events.")
events_cli = AppGroup("events", help="The tasks' outbound events.")

# An id no subscription can have (subscriptions.id is an Integer) is bad input.
SUBSCRIPTION_ID = click.IntRange(1, MAX_ROW_ID)
LIST_COLUMNS = (
    "id",
    "url",
    "enabled",
    "types",
    "owner",
    "pending/delivered/failed",
    "failing_since",
)


def event_types(
    _ctx: click.Context, _param: click.Parameter, value: Sequence[str]
) -> list[str] | None:
    """--events given any number of times, each a type or a comma-separated list (which
    types there are is the domain's to say)."""
    chosen = [kind.strip() for raw in value for kind in raw.split(",") if kind.strip()]
    if value and not chosen:
        raise click.BadParameter("name at least one event type")
    return chosen or None


def since_time(_ctx: click.Context, _param: click.Parameter, value: str) -> datetime:
    """--since as the API reads a time: ISO 8601 or Unix seconds."""
    try:
        since = parse_time("--since", value)
    except Invalid as exc:
        raise click.BadParameter(exc.message) from None
    if since is None:
        raise click.BadParameter("a time is required: ISO 8601 or Unix seconds")
    return since


def _sealer() -> Sealer:
    return Sealer(current_app.extensions["manager.settings"].subscription_keys)


def _who() -> str:
    """The operator, as the CLI's other commands name them."""
    return f"cli:{os.environ.get('USER') or os.environ.get('LOGNAME') or 'unknown'}"


def _echo_secret(made: WithSecret, note: str) -> None:
    click.echo(f"secret: {made.secret}")
    click.echo(f"{note}; the secret is not shown again.", err=True)


@subscriptions_cli.command("create")
@click.argument("url")
@click.option(
    "--events",
    "types",
    multiple=True,
    callback=event_types,
    metavar="TYPE[,TYPE...]",
    help=f"only these event types (repeatable); every type unless given: "
    f"{', '.join(values(EventType))}",
)
@click.option("--owner", help="only this owner's (UserId) tasks")
@click.option("--description", help="what it is for, in your words")
def subscriptions_create(
    url: str, types: list[str] | None, owner: str | None, description: str | None
) -> None:
    """Subscribe URL to the tasks' outbound events; prints its id and secret once."""
    with new_session() as session, domain_errors():
        begin_write(session)
        made = create_subscription(
            session,
            _sealer(),
            url=url,
            event_types=types,
            owner=owner,
            description=description,
            now=utcnow(),
        )
        session.commit()
    click.echo(f"id: {made.subscription.id}")
    _echo_secret(made, f"subscription {made.subscription.id} created")


@subscriptions_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="as the API shows them, with health")
def subscriptions_list(as_json: bool) -> None:
    """List subscriptions and how their sends fare (never their secrets)."""
    with new_session() as session:
        subs = list_subscriptions(session)
        health = health_by_subscription(session.connection())
    now = utcnow()
    if as_json:
        rows = [subscription_json(s, now=now, health=health.get(s.id, Health())) for s in subs]
        click.echo(json.dumps(rows, indent=2))
        return
    echo_table(LIST_COLUMNS, [_row(s, health.get(s.id, Health())) for s in subs])


def _row(sub: Subscription, health: Health) -> list[Any]:
    types = event_types_of(sub)
    return [
        sub.id,
        sub.url,
        "yes" if sub.disabled_at is None else "no",
        "all" if types is None else ",".join(types),
        sub.owner or "",
        f"{health.pending}/{health.delivered}/{health.failed}",
        iso(sub.failing_since) or "",
    ]


@subscriptions_cli.command("disable")
@click.argument("subscription_id", metavar="ID", type=SUBSCRIPTION_ID)
@click.option("--reason", callback=stop_reason, help="why; shown with the subscription")
def subscriptions_disable(subscription_id: int, reason: str | None) -> None:
    """Stop sending to a subscription; what is pending waits for it to be enabled."""
    with new_session() as session, domain_errors():
        begin_write(session)
        disable_subscription(
            session, subscription_id, reason=reason or f"disabled by {_who()}", now=utcnow()
        )
        session.commit()
    click.echo(f"subscription {subscription_id} disabled")


@subscriptions_cli.command("enable")
@click.argument("subscription_id", metavar="ID", type=SUBSCRIPTION_ID)
def subscriptions_enable(subscription_id: int) -> None:
    """Send to a subscription again, starting with what is pending."""
    with new_session() as session, domain_errors():
        begin_write(session)
        enable_subscription(session, subscription_id, now=utcnow())
        session.commit()
    click.echo(f"subscription {subscription_id} enabled")


@subscriptions_cli.command("rotate-secret")
@click.argument("subscription_id", metavar="ID", type=SUBSCRIPTION_ID)
def subscriptions_rotate_secret(subscription_id: int) -> None:
    """Give a subscription a new secret and print it once; the old one signs beside it
    for a while, so that the receiver can switch."""
    with new_session() as session, domain_errors():
        begin_write(session)
        made = rotate_secret(session, _sealer(), subscription_id, now=utcnow())
        session.commit()
    until = iso(made.subscription.previous_secret_until)
    _echo_secret(made, f"subscription {subscription_id}: the old secret also signs until {until}")


# No app: the key is what a configuration without a valid SUBSCRIPTION_KEY lacks.
@subscriptions_cli.command("new-key", with_appcontext=False)
def subscriptions_new_key() -> None:
    """Print a new key for SUBSCRIPTION_KEY (put it first to rotate; keep the old after)."""
    click.echo(new_key())


@events_cli.command("replay")
@click.option("--subscription", "subscription_id", required=True, type=SUBSCRIPTION_ID)
@click.option(
    "--since",
    required=True,
    callback=since_time,
    help="events written at or after this time: ISO 8601 or Unix seconds",
)
def events_replay(subscription_id: int, since: datetime) -> None:
    """Send a subscription's events since a time again, with their webhook-ids."""
    with new_session() as session, domain_errors():
        begin_write(session)
        replayed = replay(session.connection(), subscription_id, since=since, now=utcnow())
        session.commit()
    click.echo(f"{replayed.count} sends pending again for subscription {subscription_id}")
