"""manager: lifecycle manager for ZEGOCLOUD Single Stream Transcoding tasks.

The composition root: `create_app` puts the app together from the edges (web/,
cli/) over the domains, and `main` is the `manager` command. Nothing else imports
the package root.
"""

from __future__ import annotations

import os
from importlib import metadata

import click
from flask import Flask
from flask.cli import ScriptInfo

from manager import services
from manager.cli import COMMANDS, register_commands
from manager.config import MAX_BODY_BYTES, ConfigError, Settings
from manager.services import dispose_engines
from manager.web import api as web_api
from manager.web import callbacks as web_callbacks
from manager.web import dashboard as web_dashboard
from manager.web import edges
from manager.web import ops as web_ops
from manager.web import reports as web_reports
from manager.web import subscriptions as web_subscriptions
from manager.web.cookie_sessions import CookieSessionInterface
from manager.web.errors import register_error_handlers

__all__ = ["create_app", "dispose_engines", "main"]


def create_app(settings: Settings | None = None) -> Flask:
    """Application factory: settings are read once here, never at import time."""
    app = Flask(__name__, instance_relative_config=True)
    if settings is None:
        settings = Settings.from_env(instance_path=app.instance_path)
    app.config["SECRET_KEY"] = settings.secret_key
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    app.session_interface = CookieSessionInterface()
    if settings.is_sqlite:
        os.makedirs(app.instance_path, exist_ok=True)

    services.init_app(app, settings)
    register_error_handlers(app)
    edges.init_app(app)

    # Callback POSTs skip Flask's request handling (see manager/web/callbacks.py).
    endpoint = web_callbacks.CallbackEndpoint(app)
    app.extensions[web_callbacks.ENDPOINT] = endpoint
    app.wsgi_app = web_callbacks.CallbackRoute(app.wsgi_app, endpoint)  # type: ignore[method-assign]
    # Outermost: the request id and the headers every answer carries.
    app.wsgi_app = edges.AnswerHeaders(app.wsgi_app)  # type: ignore[method-assign]

    for blueprint in (
        web_ops,
        web_callbacks,
        web_api,
        web_reports,
        web_subscriptions,
        web_dashboard,
    ):
        app.register_blueprint(blueprint.bp)

    register_commands(app)
    return app


def _create_app() -> Flask:
    try:
        return create_app()
    except ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    metadata.version("manager"),
    "--version",
    "-V",
    prog_name="manager",
    message="%(prog)s %(version)s",
)
@click.pass_context
def main(ctx: click.Context) -> None:
    """Lifecycle manager for ZEGOCLOUD Single Stream Transcoding tasks."""
    ctx.obj = ScriptInfo(create_app=_create_app, set_debug_flag=False)


for _command in COMMANDS:
    main.add_command(_command)
