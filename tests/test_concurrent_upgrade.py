"""Several hosts starting `manager serve` at once each upgrade the schema: on PostgreSQL
one upgrades and the others wait for it, then find nothing to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine

from manager.migrate import is_at_head

pytestmark = pytest.mark.postgres

MANAGER = str(Path(sys.executable).parent / "manager")


def test_upgrades_started_at_once_all_succeed(scratch_engine: Engine, tmp_path: Path) -> None:
    url = scratch_engine.url.render_as_string(hide_password=False)
    env = {"DATABASE_URL": url, "SECRET_KEY": "k" * 32, "PATH": "/usr/bin:/bin"}
    upgrades = [
        subprocess.Popen(
            [MANAGER, "db", "upgrade"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    for upgrade in upgrades:
        _, stderr = upgrade.communicate(timeout=120)
        assert upgrade.returncode == 0, stderr
    assert is_at_head(scratch_engine)
