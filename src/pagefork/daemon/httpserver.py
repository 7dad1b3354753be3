"""A small HTTP/1.1 server for the control API: h11 parses, one selector loop reads, a capped
thread pool answers.

Chosen: h11 under a loop of our own. Why h11 (python-hyper's sans-I/O HTTP/1.1 engine)
rather than ``http.server`` or an aiohttp/uvicorn server: h11 already refuses what a
hand-rolled layer lets through (conflicting Content-Length, a body cut short by the peer,
malformed framing) and decodes chunked bodies, yet leaves every byte of I/O to us. The daemon
needs that I/O: its listening socket stays a plain socket it owns (so it can be handed to
another process, and the server can stop accepting while requests in flight finish), and the
API's blocking manager calls run on plain threads. An asyncio server would own the socket's
lifecycle and push every manager call to an executor anyway.

How it serves:

- One loop thread accepts connections, reads them (non-blocking) and feeds h11, until a whole
  request has arrived. Nothing is executed before that: a body that is cut short, too long,
  or framed twice is answered with a JSON error and the connection closed.
- A complete request goes to a pool of ``workers`` threads, which run the handler (it may
  block for seconds, e.g. a VMM restore) and write the answer; other requests go on.
- Requests that may wait long go to pools of their own (``long_workers``; and
  ``wait_workers`` for requests that only wait for something to end, like a guest's run),
  chosen by the ``is_long`` callable: a crowd of waiters never holds up a fork's creation,
  and neither holds up the quick requests.
- A connection must deliver a complete request within ``idle_timeout`` seconds of opening
  or of its previous answer, or it is closed: idle and slow peers cannot pin it down.
- At most ``max_connections`` connections are open at once. When that many are open and a
  newcomer waits, the connection idle the longest (one with no request being answered;
  silent ones first) is closed to make room, so idle peers never crowd out a client with a
  request to make: the cap binds only connections whose requests are being answered. Once
  every open connection is busy the server stops accepting: new connections wait in the
  kernel's listen backlog (``backlog``) and are served as others finish. A connection idle
  for less than ``evict_after`` seconds is not closed for a newcomer (it has just connected
  and may be about to send its request). A client whose
  connect finds even the backlog full waits too (see :mod:`pagefork.daemon.client`).
  Accepting and reading take turns (one newcomer per turn while at the cap), so a
  newcomer's request is read before it could become the oldest idle connection.
- Every error the server itself answers is JSON ``{"error": ...}``, like the handler's (HEAD
  answers carry the headers only, as HTTP says). A peer that goes away mid-answer is logged
  at debug level, never as a traceback.
- h11 merges repeated equal Content-Length headers (RFC 9112 allows it); this server refuses
  any repeat instead, since no control client sends one and a proxy in front might disagree.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import queue
import re
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Literal

import h11

from pagefork.errors import PageforkError

log = logging.getLogger("pagefork")

JSON_TYPE = "application/json"

#: The methods HTTP defines (RFC 9110 §9, and PATCH): a route answers 405 to those it does
#: not take. Any other method is 501 before routing.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

# A Content-Length line in a request head (RFC 9112 §5: field names are case-insensitive;
# h11 also takes bare LF line ends, so this does too).
_CONTENT_LENGTH_LINE = re.compile(rb"\ncontent-length[ \t]*:", re.IGNORECASE)
_END_OF_HEAD = re.compile(rb"\n\r?\n")
_RECV_SIZE = 65536
# accept() errors that mean "out of a resource for now": back off instead of spinning.
_ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF = 0.1


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


class _Workers:
    """A capped pool of daemon threads, started as work arrives.

    Not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are joined at interpreter
    exit, so one request stuck in a long manager call would keep a stopping daemon alive.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if self._idle == 0 and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1  # an idle thread takes it
        self._tasks.put(task)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # _answer handles everything; this keeps the thread alive
                log.exception("control: a worker task failed")
            with self._lock:
                self._idle += 1

    def close(self, timeout: float) -> bool:
        """Stop every thread once its task is done; True if all stopped within ``timeout``."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


class _Conn:
    """One accepted connection. The loop thread owns it while it reads; a worker owns it
    while it answers (``busy``). Only the owner closes its socket."""

    __slots__ = (
        "answered",
        "body",
        "busy",
        "deadline",
        "h11",
        "head",
        "method",
        "received",
        "sock",
        "target",
    )

    def __init__(self, sock: socket.socket, max_head: int, deadline: float) -> None:
        self.sock = sock
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self.deadline = deadline
        self.busy = False
        self.head = bytearray()  # the raw bytes of the request head being received
        self.received = False  # any byte since the last answer
        # A connection that has had no answer yet was opened to ask something: a drain waits
        # for its request (a hand-over must not fail a client that has just connected).
        self.answered = False
        self.method = ""
        self.target = ""
        self.body = bytearray()


class HttpServer:
    """Serves ``handler`` on the listening Unix socket ``sock``, which the server then owns.

    :meth:`serve_forever` runs the loop (on a thread of the caller's); :meth:`stop_accepting`
    and :meth:`drain` let requests in flight finish before a hand-over; :meth:`shutdown` then
    :meth:`server_close` stop it and close every socket.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        limits: ServerLimits | None = None,
        is_long: PoolChooser | None = None,
    ) -> None:
        self.limits = limits or ServerLimits()
        self.socket = sock
        self.handler = handler
        self._is_long = is_long
        sock.setblocking(False)
        # listen() again only changes the backlog of an already listening socket.
        sock.listen(self.limits.backlog)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pool = _Workers(self.limits.workers, "pagefork-http")
        self._long_pool = _Workers(self.limits.long_workers, "pagefork-http-long")
        self._wait_pool = _Workers(self.limits.wait_workers, "pagefork-http-wait")
        self._lock = threading.Condition()
        self._conns: set[_Conn] = set()  # every open connection (under _lock)
        self._returned: deque[_Conn] = deque()  # answered, kept alive: back to the loop
        self._in_flight = 0
        self._accepting = True
        self._draining = False
        self._stop = False
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._listening = False
        self._resume_accept_at = 0.0
        self._accept_failing = False
        self._closed = False

    # --- the public life cycle ---------------------------------------------------------------
    @property
    def connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._conns)

    @property
    def in_flight(self) -> int:
        """Requests being answered now, or waiting for a worker."""
        with self._lock:
            return self._in_flight

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown`; call it on a thread of its own."""
        with self._lock:
            if self._closed:
                raise PageforkError("the HTTP server is closed")
            self._stop = False
        self._stopped.clear()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._running.set()
        try:
            while not self._stop:
                self._update_listening()
                events = self._selector.select(self._next_timeout())
                accept = False
                # Read before accepting: a newcomer's request is read (and the connection
                # busy) before another newcomer could make it the oldest idle one.
                for key, _ in events:
                    if key.fileobj is self.socket:
                        accept = True
                    elif key.fileobj is self._wake_r:
                        self._take_returned()
                    else:
                        self._guarded(key.data, self._on_readable)
                if accept:
                    self._accept()
                self._expire_idle()
        finally:
            self._leave_loop()

    def stop_accepting(self) -> None:
        """Accept no new connection; the socket stays open (and owned) for a hand-over."""
        with self._lock:
            self._accepting = False
        self._wake()

    def resume_accepting(self) -> None:
        """Accept again after :meth:`stop_accepting` or :meth:`drain` (a hand-over failed)."""
        with self._lock:
            self._accepting = True
            self._draining = False
        self._wake()

    def drain(self, timeout: float) -> bool:
        """Stop accepting and wait up to ``timeout`` seconds until every connection is closed.

        Requests in flight finish and are answered with ``Connection: close``; connections
        that have sent nothing since their last answer are closed now; one that is midway
        through a request may finish it within its idle timeout. True if none is left.
        """
        with self._lock:
            self._accepting = False
            self._draining = True
        self._wake()
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._conns:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def shutdown(self) -> None:
        """Drain for up to ``shutdown_grace`` seconds, then stop :meth:`serve_forever` and wait
        for it to return. Connections still open are closed by :meth:`server_close`."""
        if self._running.is_set():
            self.drain(self.limits.shutdown_grace)
        with self._lock:
            self._stop = True
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close the listening socket and every connection; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._stop = True
        self._wake()
        self._stopped.wait()  # the loop has closed the connections it owned
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            if conn.busy:
                # Its worker owns the socket: make its write fail; the worker closes it.
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
            else:
                self._close(conn)
        grace = min(1.0, self.limits.shutdown_grace)
        pools = (self._pool, self._long_pool, self._wait_pool)
        if not all([pool.close(timeout=grace) for pool in pools]):
            log.warning("control: requests still running at close; their answers are lost")
        self.socket.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the loop ----------------------------------------------------------------------------
    def _leave_loop(self) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._wake_r)
        if self._listening:
            self._selector.unregister(self.socket)
            self._listening = False
        with self._lock:
            self._stop = True  # from now on a worker closes the connection it answered
            for conn in self._returned:
                conn.busy = False
            self._returned.clear()
            idle = [c for c in self._conns if not c.busy]
        for conn in idle:
            self._close(conn)
        self._running.clear()
        self._stopped.set()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed
            self._wake_w.send(b"\0")

    def _update_listening(self) -> None:
        """Listen while accepting and below the connection cap; otherwise let the backlog
        hold newcomers."""
        with self._lock:
            want = (
                self._accepting
                and (
                    len(self._conns) < self.limits.max_connections
                    or bool(self._evictable(time.monotonic()))
                )
                and time.monotonic() >= self._resume_accept_at
            )
        if want:
            self._resume_accept_at = 0.0
        if want and not self._listening:
            self._selector.register(self.socket, selectors.EVENT_READ, None)
        elif not want and self._listening:
            self._selector.unregister(self.socket)
        self._listening = want

    def _evictable(self, now: float) -> list[_Conn]:
        """The connections that may be closed to make room (lock held): idle for at least
        ``evict_after`` seconds."""
        since = now + self.limits.idle_timeout - self.limits.evict_after
        return [c for c in self._conns if not c.busy and c.deadline <= since]

    def _next_timeout(self) -> float | None:
        with self._lock:
            deadlines = [c.deadline for c in self._conns if not c.busy]
            if len(self._conns) >= self.limits.max_connections:
                # When one becomes evictable (listening resumes then); one that is already
                # evictable needs no wake-up: the listening socket wakes the loop.
                wait = self.limits.idle_timeout - self.limits.evict_after
                now = time.monotonic()
                deadlines += [d - wait for d in deadlines if d - wait > now]
        if self._resume_accept_at:  # accepting resumes then
            deadlines.append(self._resume_accept_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _make_room(self) -> bool:
        """Below the cap, or made so by closing the connection idle the longest (silent
        ones first, and only one idle for ``evict_after``); False when none may go."""
        with self._lock:
            if len(self._conns) < self.limits.max_connections:
                return True
            idle = self._evictable(time.monotonic())
        if not idle:
            return False
        oldest = min(idle, key=lambda c: (c.received, c.deadline))
        log.debug("control: closing an idle connection to make room for a new one")
        self._close(oldest)
        return True

    def _accept(self) -> None:
        """Accept the newcomers waiting now (the listening socket was readable)."""
        first = True
        while True:
            with self._lock:
                if not self._accepting:
                    return
                full = len(self._conns) >= self.limits.max_connections
            # At the cap, room is made for a newcomer known to wait: the first one, on this
            # turn (one per turn: its request is read before the next is let in).
            if full and (not first or not self._make_room()):
                return
            first = False
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_BACKOFF_ERRNOS:
                    if not self._accept_failing:  # once per episode, not every backoff
                        log.warning("control: cannot accept (%s); backing off", exc.strerror)
                    self._accept_failing = True
                    self._resume_accept_at = time.monotonic() + _ACCEPT_BACKOFF
                return  # ECONNABORTED and the like: the peer is gone already
            self._accept_failing = False
            sock.setblocking(False)
            conn = _Conn(sock, self.limits.max_head, time.monotonic() + self.limits.idle_timeout)
            with self._lock:
                self._conns.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _take_returned(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        while True:
            with self._lock:
                if not self._returned:
                    break
                conn = self._returned.popleft()
            conn.busy = False
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            self._guarded(conn, self._process)  # a pipelined request may be buffered already
        if self._draining:
            with self._lock:
                quiet = [c for c in self._conns if not c.busy and c.answered and not c.received]
            for conn in quiet:
                self._close(conn)

    def _expire_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [c for c in self._conns if not c.busy and c.deadline <= now]
        for conn in expired:
            log.debug("control: closing a connection idle for %gs", self.limits.idle_timeout)
            self._close(conn)

    def _guarded(self, conn: _Conn, step: Callable[[_Conn], None]) -> None:
        """Run one step of a connection; a bug in it costs that connection, not the loop."""
        try:
            step(conn)
        except Exception:
            log.exception("control: dropping a connection after an internal error")
            if not conn.busy:
                self._close(conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("control: connection lost while reading: %s", exc)
            self._close(conn)
            return
        if data:
            conn.received = True
            if conn.h11.their_state is h11.IDLE:
                conn.head += data[: self.limits.max_head + 4 - len(conn.head)]
        conn.h11.receive_data(data)  # b"" is the peer's EOF
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Feed h11's events until it needs more bytes, the request is complete, or it is bad."""
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                # A body cut short by EOF lands here too: refused, never executed.
                status = exc.error_status_hint
                if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:  # h11's own limit
                    message = f"request head larger than {self.limits.max_head} bytes"
                else:
                    message = f"bad request: {exc}"
                self._refuse(conn, status, message)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.ConnectionClosed):
                self._close(conn)
                return
            if isinstance(event, h11.Request):
                refusal = self._check_head(conn, event)
                if refusal is not None:
                    self._refuse(conn, *refusal)
                    return
                if conn.h11.they_are_waiting_for_100_continue:  # curl waits a second for it
                    go_on = h11.InformationalResponse(
                        status_code=100, headers=[], reason="Continue"
                    )
                    self._send_nowait(conn, conn.h11.send(go_on) or b"")
            elif isinstance(event, h11.Data):
                if len(conn.body) + len(event.data) > self.limits.max_body:
                    limit = self.limits.max_body
                    self._refuse(conn, 413, f"request body larger than {limit} bytes")
                    return
                conn.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
                return

    def _check_head(self, conn: _Conn, request: h11.Request) -> tuple[int, str] | None:
        """Why a request head is refused before its body is read, or None."""
        conn.method = request.method.decode("ascii")
        conn.target = request.target.decode("ascii")
        parts = _END_OF_HEAD.split(bytes(conn.head), 1)
        conn.head.clear()
        if len(parts) == 1:  # the kept bytes hold no end of head: it is over the limit
            return (
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request head larger than {self.limits.max_head} bytes",
            )
        head = parts[0]
        names = {name for name, _ in request.headers}
        # h11 refuses conflicting lengths and merges equal ones; a control client never
        # sends two, so any repeat is refused: framing must be unambiguous (RFC 9112 §6.3).
        if len(_CONTENT_LENGTH_LINE.findall(head)) > 1:
            return HTTPStatus.BAD_REQUEST, "bad request: duplicate Content-Length headers"
        if b"content-length" in names and b"transfer-encoding" in names:
            return HTTPStatus.BAD_REQUEST, "bad request: both Content-Length and Transfer-Encoding"
        if conn.method not in KNOWN_METHODS:
            return HTTPStatus.NOT_IMPLEMENTED, f"method {conn.method} is not implemented"
        for name, value in request.headers:
            if name == b"content-length" and int(value) > self.limits.max_body:
                return (
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body larger than {self.limits.max_body} bytes",
                )
        return None

    def _dispatch(self, conn: _Conn) -> None:
        # The head of a pipelined next request may already sit in h11's buffer.
        conn.head = bytearray(conn.h11.trailing_data[0][: self.limits.max_head + 4])
        conn.busy = True
        self._selector.unregister(conn.sock)
        method, target, body = conn.method, conn.target, bytes(conn.body)
        conn.body = bytearray()
        with self._lock:
            self._in_flight += 1
        try:
            kind = self._is_long(method, target) if self._is_long is not None else "quick"
            if kind == "wait":
                pool = self._wait_pool
            elif kind is True or kind == "long":
                pool = self._long_pool
            else:
                pool = self._pool
            pool.submit(lambda: self._answer(conn, method, target, body))
        except RuntimeError:  # the pool is shut down: the server is closing
            with self._lock:
                self._in_flight -= 1
            self._close(conn)

    def _refuse(self, conn: _Conn, status: int, message: str) -> None:
        """Answer a request the server will not execute, then close the connection."""
        if conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            response = Response.error(status, message)
            try:
                data = self._encode(conn, response, close=True)
            except h11.LocalProtocolError:
                data = b""
            self._send_nowait(conn, data)
        # Read what the peer already sent, so that closing does not turn into a reset that
        # could discard the answer on its side.
        with contextlib.suppress(OSError):
            for _ in range(16):
                if not conn.sock.recv(_RECV_SIZE):
                    break
        self._close(conn)

    def _send_nowait(self, conn: _Conn, data: bytes) -> None:
        """Write from the loop without ever blocking it (a short answer to a fresh socket)."""
        with contextlib.suppress(OSError):
            conn.sock.send(data, socket.MSG_NOSIGNAL)

    # --- the workers -------------------------------------------------------------------------
    def _answer(self, conn: _Conn, method: str, target: str, body: bytes) -> None:
        keep = False
        try:
            if self._closed:  # queued behind a close: never executed, never answered
                return
            try:
                response = self.handler(method, target, body)
            except Exception as exc:  # a handler bug answers 500; the server keeps serving
                log.exception("control: %s %s failed", method, target)
                response = Response.error(
                    HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc!r}"
                )
            keep = self._write(conn, response)
        finally:
            with self._lock:
                self._in_flight -= 1
                keep = keep and not self._stop  # once the loop is gone, the worker closes
                if keep:
                    self._returned.append(conn)
            if keep:
                self._wake()
            else:
                self._close(conn)

    def _write(self, conn: _Conn, response: Response) -> bool:
        """Send the answer; whether the connection may carry another request."""
        with self._lock:
            close = self._draining or self._stop
        try:
            data = self._encode(conn, response, close)
            conn.sock.settimeout(self.limits.send_timeout)
            conn.sock.sendall(data, socket.MSG_NOSIGNAL)
            conn.sock.setblocking(False)
        except (OSError, h11.LocalProtocolError) as exc:
            # A peer that went away (EPIPE, ECONNRESET) or stopped reading: its loss.
            log.debug("control: %s %s: answer not delivered: %s", conn.method, conn.target, exc)
            return False
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            conn.method = conn.target = ""
            conn.received = bool(conn.head)
            conn.answered = True
            conn.deadline = time.monotonic() + self.limits.idle_timeout
            return True
        return False

    def _encode(self, conn: _Conn, response: Response, close: bool) -> bytes:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = ""
        data = (
            conn.h11.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            or b""
        )
        if conn.method != "HEAD":  # h11 frames a HEAD answer as headers only
            data += conn.h11.send(h11.Data(data=response.body)) or b""
        return data + (conn.h11.send(h11.EndOfMessage()) or b"")

    # --- closing -----------------------------------------------------------------------------
    def _close(self, conn: _Conn) -> None:
        """Close a connection its caller owns (the loop, or the worker that answered it)."""
        if not conn.busy:
            with contextlib.suppress(KeyError, ValueError, RuntimeError):
                self._selector.unregister(conn.sock)
        with self._lock:  # the peer sees EOF only once the connection is no longer counted
            self._conns.discard(conn)
            conn.sock.close()
            self._lock.notify_all()
        self._wake()  # the loop may accept again


__all__ = ["Handler", "HttpServer", "PoolChooser", "PoolName", "Response", "ServerLimits"]
