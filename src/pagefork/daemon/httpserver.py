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

Where each part lives: :mod:`.httpwire` the response and limit types; :mod:`.httpconn` one
connection (h11's parsing, the head checks, an answer's encoding); :mod:`.httptable` the open
connections and the rules on idleness and room; :mod:`.httppool` the thread pools; this
module the loop and the server's life cycle.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus

import h11

from pagefork.daemon.httpconn import HttpConnection, Progress, Refusal
from pagefork.daemon.httppool import WorkerPool
from pagefork.daemon.httptable import ConnectionTable
from pagefork.daemon.httpwire import (
    JSON_TYPE,
    KNOWN_METHODS,
    Handler,
    PoolChooser,
    PoolName,
    Response,
    ServerLimits,
)
from pagefork.errors import PageforkError

log = logging.getLogger("pagefork")

# accept() errors that mean "out of a resource for now": back off instead of spinning.
_ACCEPT_BACKOFF_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_BACKOFF = 0.1


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
        self._pool = WorkerPool(self.limits.workers, "pagefork-http")
        self._long_pool = WorkerPool(self.limits.long_workers, "pagefork-http-long")
        self._wait_pool = WorkerPool(self.limits.wait_workers, "pagefork-http-wait")
        self._lock = threading.Condition()
        self._conns = ConnectionTable(self.limits)  # every open connection (under _lock)
        self._returned: deque[HttpConnection] = deque()  # answered, kept alive: to the loop
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
            idle = self._conns.idle()
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
                and (not self._conns.full or bool(self._conns.evictable(time.monotonic())))
                and time.monotonic() >= self._resume_accept_at
            )
        if want:
            self._resume_accept_at = 0.0
        if want and not self._listening:
            self._selector.register(self.socket, selectors.EVENT_READ, None)
        elif not want and self._listening:
            self._selector.unregister(self.socket)
        self._listening = want

    def _next_timeout(self) -> float | None:
        with self._lock:
            deadline = self._conns.next_deadline(time.monotonic())
        deadlines = [] if deadline is None else [deadline]
        if self._resume_accept_at:  # accepting resumes then
            deadlines.append(self._resume_accept_at)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _make_room(self) -> bool:
        """Below the cap, or made so by closing the connection idle the longest (silent
        ones first, and only one idle for ``evict_after``); False when none may go."""
        with self._lock:
            if not self._conns.full:
                return True
            oldest = self._conns.to_evict(time.monotonic())
        if oldest is None:
            return False
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
                full = self._conns.full
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
            deadline = time.monotonic() + self.limits.idle_timeout
            conn = HttpConnection(sock, self.limits, deadline)
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
                quiet = self._conns.quiet()
            for conn in quiet:
                self._close(conn)

    def _expire_idle(self) -> None:
        with self._lock:
            expired = self._conns.expired(time.monotonic())
        for conn in expired:
            log.debug("control: closing a connection idle for %gs", self.limits.idle_timeout)
            self._close(conn)

    def _guarded(self, conn: HttpConnection, step: Callable[[HttpConnection], None]) -> None:
        """Run one step of a connection; a bug in it costs that connection, not the loop."""
        try:
            step(conn)
        except Exception:
            log.exception("control: dropping a connection after an internal error")
            if not conn.busy:
                self._close(conn)

    def _on_readable(self, conn: HttpConnection) -> None:
        try:
            fed = conn.receive()
        except OSError as exc:
            log.debug("control: connection lost while reading: %s", exc)
            self._close(conn)
            return
        if fed:
            self._process(conn)

    def _process(self, conn: HttpConnection) -> None:
        """Act on where the connection's request stands: dispatch it once complete."""
        progress = conn.progress()
        if isinstance(progress, Refusal):
            conn.refuse(progress)
            self._close(conn)
        elif progress is Progress.CLOSED:
            self._close(conn)
        elif progress is Progress.COMPLETE:
            self._dispatch(conn)

    def _dispatch(self, conn: HttpConnection) -> None:
        method, target, body = conn.take_request()
        self._selector.unregister(conn.sock)
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

    # --- the workers -------------------------------------------------------------------------
    def _answer(self, conn: HttpConnection, method: str, target: str, body: bytes) -> None:
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

    def _write(self, conn: HttpConnection, response: Response) -> bool:
        """Send the answer; whether the connection may carry another request."""
        with self._lock:
            close = self._draining or self._stop
        try:
            conn.write(response, close)
        except (OSError, h11.LocalProtocolError) as exc:
            # A peer that went away (EPIPE, ECONNRESET) or stopped reading: its loss.
            log.debug("control: %s %s: answer not delivered: %s", conn.method, conn.target, exc)
            return False
        return conn.next_cycle()

    # --- closing -----------------------------------------------------------------------------
    def _close(self, conn: HttpConnection) -> None:
        """Close a connection its caller owns (the loop, or the worker that answered it)."""
        if not conn.busy:
            with contextlib.suppress(KeyError, ValueError, RuntimeError):
                self._selector.unregister(conn.sock)
        with self._lock:  # the peer sees EOF only once the connection is no longer counted
            self._conns.discard(conn)
            conn.sock.close()
            self._lock.notify_all()
        self._wake()  # the loop may accept again


__all__ = [
    "JSON_TYPE",
    "KNOWN_METHODS",
    "Handler",
    "HttpServer",
    "PoolChooser",
    "PoolName",
    "Response",
    "ServerLimits",
]
