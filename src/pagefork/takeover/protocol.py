"""The takeover wire protocol: versioned JSON messages with file descriptors, over a Unix socket.

A frame is an 8-byte header (body length, fd count, both unsigned 32-bit little-endian) sent
with its fds as SCM_RIGHTS, then a UTF-8 JSON object with a ``type``. The two processes may run
different pagefork versions, so the body is JSON, never pickle, and every message is checked
before it is used. A frame carries at most :data:`MAX_FDS_PER_FRAME` fds (the kernel refuses
more than 253 in one message); a message with more fds is followed by ``fds`` frames carrying
the rest, in order.

Messages, new -> old unless marked:

1. ``hello`` {protocol: [major, minor], pid, version, kind}; old answers ``plan`` (what to
   build) or ``refused`` {error} (an unknown major version, or the wrong kind of server).
2. ``ready`` {worker_pids}: the new side has built everything and serves nothing yet.
3. old -> new ``state`` {..., fd_count}: every fork, released by the old side's workers,
   followed by its fds in ``fds`` frames.
4. ``done`` {forks}: the new side serves every fork; the old one exits. ``abort`` {error}
   instead says the new side gave up (the old one then serves on).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from typing import Any

from pagefork.errors import PageforkError

#: The protocol this code speaks. A peer with another major version is refused.
PROTOCOL_VERSION = (1, 0)
#: fds per frame: under the kernel's SCM_MAX_FD (253).
MAX_FDS_PER_FRAME = 250
#: The largest JSON body accepted (a state message for thousands of forks fits).
MAX_BODY = 64 << 20
_HEADER = struct.Struct("<II")


class TakeoverError(PageforkError):
    """A takeover failed; the message says at which step and why."""


class NoPeerError(TakeoverError):
    """Nobody listens where the other side should: there is no process to take over from."""


class TakeoverRefused(TakeoverError):
    """The takeover was called off on purpose: the other side refused or gave up (it lives,
    or stopped cleanly), or this side was asked to stop. Never a sign the other side died."""


class Channel:
    """One end of a takeover connection. Every receive waits at most until ``deadline``, and
    gives up as soon as ``cancel_fd`` (a signal inbox's pipe) is readable."""

    def __init__(self, sock: socket.socket, cancel_fd: int = -1) -> None:
        self.sock = sock
        self.cancel_fd = cancel_fd

    def close(self) -> None:
        """Close the connection (the peer sees EOF)."""
        self.sock.close()

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Send ``message`` and ``fds`` (the caller keeps its own copies), in batches."""
        first, rest = list(fds[:MAX_FDS_PER_FRAME]), list(fds[MAX_FDS_PER_FRAME:])
        self._frame({**message, "fd_count": len(fds)}, first)
        for i in range(0, len(rest), MAX_FDS_PER_FRAME):
            self._frame({"type": "fds"}, rest[i : i + MAX_FDS_PER_FRAME])

    def _frame(self, message: dict[str, Any], fds: Sequence[int]) -> None:
        body = json.dumps(message, separators=(",", ":")).encode()
        header = _HEADER.pack(len(body), len(fds))
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        try:
            sent = self.sock.sendmsg([header], anc)
            if sent < len(header):
                self.sock.sendall(header[sent:])
            self.sock.sendall(body)
        except OSError as exc:
            raise TakeoverError(f"the peer went away ({exc.strerror or exc})") from None

    def recv(self, deadline: float, expect: Sequence[str]) -> tuple[dict[str, Any], list[int]]:
        """The next message (one of the types ``expect``) and all its fds (now the caller's).

        A ``refused`` or ``abort`` message raises :class:`TakeoverError` with the peer's
        reason; so does EOF, a timeout, or a malformed frame.
        """
        message, fds = self._recv_frame(deadline)
        try:
            kind = message.get("type")
            if kind in ("refused", "abort") and kind not in expect:
                raise TakeoverRefused(str(message.get("error", "refused, no reason given")))
            if kind not in expect:
                raise TakeoverError(f"expected {' or '.join(expect)}, got {kind!r}")
            total = message.get("fd_count", 0)
            if not isinstance(total, int) or total < len(fds):
                raise TakeoverError(f"bad fd_count {total!r} in {kind}")
            while len(fds) < total:
                more, got = self._recv_frame(deadline)
                fds += got
                if more.get("type") != "fds" or not got or len(fds) > total:
                    raise TakeoverError(f"{kind}: fd batches do not add up to {total}")
        except BaseException:
            close_all(fds)
            raise
        return message, fds

    def _recv_frame(self, deadline: float) -> tuple[dict[str, Any], list[int]]:
        fds: list[int] = []
        try:
            head = b""
            while len(head) < _HEADER.size:
                self._arm(deadline)
                chunk, anc, flags, _ = self.sock.recvmsg(
                    _HEADER.size - len(head), socket.CMSG_SPACE(MAX_FDS_PER_FRAME * 4)
                )
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                if flags & socket.MSG_CTRUNC:
                    raise TakeoverError("file descriptors were lost in transit (out of fds?)")
                if not chunk:
                    raise TakeoverError("the peer closed the connection")
                head += chunk
            length, nfds = _HEADER.unpack(head)
            if length > MAX_BODY or nfds != len(fds):
                raise TakeoverError(f"malformed frame ({length} bytes, {nfds} fds)")
            body = bytearray()
            while len(body) < length:
                self._arm(deadline)
                chunk = self.sock.recv(min(length - len(body), 1 << 20))
                if not chunk:
                    raise TakeoverError("the peer closed the connection mid-message")
                body += chunk
            try:
                message = json.loads(body)
            except RecursionError:  # the parser recurses per level: refuse, no traceback
                raise TakeoverError("malformed message: JSON nested too deeply") from None
            if not isinstance(message, dict):
                raise TakeoverError("malformed message: not a JSON object")
        except BaseException as exc:
            close_all(fds)
            if isinstance(exc, socket.timeout):
                raise TakeoverError("timed out waiting for the peer") from None
            if isinstance(exc, ValueError):
                raise TakeoverError(f"malformed message: {exc}") from None
            if isinstance(exc, OSError):
                raise TakeoverError(f"the connection failed ({exc.strerror or exc})") from None
            raise
        return message, fds

    def _arm(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TakeoverError("timed out waiting for the peer")
        if self.cancel_fd >= 0:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            poller.register(self.cancel_fd, select.POLLIN)
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if self.cancel_fd in ready:
                raise TakeoverRefused("stopped by a signal")
            left = max(deadline - time.monotonic(), 0.001)
        self.sock.settimeout(left)


def close_all(fds: Sequence[int]) -> None:
    """Close every fd in ``fds`` (ignoring ones already closed)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def check_version(protocol: object) -> str | None:
    """Why a peer speaking ``protocol`` cannot take over, or None if it can."""
    if (
        not isinstance(protocol, list)
        or len(protocol) != 2
        or not all(isinstance(x, int) for x in protocol)
    ):
        return f"malformed protocol version {protocol!r}"
    if protocol[0] != PROTOCOL_VERSION[0]:
        mine = ".".join(map(str, PROTOCOL_VERSION))
        return (
            f"takeover protocol version {protocol[0]}.{protocol[1]} is not supported "
            f"(this process speaks {mine})"
        )
    return None
