"""One HTTP/1.1 connection of the control server: h11 parses its bytes into a request, this
module checks the request's head and encodes its answer. It reads and writes one socket and
knows nothing of the loop, the pools or the other connections (:mod:`.httpserver`).

- Nothing is executed before a whole request has arrived: a body that is cut short, too
  long, or framed twice is refused (a JSON error, then the connection is closed).
- h11 merges repeated equal Content-Length headers (RFC 9112 allows it); this server refuses
  any repeat instead, since no control client sends one and a proxy in front might disagree.
- Every error the server itself answers is JSON ``{"error": ...}``, like the handler's (HEAD
  answers carry the headers only, as HTTP says).
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from dataclasses import dataclass
from enum import Enum
from http import HTTPStatus

import h11

from pagefork.daemon.httpwire import KNOWN_METHODS, Response, ServerLimits

# A Content-Length line in a request head (RFC 9112 §5: field names are case-insensitive;
# h11 also takes bare LF line ends, so this does too).
_CONTENT_LENGTH_LINE = re.compile(rb"\ncontent-length[ \t]*:", re.IGNORECASE)
_END_OF_HEAD = re.compile(rb"\n\r?\n")
_RECV_SIZE = 65536


class Progress(Enum):
    """Where a connection's request stands after its bytes were fed to h11."""

    #: More bytes are needed.
    NEED_DATA = "need data"
    #: The request is complete: :meth:`HttpConnection.take_request` hands it out.
    COMPLETE = "complete"
    #: The peer closed the connection between requests.
    CLOSED = "closed"


@dataclass(frozen=True)
class Refusal:
    """A request the server will not execute: answered with ``status`` and ``message``, then
    the connection is closed."""

    status: int
    message: str


class HttpConnection:
    """One accepted connection. The server's loop thread owns it while it reads; a worker owns
    it while it answers (``busy``). Only the owner closes its socket."""

    __slots__ = (
        "answered",
        "body",
        "busy",
        "deadline",
        "h11",
        "head",
        "limits",
        "method",
        "received",
        "sock",
        "target",
    )

    def __init__(self, sock: socket.socket, limits: ServerLimits, deadline: float) -> None:
        self.sock = sock
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
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

    # --- reading a request -------------------------------------------------------------------
    def receive(self) -> bool:
        """Read what the peer sent (non-blocking) and feed it to h11; False if nothing was
        ready. :class:`OSError` if the connection is lost."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return False
        if data:
            self.received = True
            if self.h11.their_state is h11.IDLE:
                self.head += data[: self.limits.max_head + 4 - len(self.head)]
        self.h11.receive_data(data)  # b"" is the peer's EOF
        return True

    def progress(self) -> Progress | Refusal:
        """Feed h11's events until it needs more bytes, the request is complete, or it is bad."""
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                # A body cut short by EOF lands here too: refused, never executed.
                status = exc.error_status_hint
                if status == HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE:  # h11's own limit
                    message = f"request head larger than {self.limits.max_head} bytes"
                else:
                    message = f"bad request: {exc}"
                return Refusal(status, message)
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return Progress.NEED_DATA
            if isinstance(event, h11.ConnectionClosed):
                return Progress.CLOSED
            if isinstance(event, h11.Request):
                refusal = self._check_head(event)
                if refusal is not None:
                    return refusal
                if self.h11.they_are_waiting_for_100_continue:  # curl waits a second for it
                    go_on = h11.InformationalResponse(
                        status_code=100, headers=[], reason="Continue"
                    )
                    self.send_nowait(self.h11.send(go_on) or b"")
            elif isinstance(event, h11.Data):
                if len(self.body) + len(event.data) > self.limits.max_body:
                    limit = self.limits.max_body
                    return Refusal(413, f"request body larger than {limit} bytes")
                self.body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return Progress.COMPLETE

    def _check_head(self, request: h11.Request) -> Refusal | None:
        """Why a request head is refused before its body is read, or None."""
        self.method = request.method.decode("ascii")
        self.target = request.target.decode("ascii")
        parts = _END_OF_HEAD.split(bytes(self.head), 1)
        self.head.clear()
        max_head, max_body = self.limits.max_head, self.limits.max_body
        if len(parts) == 1:  # the kept bytes hold no end of head: it is over the limit
            return Refusal(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"request head larger than {max_head} bytes",
            )
        head = parts[0]
        names = {name for name, _ in request.headers}
        # h11 refuses conflicting lengths and merges equal ones; a control client never
        # sends two, so any repeat is refused: framing must be unambiguous (RFC 9112 §6.3).
        if len(_CONTENT_LENGTH_LINE.findall(head)) > 1:
            return Refusal(HTTPStatus.BAD_REQUEST, "bad request: duplicate Content-Length headers")
        if b"content-length" in names and b"transfer-encoding" in names:
            return Refusal(
                HTTPStatus.BAD_REQUEST, "bad request: both Content-Length and Transfer-Encoding"
            )
        if self.method not in KNOWN_METHODS:
            return Refusal(HTTPStatus.NOT_IMPLEMENTED, f"method {self.method} is not implemented")
        for name, value in request.headers:
            if name == b"content-length" and int(value) > max_body:
                return Refusal(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"request body larger than {max_body} bytes",
                )
        return None

    def take_request(self) -> tuple[str, str, bytes]:
        """The complete request's (method, target, body); the connection is ``busy`` from now
        until its answer is written."""
        # The head of a pipelined next request may already sit in h11's buffer.
        self.head = bytearray(self.h11.trailing_data[0][: self.limits.max_head + 4])
        self.busy = True
        request = self.method, self.target, bytes(self.body)
        self.body = bytearray()
        return request

    # --- answering ---------------------------------------------------------------------------
    def refuse(self, refusal: Refusal) -> None:
        """Answer a request the server will not execute; the caller then closes."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            response = Response.error(refusal.status, refusal.message)
            try:
                data = self._encode(response, close=True)
            except h11.LocalProtocolError:
                data = b""
            self.send_nowait(data)
        # Read what the peer already sent, so that closing does not turn into a reset that
        # could discard the answer on its side.
        with contextlib.suppress(OSError):
            for _ in range(16):
                if not self.sock.recv(_RECV_SIZE):
                    break

    def send_nowait(self, data: bytes) -> None:
        """Write from the loop without ever blocking it (a short answer to a fresh socket)."""
        with contextlib.suppress(OSError):
            self.sock.send(data, socket.MSG_NOSIGNAL)

    def write(self, response: Response, close: bool) -> None:
        """Send the answer (blocking, up to ``send_timeout``); :class:`OSError` or
        :class:`h11.LocalProtocolError` if it was not delivered."""
        data = self._encode(response, close)
        self.sock.settimeout(self.limits.send_timeout)
        self.sock.sendall(data, socket.MSG_NOSIGNAL)
        self.sock.setblocking(False)

    def next_cycle(self) -> bool:
        """After an answer: ready the connection for another request; False if it may carry
        none (either side asked to close)."""
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self.method = self.target = ""
            self.received = bool(self.head)
            self.answered = True
            self.deadline = time.monotonic() + self.limits.idle_timeout
            return True
        return False

    def _encode(self, response: Response, close: bool) -> bytes:
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
            self.h11.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
            or b""
        )
        if self.method != "HEAD":  # h11 frames a HEAD answer as headers only
            data += self.h11.send(h11.Data(data=response.body)) or b""
        return data + (self.h11.send(h11.EndOfMessage()) or b"")


__all__ = ["HttpConnection", "Progress", "Refusal"]
