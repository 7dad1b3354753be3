"""What the control API's HTTP server takes and gives: a response, the handler and pool-chooser
types, and the server's limits. Plain data, no I/O (the server is :mod:`.httpserver`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Literal

from pagefork.errors import PageforkError

JSON_TYPE = "application/json"

#: The methods HTTP defines (RFC 9110 §9, and PATCH): a route answers 405 to those it does
#: not take. Any other method is 501 before routing.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


@dataclass(frozen=True)
class Response:
    """An HTTP response: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, doc: object, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        """A JSON response."""
        return cls(status, (json.dumps(doc) + "\n").encode(), JSON_TYPE, headers)

    @classmethod
    def error(cls, status: int, message: str) -> Response:
        """``{"error": message}`` with ``status``."""
        return cls.json(status, {"error": message})


#: What the server calls for each complete request: (method, target, body) -> response.
Handler = Callable[[str, str, bytes], Response]

#: Which pool answers a request: ``"quick"`` (also False), ``"long"`` (also True) or
#: ``"wait"``; see :class:`ServerLimits`.
PoolName = Literal["quick", "long", "wait"]
#: Says which pool answers a request, from its method and target.
PoolChooser = Callable[[str, str], "bool | PoolName"]


@dataclass(frozen=True)
class ServerLimits:
    """The server's bounds; every one must be positive."""

    #: Threads answering requests; more complete requests wait for one.
    workers: int = 16
    #: Threads answering the requests the handler says may take long (waiting on a VMM): a
    #: pool of their own, so they never hold up the quick ones.
    long_workers: int = 64
    #: Threads answering requests that only wait for something to end (a guest's run): a
    #: pool of their own, so waiters never hold up the long requests that do work.
    wait_workers: int = 64
    #: Open connections at most; more wait in the listen backlog.
    max_connections: int = 256
    #: The listen backlog (the kernel caps it at ``net.core.somaxconn``).
    backlog: int = 1024
    #: Seconds a connection has to deliver a complete request (after opening or an answer).
    idle_timeout: float = 30.0
    #: Seconds a connection must have been idle (since opening or its last answer) before it
    #: may be closed to make room for a newcomer: a client that has just connected has the
    #: time to send its request.
    evict_after: float = 1.0
    #: Seconds an answer may take to write before the connection is dropped.
    send_timeout: float = 10.0
    #: Largest request body, in bytes (a control request is a few hundred).
    max_body: int = 1 << 20
    #: Largest request head (request line and headers), in bytes.
    max_head: int = 16 << 10
    #: Seconds :meth:`HttpServer.shutdown` lets requests in flight finish.
    shutdown_grace: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0 or value == float("inf"):
                raise PageforkError(f"server limit {f.name} must be positive and finite: {value}")


__all__ = [
    "JSON_TYPE",
    "KNOWN_METHODS",
    "Handler",
    "PoolChooser",
    "PoolName",
    "Response",
    "ServerLimits",
]
