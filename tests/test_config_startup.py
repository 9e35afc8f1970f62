"""An invalid configuration stops the installed console script with a message, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MANAGER = str(Path(sys.executable).parent / "manager")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:hunter2@h:notaport/db",
        "postgresql+psycopg2://u:hunter2@h/db",
    ],
)
def test_bad_database_url_is_named_without_a_traceback(url: str) -> None:
    result = subprocess.run(
        [MANAGER, "db", "current"],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
