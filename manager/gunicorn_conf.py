"""gunicorn settings used by `manager serve` (`--config python:manager.gunicorn_conf`)."""

from __future__ import annotations

import os
from typing import Any

from manager.logs import gunicorn_logconfig, resolve_format

# No access log by default: at load it costs more CPU than some of the work it records,
# and every callback is recorded in `deliveries` anyway. Turn it on for one run with
# GUNICORN_CMD_ARGS="--access-logfile -".
accesslog = None
graceful_timeout = 20
# `manager serve` passes LOG_FORMAT on, resolved; gunicorn's own lines and the app's
# then share one format (the workers inherit the root logger's handler).
logconfig_dict = gunicorn_logconfig(
    resolve_format(os.environ.get("LOG_FORMAT", "").strip().lower() or None, service=True)
)


def child_exit(_server: Any, worker: Any) -> None:
    # Drop a dead worker's live gauges from the shared metrics folder.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
