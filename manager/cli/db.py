"""`manager db`: schema migrations (Alembic)."""

from __future__ import annotations

import click
from flask.cli import AppGroup

from manager.cli.common import app_engine

db_cli = AppGroup("db", help="Schema migrations (Alembic).")


@db_cli.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Upgrade the schema (default: to the latest revision)."""
    from manager.migrate import upgrade

    upgrade(app_engine(), revision)
    click.echo(f"upgraded to {revision}")


@db_cli.command("downgrade")
@click.argument("revision", default="-1")
def db_downgrade(revision: str) -> None:
    """Downgrade the schema (default: one revision)."""
    from manager.migrate import downgrade

    downgrade(app_engine(), revision)
    click.echo(f"downgraded to {revision}")


@db_cli.command("current")
def db_current() -> None:
    """Show the schema's revision and whether it is the latest."""
    from manager.migrate import current_revisions, head_revisions

    engine = app_engine()
    with engine.connect() as connection:
        current = current_revisions(connection)
    heads = head_revisions(engine)
    state = "head" if set(current) == set(heads) else f"behind (head is {', '.join(heads)})"
    click.echo(f"{', '.join(current) or '(empty database)'} {state}")
