"""The supervisor-worker channel: framed messages with file descriptors, over a socketpair.

Both ends are our own processes, created together by :func:`channel_pair`. What a frame
carries is one typed message of :mod:`pagefork.serving.messages`, encoded there. Each frame
is a fixed header (body length, fd count) sent with its fds as SCM_RIGHTS, then the body.
Receiving is blocking: a frame is written whole by its sender, so a reader that saw the
channel readable gets the rest at memory speed.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from collections.abc import Sequence

from pagefork.serving.messages import Message, decode, encode

_HEADER = struct.Struct("=IH2x")
#: fds per frame; a fork is handed over with four (uffd, connection, pidfd, ledger).
MAX_FDS = 16


class ChannelClosed(Exception):
    """The other end closed the channel (its process exited)."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of stream sockets (close-on-exec; pass one end to the child)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


def send(sock: socket.socket, message: Message, fds: Sequence[int] = ()) -> None:
    """Send one message with ``fds`` (the caller keeps its own copies of them)."""
    body = encode(message)
    header = _HEADER.pack(len(body), len(fds))
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([header, body], anc)
    if sent < len(header) + len(body):
        sock.sendall(memoryview(header + body)[sent:])


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ChannelClosed("channel closed mid-message")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def recv(sock: socket.socket) -> tuple[Message, list[int]]:
    """Receive one message and the fds that came with it (now owned by the caller)."""
    fds: list[int] = []
    data = b""
    while len(data) < _HEADER.size:
        chunk, anc, _flags, _ = sock.recvmsg(
            _HEADER.size - len(data), socket.CMSG_SPACE(MAX_FDS * 4)
        )
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
        if not chunk:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("channel closed")
        data += chunk
    length, nfds = _HEADER.unpack(data)
    try:
        message = decode(_recv_exact(sock, length))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if len(fds) != nfds:
        for fd in fds:
            os.close(fd)
        raise ChannelClosed(f"expected {nfds} fds with the message, got {len(fds)}")
    return message, fds
