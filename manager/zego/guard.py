"""When a call's bytes leave: a deadline checked before the first write, a stamp after the last.

The shared rate limit counts calls by when they were written to the socket, not by
when a thread meant to send them: a new connection (TCP, TLS) or a paused thread
may put seconds between the two. So the connections of the ZEGOCLOUD client check
the caller's deadline once connected, right before a request's first byte goes
out, and stamp the time on the local monotonic clock once its last byte has gone.
A request whose deadline has passed raises `DeadlinePassed` and sends nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class DeadlinePassed(Exception):
    """The request was not sent: its deadline had passed once the connection was ready."""


@dataclass
class SendGuard:
    """One request's deadline (monotonic seconds) and, once sent, when its last byte left."""

    deadline: float
    clock: Callable[[], float] = time.monotonic
    # Called with written_at as soon as the request is out, before its answer comes.
    on_written: Callable[[float], None] | None = None
    opened: bool = field(default=False, init=False)
    written_at: float | None = field(default=None, init=False)


_current = threading.local()


@contextmanager
def guarded(guard: SendGuard) -> Iterator[SendGuard]:
    """Apply `guard` to the requests this thread makes inside the block."""
    _current.guard = guard
    try:
        yield guard
    finally:
        _current.guard = None


def _guard() -> SendGuard | None:
    return getattr(_current, "guard", None)


class _Guarded:
    """Mixed into urllib3's connections: the check before the first byte, the stamp after."""

    sock: Any

    def send(self, data: Any) -> None:
        guard = _guard()
        if guard is not None and not guard.opened:
            if self.sock is None:
                self.connect()  # type: ignore[attr-defined]  # its set-up is not the request's send
            if guard.clock() >= guard.deadline:
                raise DeadlinePassed("the send deadline passed before the request went out")
            guard.opened = True
        super().send(data)  # type: ignore[misc]

    def request(self, *args: Any, **kwargs: Any) -> None:
        super().request(*args, **kwargs)  # type: ignore[misc]
        guard = _guard()
        if guard is not None and guard.opened:
            guard.written_at = guard.clock()
            if guard.on_written is not None:
                guard.on_written(guard.written_at)


class GuardedHTTPConnection(_Guarded, HTTPConnection):
    pass


class GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """requests' adapter whose connections honour the calling thread's SendGuard."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }
