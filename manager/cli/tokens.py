"""`manager tokens`: operator API tokens."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from manager.access.tokens import create_token, list_tokens, revoke_token
from manager.cli.common import echo_table, new_session, storable
from manager.cli.errors import domain_errors
from manager.db import begin_write

tokens_cli = AppGroup("tokens", help="Operator API tokens.")


@tokens_cli.command("create")
@click.argument("name", callback=storable)
def tokens_create(name: str) -> None:
    """Create a token and print it once."""

    with new_session() as session, domain_errors():
        begin_write(session)
        token = create_token(session, name)
        session.commit()
    click.echo(token)
    click.echo(f"token {name!r} created; it is not shown again.", err=True)


@tokens_cli.command("list")
def tokens_list() -> None:
    """List tokens (names and dates only)."""

    with new_session() as session:
        rows = [
            (t.name, t.created_at, t.last_used_at or "", "revoked" if t.revoked_at else "active")
            for t in list_tokens(session)
        ]
    echo_table(["name", "created_at", "last_used_at", "state"], rows)


@tokens_cli.command("revoke")
@click.argument("name", callback=storable)
def tokens_revoke(name: str) -> None:
    """Revoke a token by name."""

    with new_session() as session, domain_errors():
        begin_write(session)
        revoke_token(session, name)
        session.commit()
    click.echo(f"token {name!r} revoked")
