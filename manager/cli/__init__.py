"""The CLI edge: commands that parse, call one domain function, and print.

The same commands serve `manager` (manager/cli/main.py) and the app's own
`flask` group, which the tests drive."""

from __future__ import annotations

from click import Command
from flask import Flask

from manager.cli.db import db_cli
from manager.cli.dev import demo_command, fake_zego_command
from manager.cli.rebuild import rebuild_command
from manager.cli.reports import report_command
from manager.cli.serve import serve_command
from manager.cli.stops import stop_command, worker_command
from manager.cli.subscriptions import events_cli, subscriptions_cli
from manager.cli.tasks import tasks_command
from manager.cli.tokens import tokens_cli

COMMANDS: tuple[Command, ...] = (
    db_cli,
    tokens_cli,
    tasks_command,
    report_command,
    stop_command,
    worker_command,
    subscriptions_cli,
    events_cli,
    rebuild_command,
    serve_command,
    fake_zego_command,
    demo_command,
)


def register_commands(app: Flask) -> None:
    for command in COMMANDS:
        app.cli.add_command(command)
