"""`manager stop` (one task, now) and `manager worker` (the queue, within the rate limit)."""

from __future__ import annotations

import os
import signal
import threading

import click
from flask import current_app
from flask.cli import with_appcontext

from manager.cli.common import new_session, stop_reason, storable
from manager.cli.errors import domain_errors
from manager.events.secrets import Sealer
from manager.events.sender import DEFAULT_THREADS as DEFAULT_EVENT_THREADS
from manager.events.sender import DEFAULT_TIMEOUT as DEFAULT_EVENT_TIMEOUT
from manager.events.sender import EventSender
from manager.logs import configure as configure_logs
from manager.logs import resolve_format
from manager.metrics import serve_metrics
from manager.reports.rollups import fill as fill_hours
from manager.services import get_dispatcher
from manager.stops.dispatch import make_dispatcher, stop_task_now
from manager.stops.requests import WAIT_REASON_TEXT
from manager.stops.worker import Pruning, StopWorker
from manager.vocabulary import StopState


@click.command("stop")
@click.argument("task_id", callback=storable)
@click.option("--reason", callback=stop_reason, help="why, recorded with the stop request")
@click.option("--force", is_flag=True, help="stop even if the task is recorded as stopped")
@with_appcontext
def stop_command(task_id: str, reason: str | None, force: bool) -> None:
    """Stop a task through StopCloudTranscode, as its recorded owner."""

    settings = current_app.extensions["manager.settings"]
    who = f"cli:{os.environ.get('USER') or os.environ.get('LOGNAME') or 'unknown'}"
    with new_session() as session, domain_errors():
        stop, created = stop_task_now(
            session,
            get_dispatcher(),
            task_id,
            app_id=settings.zego_app_id,
            requested_by=who,
            reason=reason,
            force=force,
        )
    code = f" (ZEGO {stop.last_code}: {stop.last_message})" if stop.last_code is not None else ""
    if stop.state == StopState.QUEUED and stop.wait_reason is not None:
        code += f" ({WAIT_REASON_TEXT[stop.wait_reason]})"
    prefix = "" if created else "already in flight: "
    click.echo(f"{prefix}stop request {stop.id} seq={stop.sequence} {stop.state}{code}")
    if stop.state == StopState.FAILED:
        raise click.ClickException("ZEGOCLOUD refused the stop")


@click.command("worker")
@click.option("--once", is_flag=True, help="run one pass and exit")
@click.option(
    "--threads",
    default=64,
    show_default=True,
    type=click.IntRange(1, 512),
    help="calls to ZEGOCLOUD that may be in flight at once (sender threads and connections)",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="serve this worker's own metrics (its ZEGOCLOUD calls and stop attempts) on this"
    " port, for a worker that shares no PROMETHEUS_MULTIPROC_DIR with the app",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="address for --metrics-port"
)
@click.option(
    "--event-threads",
    default=DEFAULT_EVENT_THREADS,
    show_default=True,
    type=click.IntRange(1, 512),
    help="outbound event requests that may be in flight at once",
)
@click.option(
    "--event-timeout",
    default=DEFAULT_EVENT_TIMEOUT,
    show_default=True,
    type=click.FloatRange(0.1, 60),
    help="seconds a subscription's receiver has to answer an event",
)
@with_appcontext
def worker_command(
    once: bool,
    threads: int,
    metrics_port: int | None,
    metrics_host: str,
    event_threads: int,
    event_timeout: float,
) -> None:
    """Send queued stop requests within the shared rate limit; re-stop stuck tasks; send
    the outbound events to their subscriptions."""
    ext = current_app.extensions
    # Every attempt, re-stop and give-up is logged, as JSON lines unless on a terminal.
    configure_logs(resolve_format(ext["manager.settings"].log_format, service=True))
    if metrics_port is not None:
        serve_metrics(metrics_port, metrics_host)
    with domain_errors():
        dispatcher = make_dispatcher(
            ext["manager.settings"],
            ext.get("manager.autocommit_engine", ext["manager.engine"]),
            ext["manager.sessions"],
            "worker",
            pool_size=threads,
        )
    settings = ext["manager.settings"]
    pruning = Pruning(ext["manager.engine"], settings.delivery_retention_days, fill_hours)
    worker = StopWorker(dispatcher, threads=threads, tidy_nonces=True, pruning=pruning)
    sender = EventSender(
        ext["manager.engine"],
        Sealer(settings.subscription_keys),
        threads=event_threads,
        timeout=event_timeout,
    )
    try:
        if once:
            click.echo(f"{worker.run_once()} attempts made")
            sent = sender.run_once()
            click.echo(f"{sent.delivered + sent.retrying + sent.failed} events sent")
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        click.echo(f"worker {dispatcher.name} running; Ctrl-C stops it", err=True)
        events = threading.Thread(target=sender.run_forever, args=(stop,), name="events")
        events.start()
        worker.run_forever(stop)
        events.join()
    finally:
        worker.close()
