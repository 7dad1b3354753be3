"""Handshake parsing (pure) and bad handshakes against a live server (real uffd, real socket)."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import random
import socket

import pytest

from conftest import needs_uffd
from pagefork import uffd
from pagefork.errors import ForkError, HandshakeError
from pagefork.handshake import encode_mappings, parse_mappings, payload_complete
from pagefork.regions import Region

MIB = 1 << 20


def m(base: int, size: int, offset: int, **extra: int) -> dict[str, int]:
    return {"base_host_virt_addr": base, "size": size, "offset": offset, **extra}


@pytest.mark.parametrize("version", ["1.1", "1.7", "1.12"])
def test_each_firecracker_version_round_trips(version: str) -> None:
    regions = [Region(0x7F0000000000, 2 * MIB, 0), Region(0x7F0000400000, MIB, 2 * MIB)]
    payload = encode_mappings(regions, version=version)
    fields = set(json.loads(payload)[0])
    assert ("page_size_kib" in fields) == (version != "1.1")
    assert ("page_size" in fields) == (version == "1.12")
    assert parse_mappings(payload, 3 * MIB) == regions


def test_page_size_kib_holds_bytes_and_unknown_fields_are_ignored() -> None:
    payload = json.dumps([m(0x200000, 4 * MIB, 0, page_size_kib=2 * MIB, future_field=1)])
    (r,) = parse_mappings(payload.encode(), 4 * MIB)
    assert r.page_size == 2 * MIB


def test_mappings_object_form_is_accepted() -> None:
    payload = json.dumps({"mappings": [m(0x1000, 0x2000, 0x1000)]}).encode()
    assert parse_mappings(payload, 0x3000) == [Region(0x1000, 0x2000, 0x1000)]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "no mappings"),
        (b'"hello"', "must be a JSON array"),
        (b"[1]", "mapping 0: expected an object"),
        (
            json.dumps([m(0x1000, 0x1000, 0), {"size": 1}]).encode(),
            "mapping 1: field 'base_host_virt_addr'",
        ),
        (json.dumps([m(0x1001, 0x1000, 0)]).encode(), "base_host_virt_addr 0x1001 is not aligned"),
        (json.dumps([m(0x1000, 0x1800, 0)]).encode(), "size 0x1800 is not aligned"),
        (json.dumps([m(0x1000, 0, 0)]).encode(), "size is 0"),
        (json.dumps([m(0x1000, 0x1000, -4096)]).encode(), "negative"),
        (json.dumps([m(0x1000, 0x1000, True)]).encode(), "must be an integer"),
        (json.dumps([m(0x1000, 0x1000, 0, page_size=3000)]).encode(), "neither 4 KiB nor 2 MiB"),
        (json.dumps([m(0x1000, 0x1000, 0, page_size=2048)]).encode(), "page size 2048 is neither"),
        (json.dumps([m(0, 1 << 30, 0, page_size=1 << 30)]).encode(), "1073741824 is neither"),
        (json.dumps([m(0x1000, 0x10000, 0x8000)]).encode(), "ends past the mem-file"),
        (
            json.dumps([m(0x1000, 0x4000, 0), m(0x3000, 0x1000, 0x4000)]).encode(),
            "mappings 0 and 1 overlap",
        ),
    ],
)
def test_bad_payloads_name_what_is_wrong(payload: bytes, message: str) -> None:
    with pytest.raises(HandshakeError, match=message):
        parse_mappings(payload, 0x10000)


@pytest.mark.parametrize(
    ("data", "complete"),
    [
        (b'[{"size": 4096', False),
        (b'[{"base_host_virt_addr', False),
        (b'[{"a": tr', False),
        (b'["\xc3', False),
        (b"[1]", True),
        (b"[1]x", True),
        (b"nope", True),
        (b"\xff\xfe", True),
    ],
)
def test_payload_complete_waits_for_prefixes_only(data: bytes, complete: bool) -> None:
    assert payload_complete(data) is complete


# --- against a live server -------------------------------------------------------------------


@pytest.fixture
def guest_uffd():
    """A real uffd with one registered region in this process (never touched here)."""
    fd = uffd.open_userfaultfd()
    uffd.uffdio_api(fd)
    mem = mmap.mmap(-1, 2 * MIB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    uffd.uffdio_register(fd, base, 2 * MIB)
    yield fd, base
    os.close(fd)


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


@needs_uffd
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_json", "not JSON"),
        ("misaligned", "not aligned"),
        ("outside", "ends past the mem-file"),
        ("no_fd", "exactly one uffd"),
        ("two_fds", "exactly one uffd"),
        ("pipe_fd", "not a userfaultfd"),
        ("early_close", "peer closed the connection"),
        ("timeout", "timed out"),
    ],
)
def test_bad_handshake_is_refused_and_others_keep_being_served(
    case, message, no_leaks, make_server, vmms, guest_uffd
):
    fd, base = guest_uffd
    server = make_server(handshake_timeout=0.5)
    healthy = vmms(server.register_fork("ok"))
    path = server.register_fork("bad")
    good_payload = encode_mappings([Region(base, 2 * MIB, 0)])
    payloads = {
        "not_json": (b"[{]", [fd]),
        "misaligned": (encode_mappings([Region(base + 1, 2 * MIB, 0)]), [fd]),
        "outside": (encode_mappings([Region(base, 2 * MIB, 12 * MIB)]), [fd]),
        "no_fd": (good_payload, []),
        "two_fds": (good_payload, [fd, fd]),
        "pipe_fd": (good_payload, None),
    }
    conn = _connect(path)
    r, w = os.pipe()
    try:
        if case == "early_close":
            conn.sendall(good_payload[:10])
            conn.close()
        elif case == "timeout":
            conn.sendall(good_payload[:10])
        else:
            data, fds = payloads[case]
            socket.send_fds(conn, [data], fds if fds is not None else [r])
        with pytest.raises(ForkError, match=message):
            server.wait_connected("bad", timeout=3)
        stats = server.stats("bad")
        assert stats.state == "failed" and stats.errors == 1
        assert healthy.send(cmd="touch", all=True)["bad"] == 0
    finally:
        conn.close()
        os.close(r)
        os.close(w)
    healthy.close()
    server.close()


@needs_uffd
def test_handshake_split_over_several_writes_is_assembled(make_server, vmms, guest_uffd):
    fd, base = guest_uffd
    server = make_server()
    path = server.register_fork("a")
    payload = encode_mappings([Region(base, 2 * MIB, 0)])
    conn = _connect(path)
    try:
        socket.send_fds(conn, [payload[:7]], [fd])
        conn.sendall(payload[7:20])
        conn.sendall(payload[20:])
        regions = server.wait_connected("a", timeout=30)
        assert regions == [Region(base, 2 * MIB, 0)]
        assert server.stats("a").pid == os.getpid()
    finally:
        conn.close()
    assert server.wait_ended("a", timeout=30).state == "ended"


@needs_uffd
def test_retry_after_a_failed_handshake_is_accepted(make_server, vmms, guest_uffd):
    fd, _ = guest_uffd
    server = make_server()
    path = server.register_fork("a")
    conn = _connect(path)
    socket.send_fds(conn, [b"nope"], [fd])
    with pytest.raises(ForkError, match="not JSON"):
        server.wait_connected("a", timeout=3)
    conn.close()
    vmm = vmms(path)
    server.wait_connected("a", timeout=30)
    assert vmm.send(cmd="touch", all=True)["bad"] == 0


@needs_uffd
@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"[" * 2000, "nested too deeply"), (b"[" + b"1" * 5000 + b"]", "not JSON|mapping 0")],
    ids=["deep-nesting", "huge-number"],
)
def test_hostile_payloads_fail_the_handshake_cleanly(payload, message, make_server, guest_uffd):
    fd, _ = guest_uffd
    server = make_server()
    path = server.register_fork("a")
    conn = _connect(path)
    try:
        socket.send_fds(conn, [payload], [fd])
        with pytest.raises(ForkError, match=message):
            server.wait_connected("a", timeout=30)
        stats = server.stats("a")
        assert stats.state == "failed" and stats.errors == 1
    finally:
        conn.close()


@needs_uffd
def test_a_second_fd_is_refused_at_once(make_server, guest_uffd):
    fd, _ = guest_uffd
    server = make_server(handshake_timeout=30)
    path = server.register_fork("a")
    conn = _connect(path)
    try:
        socket.send_fds(conn, [b" "], [fd, fd])  # no mappings yet: refused on the fds alone
        with pytest.raises(ForkError, match="exactly one uffd"):
            server.wait_connected("a", timeout=30)
    finally:
        conn.close()


def test_random_payloads_only_ever_raise_handshake_errors() -> None:
    # Mutations of a valid payload: whatever a peer sends is a HandshakeError or valid regions.
    rng = random.Random(7)
    good = encode_mappings(
        [Region(0x7F0000000000, 2 * MIB, 0), Region(0x7F0000400000, MIB, 2 * MIB)]
    )
    for _ in range(3000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(len(data))
            data[pos : pos + rng.randrange(0, 4)] = rng.randbytes(rng.randrange(0, 4))
        try:
            regions = parse_mappings(bytes(data), 3 * MIB)
        except HandshakeError:
            continue
        assert all(r.offset + r.size <= 3 * MIB for r in regions)


def test_only_a_payload_with_page_size_everywhere_comes_from_a_vmm_that_keeps_its_socket() -> None:
    from pagefork.handshake import keeps_socket_open

    regions = [Region(0x10000000, 2 * MIB, 0), Region(0x20000000, 2 * MIB, 2 * MIB)]
    assert keeps_socket_open(encode_mappings(regions, version="1.12"))
    assert not keeps_socket_open(encode_mappings(regions, version="1.10"))
    assert not keeps_socket_open(encode_mappings(regions, version="1.6"))
    assert keeps_socket_open(b'{"mappings": [{"page_size": 4096}]}')
    assert not keeps_socket_open(b"[]")
