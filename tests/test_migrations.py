"""Migrations: one head, clean upgrade/downgrade, and models that match them."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from manager.db import Base
from manager.migrate import alembic_config, downgrade, head_revisions, is_at_head, upgrade


def test_single_head(scratch_engine: Engine) -> None:
    script = ScriptDirectory.from_config(alembic_config(scratch_engine))
    assert len(script.get_heads()) == 1


def test_upgrade_downgrade_upgrade(scratch_engine: Engine) -> None:
    upgrade(scratch_engine)
    assert is_at_head(scratch_engine)
    tables = set(inspect(scratch_engine).get_table_names())
    assert {"tasks", "deliveries", "callback_nonces", "api_tokens"} <= tables

    downgrade(scratch_engine, "base")
    assert set(inspect(scratch_engine).get_table_names()) <= {"alembic_version"}
    assert not is_at_head(scratch_engine)

    upgrade(scratch_engine)
    assert is_at_head(scratch_engine)


def test_each_revision_steps_down_and_up(scratch_engine: Engine) -> None:
    script = ScriptDirectory.from_config(alembic_config(scratch_engine))
    revisions = [r.revision for r in script.walk_revisions("base", "heads")]
    upgrade(scratch_engine)
    for _ in revisions:
        downgrade(scratch_engine, "-1")
    for revision in reversed(revisions):
        upgrade(scratch_engine, revision)
    assert is_at_head(scratch_engine)


# SQLite cannot reflect expression indexes; the one on run lengths is PostgreSQL's only.
@pytest.mark.filterwarnings(
    "ignore:autogenerate skipping metadata-specified expression-based index 'ix_task_runs_span'"
)
def test_models_match_migrations(scratch_engine: Engine) -> None:
    """The `alembic check` of this project: autogenerate finds nothing to do."""
    upgrade(scratch_engine)
    with scratch_engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "render_as_batch": True}
        )
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_head_is_known(scratch_engine: Engine) -> None:
    assert head_revisions(scratch_engine)
