"""Object-storage templates against a hostile store, a hostile peer on the same host and a
careless operator: layers, a cold chunk's block first, and the host cache. Each test drives
the real ``moto_server`` (through the fault-injecting proxy where the store misbehaves)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from procs import proxy_fixture, s3_env_fixture, s3_server_fixture  # noqa: F401

from conftest import needs_uffd
from pagefork.store.cache import ChunkCache
from pagefork.store.client import make_client
from pagefork.store.layout import parse_s3_url
from pagefork.store.lazy import LazyTemplate
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3Proxy

MIB = 1 << 20
CHUNK = MIB
BLOCK = 64 << 10
PAGE = 4096


@pytest.fixture
def pushed(s3_bucket: str, s3_endpoint: str, mem_file: Path) -> str:
    """The test's mem-file pushed with per-block digests (64 KiB blocks, 1 MiB chunks)."""
    url = f"s3://{s3_bucket}/tmpl"
    push(parse_s3_url(url), str(mem_file), make_client(s3_endpoint), chunk_size=CHUNK)
    return url


def _returns(call, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    """``call()``'s result, run on a thread: a call that never returns fails the test."""
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(call()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call never returned (deadlock)"
    return out[0]


# --- a cold chunk's block first ---------------------------------------------------------------


def test_a_block_asked_for_after_its_chunk_arrived_is_answered_at_once(
    pushed: str, proxy: S3Proxy, tmp_path: Path
) -> None:
    # A worker parks a fault, and its chunk arrives (another fault's fetch) before the
    # supervisor reads the worker's request: the late request must be answered, not hang
    # the supervisor.
    lazy = LazyTemplate(pushed, ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url)
    try:
        lazy.ensure([3], 30)
        fut = _returns(lambda: lazy.request_page(3, 3 * CHUNK + 5 * BLOCK))
        assert fut.result(5) == 0 and lazy.block_gets == 0
    finally:
        lazy.close()


def test_a_block_asked_for_after_the_template_closed_fails_at_once(
    pushed: str, proxy: S3Proxy, tmp_path: Path
) -> None:
    lazy = LazyTemplate(pushed, ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url)
    lazy.close()
    fut = _returns(lambda: lazy.request_page(3, 3 * CHUNK + 5 * BLOCK))
    with pytest.raises(Exception, match="template closed"):
        fut.result(5)


# --- the host cache ---------------------------------------------------------------------------

_WRITER = """
import os, sys
from pagefork.store import cache as cache_mod
from pagefork.store.cache import ChunkCache

def stuck(fd):  # the chunk is written, not yet synced: the writer is killed here
    print("writing", flush=True)
    sys.stdin.read()

cache_mod.os.fsync = stuck
data = bytes(range(256)) * 4096
ChunkCache(sys.argv[1]).put(cache_mod.hashlib.sha256(data).hexdigest(), data)
"""


def test_a_writer_killed_mid_write_leaves_no_temporary_behind(tmp_path: Path) -> None:
    import subprocess
    import sys

    d = tmp_path / "c"
    ChunkCache(str(d)).close()
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(d)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        temps = [p for p in d.iterdir() if p.name.startswith(".tmp-")]
        assert len(temps) == 1 and temps[0].stat().st_size == 1 << 20
        # A live writer's temporary is left alone.
        cache = ChunkCache(str(d), max_bytes=4 << 20)
        assert temps[0].exists()
        writer.kill()
        writer.wait(10)
        # Once its writer is gone, the next cache to rescan removes it...
        cache.evict()
        assert not temps[0].exists()
        cache.close()
    finally:
        writer.kill()
        writer.wait(10)
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.close()
        writer.stdout.close()
    # ...and so does one opening the directory.
    stale = d / ".tmp-999999999-1-0123abcd"
    stale.write_bytes(b"x" * 100)
    ChunkCache(str(d)).close()
    assert not stale.exists()
    # Anything else there is not the cache's to remove.
    other = d / "notes.txt"
    other.write_text("mine")
    ChunkCache(str(d)).evict()
    assert other.exists()


def _ignoring_ranges(endpoint: str):  # type: ignore[no-untyped-def]
    """A client whose store ignores byte ranges: every GET is answered with the whole object
    (the Range header is dropped before it is sent, so the real server answers 200)."""
    client = make_client(endpoint)

    def drop_range(request, **_kw):  # type: ignore[no-untyped-def]
        if "Range" in request.headers:
            del request.headers["Range"]

    client.meta.events.register("before-sign.s3.GetObject", drop_range)
    return client


def test_a_store_that_ignores_byte_ranges_still_serves_a_cold_fault(
    pushed: str, s3_endpoint: str, tmp_path: Path, mem_file: Path
) -> None:
    client = _ignoring_ranges(s3_endpoint)
    lazy = LazyTemplate(pushed, ChunkCache(str(tmp_path / "c")), client=client, warm=False)
    try:
        at = 6 * CHUNK + 3 * BLOCK + 5 * PAGE
        lazy.request_page(6, at).result(30)
        # Its block could not be had alone: the whole chunk, verified, served the page.
        assert lazy.present(6)
        assert os.pread(lazy.fd, CHUNK, 6 * CHUNK) == mem_file.read_bytes()[6 * CHUNK : 7 * CHUNK]
    finally:
        lazy.close()
        client.close()


# --- a hostile manifest -----------------------------------------------------------------------


@pytest.mark.parametrize("field", ["hot_pack", "block_digests"])
def test_an_index_that_inflates_like_a_zlib_bomb_is_refused_before_it_is_held(field: str) -> None:
    import base64
    import json
    import tracemalloc
    import zlib

    from pagefork.errors import StoreError
    from pagefork.store.layout import FORMAT, parse_manifest

    size, chunk = 4 << 30, 64 << 20  # a million pages: 40 MiB of index entries would fit
    npages = size // PAGE
    bomb = base64.b64encode(zlib.compress(bytes(npages * 40), 9)).decode()
    doc: dict[str, object] = {
        "format": FORMAT,
        "version": 2,
        "size": size,
        "page_size": PAGE,
        "chunk_size": chunk,
        "chunks_prefix": "chunks/",
        "chunks": ["a" * 64] * (size // chunk),
        "zero_pages": base64.b64encode(zlib.compress(bytes(npages), 9)).decode(),
    }
    if field == "hot_pack":
        doc["hot_pack"] = {"key": "k", "sha256": "b" * 64, "size": npages * PAGE, "index": bomb}
    else:
        doc.update(block_size=PAGE, block_digests=bomb)
    text = json.dumps(doc).encode()
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match=f"manifest m: {field}.* does not decode .*inflates"):
            parse_manifest(text, "m")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes held for a {len(text)}-byte manifest"


def test_eviction_never_removes_an_entry_that_is_not_the_caches_own(tmp_path: Path) -> None:
    import os as _os

    from pagefork.store.layout import sha256

    d = tmp_path / "c"
    cache = ChunkCache(str(d), max_bytes=1 << 20)
    foreign = d / ("f" * 64)
    foreign.write_bytes(b"x" * (600 << 10))
    _os.chown(foreign, 12345, 12345)  # another user's file (only root could put it there)
    sub = d / ("e" * 64)
    sub.mkdir()  # a directory under a chunk's name: not ours either
    data = [_os.urandom(300 << 10) for _ in range(4)]
    for chunk in data:  # 1.2 MiB of our own: over the bound, so the oldest go
        cache.put(sha256(chunk), chunk)
    cache.evict()
    assert foreign.exists() and foreign.stat().st_uid == 12345 and sub.is_dir()
    ours = [p for p in d.iterdir() if p.name not in (foreign.name, sub.name)]
    assert 0 < len(ours) < 4 and cache.used_bytes <= 1 << 20
    assert cache.get(sha256(data[-1])) == data[-1]  # the newest stayed
    cache.close()


@needs_uffd
def test_a_vmm_killed_while_its_fault_waits_on_a_block_leaves_the_block_for_others(
    pushed: str,
    vmms,
    proxy: S3Proxy,
    tmp_path: Path,
    mem_file: Path,  # type: ignore[no-untyped-def]
) -> None:
    import json as _json
    import time

    from pagefork.server import PageServer, ServerConfig
    from pagefork.store.lazy import StoreOptions

    store = StoreOptions(
        cache=ChunkCache(str(tmp_path / "cache")), endpoint_url=proxy.url, fetch_deadline=20
    )
    server = PageServer(
        ServerConfig(mem_file_path=pushed, socket_dir=str(tmp_path), store=store, workers=1)
    )
    first = (7 * CHUNK + 2 * BLOCK) // PAGE
    pages = [[0, p * PAGE] for p in range(first, first + BLOCK // PAGE) if p % 4]
    try:
        proxy.hang("/chunks/")  # the block's GET stays unanswered: the fault stays parked
        doomed = vmms(server.register_fork("doomed"))
        assert doomed.proc.stdin is not None
        doomed.proc.stdin.write(_json.dumps({"cmd": "touch", "pages": pages}) + "\n")
        doomed.proc.stdin.flush()
        end = time.monotonic() + 20
        while not any("/chunks/" in k for k in proxy.gets) and time.monotonic() < end:
            time.sleep(0.01)  # until the store has the block's GET (its fault is parked)
        assert any("/chunks/" in k for k in proxy.gets)
        doomed.kill()
        assert server.wait_ended("doomed", timeout=20).state in ("ended", "failed")
        proxy.hang(None)
        # Another fork faults on the same block: every byte right, the block fetched once.
        other = vmms(server.register_fork("other"))
        assert other.send(cmd="touch", pages=pages)["bad"] == 0
        assert server.stats("other").errors == 0
    finally:
        proxy.hang(None)
        server.close()


def test_a_fifo_or_directory_under_a_chunks_name_is_a_miss_never_waited_on(
    tmp_path: Path,
) -> None:
    from pagefork.store.layout import sha256

    d = tmp_path / "c"
    cache = ChunkCache(str(d))
    a, b = b"a" * PAGE, b"b" * PAGE
    os.mkfifo(d / sha256(a), 0o400)  # opening it for reading would wait for a writer
    (d / sha256(b)).mkdir()
    assert _returns(lambda: cache.get(sha256(a), PAGE), 10) is None
    assert cache.get(sha256(b), PAGE) is None
    cache.put(sha256(a), a)  # never renamed over: they are not the cache's
    cache.put(sha256(b), b)
    assert (d / sha256(a)).is_fifo() and (d / sha256(b)).is_dir()
    assert cache.misses == 2 and cache.hits == 0
    cache.close()
