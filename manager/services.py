"""What the edges take from the running app: its settings, a database session per app
context, and this process's stop dispatcher.

`create_app` (manager/__init__.py) puts the settings and engines in the app's
extensions under these keys; the web views and the CLI commands read them here,
so neither imports the package root nor each other.
"""

from __future__ import annotations

from flask import Flask, current_app, g
from sqlalchemy.orm import Session

from manager.config import Settings
from manager.db import make_engine, make_session_factory
from manager.stops.dispatch import Dispatcher, make_dispatcher

SETTINGS = "manager.settings"
ENGINE = "manager.engine"
AUTOCOMMIT_ENGINE = "manager.autocommit_engine"
SESSIONS = "manager.sessions"
DISPATCHER = "manager.dispatcher"


def init_app(app: Flask, settings: Settings) -> None:
    """The settings, the engines and a session per app context, closed at its end."""
    engine = make_engine(settings.database_url)
    app.extensions[SETTINGS] = settings
    app.extensions[ENGINE] = engine
    app.extensions[SESSIONS] = make_session_factory(engine)
    if engine.dialect.name == "postgresql":
        # The callbacks' own pool, whose connections stay in autocommit mode, for their
        # pipelined transactions (db.write_then_read) and the rate units' statements:
        # switching a pooled connection in and out of autocommit costs a round trip
        # each way.
        app.extensions[AUTOCOMMIT_ENGINE] = make_engine(
            settings.database_url, isolation_level="AUTOCOMMIT"
        )

    @app.teardown_appcontext
    def _close_session(_exc: BaseException | None) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()


def dispose_engines(app: Flask) -> None:
    """Close every pooled connection the app holds."""
    for name in (ENGINE, AUTOCOMMIT_ENGINE):
        if name in app.extensions:
            app.extensions[name].dispose()


def get_session() -> Session:
    """The session of the current app context, opened on first use."""
    if "db_session" not in g:
        g.db_session = current_app.extensions[SESSIONS]()
    session: Session = g.db_session
    return session


def get_settings() -> Settings:
    settings: Settings = current_app.extensions[SETTINGS]
    return settings


def get_dispatcher(role: str = "api") -> Dispatcher:
    """This process's stop dispatcher, made on first use (it needs the ZEGO settings)."""
    ext = current_app.extensions
    if DISPATCHER not in ext:
        ext[DISPATCHER] = make_dispatcher(
            ext[SETTINGS], ext.get(AUTOCOMMIT_ENGINE, ext[ENGINE]), ext[SESSIONS], role
        )
    dispatcher: Dispatcher = ext[DISPATCHER]
    return dispatcher
