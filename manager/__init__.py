"""manager: lifecycle manager for ZEGOCLOUD Single Stream Transcoding tasks."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from flask import Flask, g
from sqlalchemy.orm import Session

from .config import Settings
from .db import make_engine, make_session_factory
from .errors import register_error_handlers
from .web.cookie_sessions import CookieSessionInterface

if TYPE_CHECKING:
    from .dispatch import Dispatcher

# Callbacks are a few hundred bytes; anything this large is refused unread.
MAX_BODY_BYTES = 64 * 1024


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

    engine = make_engine(settings.database_url)
    app.extensions["manager.settings"] = settings
    app.extensions["manager.engine"] = engine
    app.extensions["manager.sessions"] = make_session_factory(engine)
    if engine.dialect.name == "postgresql":
        # The callbacks' own pool, whose connections stay in autocommit mode, for their
        # pipelined transactions (db.write_then_read): switching a pooled connection in
        # and out of autocommit costs a round trip each way.
        app.extensions["manager.autocommit_engine"] = make_engine(
            settings.database_url, isolation_level="AUTOCOMMIT"
        )

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()

    register_error_handlers(app)

    from .web import api, callbacks, ops

    # Callback POSTs skip Flask's request handling (see manager/web/callbacks.py).
    endpoint = callbacks.CallbackEndpoint(app)
    app.extensions[callbacks.ENDPOINT] = endpoint
    app.wsgi_app = callbacks.CallbackRoute(app.wsgi_app, endpoint)  # type: ignore[method-assign]

    app.register_blueprint(ops.bp)
    app.register_blueprint(callbacks.bp)
    app.register_blueprint(api.bp)

    from .web import reports

    app.register_blueprint(reports.bp)

    from .web import dashboard

    app.register_blueprint(dashboard.bp)

    from .cli import register_commands

    register_commands(app)
    return app


def dispose_engines(app: Flask) -> None:
    """Close every pooled connection the app holds."""
    for name in ("manager.engine", "manager.autocommit_engine"):
        if name in app.extensions:
            app.extensions[name].dispose()


def get_session() -> Session:
    """The session of the current app context, opened on first use."""
    from flask import current_app

    if "db_session" not in g:
        g.db_session = current_app.extensions["manager.sessions"]()
    session: Session = g.db_session
    return session


def get_settings() -> Settings:
    from flask import current_app

    settings: Settings = current_app.extensions["manager.settings"]
    return settings


def get_dispatcher() -> Dispatcher:
    """This process's stop dispatcher, made on first use (it needs the ZEGO settings)."""
    from flask import current_app

    from .dispatch import make_dispatcher

    ext = current_app.extensions
    if "manager.dispatcher" not in ext:
        ext["manager.dispatcher"] = make_dispatcher(
            ext["manager.settings"],
            ext.get("manager.autocommit_engine", ext["manager.engine"]),
            ext["manager.sessions"],
            "api",
        )
    dispatcher: Dispatcher = ext["manager.dispatcher"]
    return dispatcher
