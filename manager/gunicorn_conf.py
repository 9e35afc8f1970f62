"""gunicorn settings used by `manager serve` (`--config python:manager.gunicorn_conf`)."""

from __future__ import annotations

from typing import Any

accesslog = "-"
graceful_timeout = 20


def child_exit(_server: Any, worker: Any) -> None:
    # Drop a dead worker's live gauges from the shared metrics folder.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
