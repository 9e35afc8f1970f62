"""Small dialect-aware statements that the ORM does not spell portably."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session


def insert_ignore(
    session: Session, model: Any, values: Mapping[str, Any], conflict_columns: Sequence[str]
) -> bool:
    """INSERT … ON CONFLICT DO NOTHING; True when this statement inserted the row.

    The database decides who wins: concurrent inserters of the same key wait for
    the first to commit and then insert nothing.
    """
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = model.__table__
    statement = (
        insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=list(conflict_columns))
        .returning(table.primary_key.columns.values()[0])
    )
    return session.execute(statement).first() is not None
