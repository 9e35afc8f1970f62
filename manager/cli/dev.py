"""Local tools: `manager fake-zego` (a stand-in for ZEGOCLOUD) and `manager demo`."""

from __future__ import annotations

import threading

import click
from flask import current_app
from flask.cli import with_appcontext


@click.command("fake-zego")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8900, show_default=True, type=int)
@click.option("--callback-url", default="http://127.0.0.1:8000/callbacks/zego", show_default=True)
@click.option("--rate-limit", default=100, show_default=True, type=int)
@click.option(
    "--answer-delay-ms",
    default=0,
    show_default=True,
    type=click.IntRange(0, 60_000),
    help="answer each call this long after counting and applying it",
)
@with_appcontext
def fake_zego_command(
    host: str, port: int, callback_url: str, rate_limit: int, answer_delay_ms: int
) -> None:
    """Serve a local stand-in for ZEGOCLOUD's API, signed with this instance's secrets."""
    from manager.zego.fake import FakeZego
    from manager.zego.fake_server import FakeServer

    settings = current_app.extensions["manager.settings"]
    if settings.zego_app_id is None or not settings.zego_server_secret:
        raise click.ClickException("set ZEGO_APP_ID and ZEGO_SERVER_SECRET for the fake to check")
    if not settings.callback_secrets:
        raise click.ClickException("set ZEGO_CALLBACK_SECRET for the fake to sign callbacks")
    fake = FakeZego(
        app_id=settings.zego_app_id,
        server_secret=settings.zego_server_secret,
        callback_secret=settings.callback_secrets[0],
        callback_url=callback_url,
        rate_limit=rate_limit,
        answer_delay=answer_delay_ms / 1000,
    )
    server = FakeServer(fake, port=port, host=host)
    click.echo(f"fake ZEGOCLOUD API on {server.url} (ZEGO_API_URL); callbacks to {callback_url}")
    server.serve_forever()


@click.command("demo")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--fake-port", default=8900, show_default=True, type=int)
@click.option("--exit", "then_exit", is_flag=True, help="stop everything once the traffic is done")
def demo_command(port: int, fake_port: int, then_exit: bool) -> None:
    """Run the service, the fake ZEGOCLOUD, a worker and sample traffic, on 127.0.0.1."""

    from manager.cli.demo import Demo

    demo = Demo(port, fake_port, click.echo)
    try:
        demo.start()
        demo.traffic()
        if not then_exit:
            click.echo("\nstill running: explore the API and the dashboard; Ctrl-C stops it all")
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        demo.stop()
