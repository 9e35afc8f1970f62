"""The `manager` command line, in-process and as the installed console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient, FlaskCliRunner

from ..conftest import callback
from ..live import free_port

MANAGER = str(Path(sys.executable).parent / "manager")


def test_db_current_reports_head(runner: FlaskCliRunner) -> None:
    result = runner.invoke(args=["db", "current"])
    assert result.exit_code == 0
    assert "head" in result.output
    assert "behind" not in result.output


def test_tasks_table_and_json(client: FlaskClient, runner: FlaskCliRunner) -> None:
    for task_id, owner in (("cli-1", "alice"), ("cli-2", "bob")):
        body = json.dumps(callback(task_id=task_id, user_id=owner))
        client.post("/callbacks/zego", data=body, content_type="application/json")
    table = runner.invoke(args=["tasks", "--owner", "alice"])
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert lines[0].split() == ["task_id", "owner", "status", "sequence", "started_at", "ended_at"]
    assert "cli-1" in table.output
    assert "cli-2" not in table.output
    as_json = runner.invoke(args=["tasks", "--format", "json", "--status", "running"])
    assert {t["task_id"] for t in json.loads(as_json.output)} == {"cli-1", "cli-2"}


def run_manager(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, with these variables added to the environment."""
    return subprocess.run(
        [MANAGER, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_console_script_names_a_bad_variable(tmp_path: Path) -> None:
    result = run_manager(
        "db", "current", ZEGO_RATE_LIMIT="lots", DATABASE_URL=f"sqlite:///{tmp_path}/x.db"
    )
    assert result.returncode != 0
    assert "ZEGO_RATE_LIMIT" in result.stderr


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:hunter2@h:notaport/db",
        "postgresql+psycopg2://u:hunter2@h/db",
    ],
)
def test_bad_database_url_is_named_without_a_traceback(url: str) -> None:
    result = run_manager("db", "current", DATABASE_URL=url)
    assert result.returncode != 0
    assert "DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_serve_upgrades_then_serves(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path}/serve.db",
        "SECRET_KEY": "serve-test",
    }
    log = (tmp_path / "stderr").open("w")
    process = subprocess.Popen(
        [MANAGER, "serve", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        ready = None
        while time.monotonic() < deadline and ready is None:
            try:
                ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except requests.RequestException:
                time.sleep(0.2)
        assert ready is not None
        assert ready.status_code == 200
        refused = requests.post(f"http://127.0.0.1:{port}/callbacks/zego", data=b"{}", timeout=5)
        assert refused.status_code == 503  # not configured: no ZEGO_APP_ID here
        # Every worker writes to the shared metrics folder; any of them reports the sum.
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert 'reason="not_configured",verdict="rejected"' in metrics.text
        assert "manager_callback_seconds_bucket" in metrics.text
        assert 'manager_stop_requests_queued{wait_reason="none"} 0.0' in metrics.text
        assert refused.headers["X-Request-Id"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        log.close()
    # Off a terminal, gunicorn's lines and the app's are JSON (after the command's own
    # plain "serving on" line).
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines[0].startswith("serving on http://")
    records = [json.loads(line) for line in lines[1:]]
    assert any(
        r["logger"] == "gunicorn.error" and r["message"].startswith("Booting worker")
        for r in records
    )
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)


@pytest.mark.parametrize("value", ["0", "-3", "abc", "1_0", "100000"])
def test_serve_refuses_a_bad_web_concurrency(tmp_path: Path, value: str) -> None:
    result = run_manager(
        "serve",
        "--port",
        str(free_port()),
        WEB_CONCURRENCY=value,
        DATABASE_URL=f"sqlite:///{tmp_path}/x.db",
        SECRET_KEY="serve-test",
    )
    assert result.returncode != 0
    assert "WEB_CONCURRENCY" in result.stderr


def test_manager_says_its_own_version_and_commands(tmp_path: Path) -> None:
    version = run_manager("--version", DATABASE_URL=f"sqlite:///{tmp_path}/x.db")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"manager {metadata.version('manager')}"
    shown = run_manager("--help", DATABASE_URL=f"sqlite:///{tmp_path}/x.db")
    assert shown.returncode == 0, shown.stderr
    assert "--app" not in shown.stdout
    assert "--debug" not in shown.stdout
    for command in ("db", "tokens", "tasks", "report", "stop", "worker", "rebuild", "serve"):
        assert f"\n  {command} " in shown.stdout
