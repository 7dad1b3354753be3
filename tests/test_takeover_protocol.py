"""The takeover wire protocol: fd batches, versions, and what a broken peer gets."""

from __future__ import annotations

import array
import os
import resource
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from pagefork.takeover.protocol import (
    MAX_FDS_PER_FRAME,
    PROTOCOL_VERSION,
    Channel,
    TakeoverError,
    check_version,
)


def _pair() -> tuple[Channel, Channel]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(a), Channel(b)


def _frames(sock: socket.socket, count: int) -> list[int]:
    """Read ``count`` raw frames; the fd count of each (its fds closed)."""
    sizes = []
    for _ in range(count):
        head, anc, _, _ = sock.recvmsg(8, socket.CMSG_SPACE(253 * 4))
        length, nfds = struct.unpack("<II", head)
        fds = [fd for _, _, data in anc for fd in array.array("i", data)]
        assert len(fds) == nfds
        for fd in fds:
            os.close(fd)
        sock.recv(length, socket.MSG_WAITALL)
        sizes.append(nfds)
    return sizes


@pytest.fixture
def fd_room() -> Iterator[None]:
    """Room for 2,000 open fds (the soft limit may be 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2000")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2000), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_600_fds_go_in_batches_under_the_kernels_limit_and_arrive_in_order(
    fd_room: None, no_leaks: None
) -> None:
    sender, receiver = _pair()
    files = [os.open(os.devnull if i % 2 else "/", os.O_RDONLY) for i in range(600)]
    try:
        sender.send({"type": "state", "n": 600}, files)
        message, fds = receiver.recv(time.monotonic() + 10, ["state"])
        try:
            assert message["n"] == 600 and message["fd_count"] == 600 and len(fds) == 600
            got = [os.fstat(fd).st_ino for fd in fds]
            assert got == [os.fstat(fd).st_ino for fd in files]
        finally:
            for fd in fds:
                os.close(fd)
        sender.send({"type": "state"}, files)
        assert _frames(receiver.sock, 3) == [MAX_FDS_PER_FRAME, MAX_FDS_PER_FRAME, 100]
    finally:
        for fd in files:
            os.close(fd)
        sender.close()
        receiver.close()


def test_a_peer_gone_mid_batch_is_an_error_and_leaks_no_fd(no_leaks) -> None:
    sender, receiver = _pair()
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(300)]
    try:
        sender._frame({"type": "state", "fd_count": 300}, files[:250])  # the rest never comes
        sender.close()
        with pytest.raises(TakeoverError, match="the peer closed the connection"):
            receiver.recv(time.monotonic() + 10, ["state"])
    finally:
        for fd in files:
            os.close(fd)
        receiver.close()


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (struct.pack("<II", 5, 0) + b"[1,2]", "not a JSON object"),
        (struct.pack("<II", 3, 0) + b"{no", "malformed message"),
        (struct.pack("<II", 1 << 30, 0), "malformed frame"),
        (struct.pack("<II", 2, 3) + b"{}", "malformed frame"),
    ],
)
def test_malformed_frames_are_one_line_errors(raw: bytes, why: str, no_leaks) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(raw)
    receiver = Channel(b)
    with pytest.raises(TakeoverError, match=why):
        receiver.recv(time.monotonic() + 10, ["hello"])
    a.close()
    receiver.close()


def test_a_silent_peer_times_out(no_leaks) -> None:
    sender, receiver = _pair()
    t0 = time.monotonic()
    with pytest.raises(TakeoverError, match="timed out waiting for the peer"):
        receiver.recv(time.monotonic() + 0.2, ["hello"])
    assert time.monotonic() - t0 < 5
    sender.close()
    receiver.close()


def test_a_refusal_carries_the_peers_reason(no_leaks) -> None:
    sender, receiver = _pair()
    sender.send({"type": "refused", "error": "takeover protocol version 9.0 is not supported"})
    with pytest.raises(TakeoverError, match=r"^takeover protocol version 9\.0 is not supported$"):
        receiver.recv(time.monotonic() + 10, ["plan"])
    sender.close()
    receiver.close()


def test_versions() -> None:
    major, minor = PROTOCOL_VERSION
    assert check_version([major, minor + 7]) is None  # a newer minor version is compatible
    assert check_version([major + 1, 0]) == (
        f"takeover protocol version {major + 1}.0 is not supported "
        f"(this process speaks {major}.{minor})"
    )
    assert check_version("1.0") == "malformed protocol version '1.0'"
