"""`manager serve`: upgrade the schema, then serve the app with gunicorn."""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile

import click
from flask.cli import with_appcontext

from manager.cli.common import app_engine
from manager.logs import resolve_format
from manager.params import is_number
from manager.services import get_settings

MAX_WORKERS = 256


def _default_workers(raw: str) -> int:
    """WEB_CONCURRENCY, checked like every other setting; unset: 2 x CPU cores."""
    if not raw:
        return 2 * multiprocessing.cpu_count()
    if not is_number(raw) or not 1 <= int(raw) <= MAX_WORKERS:
        # 0 would start gunicorn with no workers at all, and a typo would be ignored.
        raise click.UsageError(
            f"WEB_CONCURRENCY must be a whole number from 1 to {MAX_WORKERS}, not {raw!r}"
        )
    return int(raw)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--workers",
    type=click.IntRange(1, MAX_WORKERS),
    help="default: $WEB_CONCURRENCY, else 2 x CPU cores",
)
@with_appcontext
def serve_command(host: str, port: int, workers: int | None) -> None:
    """Upgrade the schema, then serve the app with gunicorn."""
    from manager.migrate import upgrade

    if workers is None:
        workers = _default_workers(os.environ.get("WEB_CONCURRENCY", "").strip())
    upgrade(app_engine())
    env = dict(os.environ)
    env["LOG_FORMAT"] = resolve_format(get_settings().log_format, service=True)
    # Must be set before prometheus_client is imported, hence a fresh gunicorn process.
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="manager-metrics-"))
    click.echo(f"serving on http://{host}:{port} with {workers} workers", err=True)
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--config",
        "python:manager.gunicorn_conf",
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        # The app from the installed package: no source tree needed (wsgi.py at the top
        # of the repository serves `gunicorn wsgi:app` from a checkout).
        "manager:create_app()",
    ]
    os.execve(sys.executable, argv, env)  # noqa: S606 - our own interpreter, fixed arguments
