"""Serving forks from a template in S3-compatible storage (a real moto server over HTTP), with
real uffd faults from test VMM processes that check every byte against the template."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
import time
import zlib
from pathlib import Path

import pytest
from procs import proxy_fixture, s3_env_fixture, s3_server_fixture  # noqa: F401
from test_hugepages import hugepages  # noqa: F401  (the fixture)

from conftest import PAGE, make_mem_file, needs_uffd
from pagefork.errors import PrefetchError
from pagefork.hotpages import HotPage, HotPageList
from pagefork.server import PageServer, ServerConfig
from pagefork.store.cache import ChunkCache
from pagefork.store.client import get_bytes, make_client, put_bytes
from pagefork.store.layout import parse_s3_url
from pagefork.store.lazy import StoreOptions
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3Proxy
from pagefork.testing.vmm import VmmProcess

pytestmark = needs_uffd

MIB = 1 << 20
CHUNK = 1 * MIB  # 12 chunks in the 12 MiB test template


@pytest.fixture
def pushed(s3_bucket: str, s3_endpoint: str, mem_file: Path) -> str:
    """The test's mem-file pushed to the test's bucket, without per-block digests (so a fault
    waits for its whole chunk: the path these tests count GETs of; the block path has tests
    of its own); its URL."""
    url = f"s3://{s3_bucket}/tmpl"
    client = make_client(s3_endpoint)
    push(parse_s3_url(url), str(mem_file), client, chunk_size=CHUNK, block_size=0)
    return url


def chunk_gets(proxy: S3Proxy) -> dict[str, int]:
    return {k: n for k, n in proxy.gets.items() if "/chunks/" in k}


def test_every_page_of_a_lazy_template_matches(pushed, s3_server, vmms, proxy):
    server = s3_server(pushed)
    vmm = vmms(server.register_fork("a"))
    reply = vmm.send(cmd="touch", all=True)
    assert reply["touched"] == 3072 and reply["bad"] == 0, reply["mismatches"]
    stats = server.stats("a")
    assert stats.faults == 3072 and stats.errors == 0
    assert stats.zero_pages == 3072 // 4  # from the manifest's zero map: never fetched
    # Each of the 12 chunks was fetched exactly once.
    gets = chunk_gets(proxy)
    assert len(gets) == 12 and set(gets.values()) == {1}


def chunk_key(url: str, index: int) -> str:
    """The object key of chunk ``index`` of the template at ``url``."""
    from pagefork.store.client import get_bytes
    from pagefork.store.layout import parse_manifest

    u = parse_s3_url(url)
    client = make_client()
    manifest = parse_manifest(get_bytes(client, u.bucket, u.key("manifest.json")), url)
    return manifest.chunk_key(index)


def pages_in_chunk(index: int, count: int = 8) -> list[list[int]]:
    """``count`` non-zero pages (region 0) of chunk ``index`` (every 4th page is zero)."""
    first = index * CHUNK // PAGE
    return [[0, (first + i) * PAGE] for i in range(count * 2) if (first + i) % 4][:count]


def test_forks_faulting_one_chunk_at_once_cause_one_get(pushed, s3_server, vmms, proxy):
    proxy.delay = 0.05  # a distant store: every fork's first fault waits on the same GET
    server = s3_server(pushed)
    forks = [vmms(server.register_fork(f"f{i}")) for i in range(4)]
    for i in range(4):
        server.wait_connected(f"f{i}")
    replies: list[dict] = []
    threads = [
        threading.Thread(target=lambda v=v: replies.append(v.send(cmd="touch", all=True)))
        for v in forks
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 4 and all(r["bad"] == 0 for r in replies)
    gets = chunk_gets(proxy)
    assert len(gets) == 12 and set(gets.values()) == {1}, gets  # coalesced: 1 GET per chunk
    assert sum(server.stats(f"f{i}").faults for i in range(4)) == 4 * 3072


def test_corrupt_chunk_fails_only_the_forks_that_need_it(
    pushed, s3_server, vmms, proxy, s3_bucket, tmp_path
):
    # Another template, served by another server, on the same store and host cache.
    other_mem = make_mem_file(tmp_path / "other", 3072, seed=9)
    other_url = f"s3://{s3_bucket}/other"
    push(parse_s3_url(other_url), str(other_mem), make_client(), chunk_size=CHUNK)
    key = chunk_key(pushed, 3)
    put_bytes(make_client(), s3_bucket, key, b"\x01" * CHUNK)  # same size, wrong content

    server = s3_server(pushed)
    other = s3_server(other_url)
    bad = vmms(server.register_fork("bad"))
    good = vmms(server.register_fork("good"))
    from pagefork.testing.vmm import VmmProcess

    elsewhere = VmmProcess(other.register_fork("elsewhere"), str(other_mem), ("8M", "4M"))
    try:
        with pytest.raises(EOFError):  # SIGKILLed: its guest would hang on that chunk
            bad.send(cmd="touch", pages=pages_in_chunk(3))
        ended = server.wait_ended("bad", timeout=10)
        assert ended.state == "failed" and ended.errors == 1
        assert ended.error is not None and "chunk 3 of" in ended.error
        assert "does not match its SHA-256" in ended.error and "\n" not in ended.error
        assert bad.proc.wait(10) == -9
        # The other fork of this template goes on, on every other chunk...
        reply = good.send(cmd="touch", pages=pages_in_chunk(2) + pages_in_chunk(4))
        assert reply["bad"] == 0
        # ...and so does a fork of another template.
        assert elsewhere.send(cmd="touch", all=True)["bad"] == 0
        assert server.stats("good").errors == 0
        assert proxy.get_count(key) == 2  # fetched again once, then refused
    finally:
        elsewhere.kill()


def test_transient_errors_are_retried(pushed, s3_server, vmms, proxy):
    proxy.fail_next(3, status=503, key_contains="/chunks/")
    server = s3_server(pushed)
    vmm = vmms(server.register_fork("a"))
    assert vmm.send(cmd="touch", all=True)["bad"] == 0
    assert server.stats("a").errors == 0
    gets = chunk_gets(proxy)
    assert sum(gets.values()) == 12 + 3  # the 3 answered 503 were tried again


def test_cache_is_reused_after_restart_and_a_corrupt_entry_fetched_again(
    pushed, s3_server, vmms, proxy, tmp_path
):
    cache_dir = tmp_path / "shared-cache"
    first = s3_server(pushed, cache_dir=cache_dir)
    vmm = vmms(first.register_fork("a"))
    assert vmm.send(cmd="touch", all=True)["bad"] == 0
    vmm.close()
    first.close()
    assert sum(chunk_gets(proxy).values()) == 12
    entries = sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))
    assert len(entries) == 12
    victim = entries[5]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.chmod(0o600)  # an entry made writable is hashed again before it is served
    victim.write_bytes(bytes(data))

    second = s3_server(pushed, cache_dir=cache_dir)
    vmm2 = vmms(second.register_fork("b"))
    assert vmm2.send(cmd="touch", all=True)["bad"] == 0
    gets = chunk_gets(proxy)
    assert sum(gets.values()) == 13  # only the corrupt entry was fetched again
    assert gets[f"/{parse_s3_url(pushed).bucket}/chunks/{victim.name}"] == 2
    assert second.memfile.cache.corrupt == 1  # type: ignore[union-attr]


def test_prefetch_fetches_the_hot_chunks_first(pushed, s3_server, vmms, proxy):
    server = s3_server(pushed)
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    hot = pages_in_chunk(2) + pages_in_chunk(7)
    result = server.prefetch("a", HotPageList.from_pages([tuple(p) for p in hot]))
    assert result.installed == len(hot)
    assert result.fetched_bytes == 2 * CHUNK and result.fetch_seconds > 0
    assert len(chunk_gets(proxy)) == 2
    reply = vmm.send(cmd="touch", pages=hot)
    assert reply["bad"] == 0
    assert server.stats("a").faults == 0  # all installed before the guest touched them


def test_prefetch_of_a_corrupt_chunk_installs_nothing(pushed, s3_server, vmms, s3_bucket):
    put_bytes(make_client(), s3_bucket, chunk_key(pushed, 2), b"\x00" * 10)
    server = s3_server(pushed)
    vmms(server.register_fork("a"))
    server.wait_connected("a")
    hot = pages_in_chunk(1) + pages_in_chunk(2)
    with pytest.raises(PrefetchError, match=r"fork a: chunk 2 of s3://.*SHA-256"):
        server.prefetch("a", HotPageList.from_pages([tuple(p) for p in hot]))
    assert server.stats("a").prefetched_pages == 0


def test_a_lazy_server_leaves_no_fd_or_thread_behind(no_leaks, pushed, s3_endpoint, vmms, tmp_path):
    config = ServerConfig(
        mem_file_path=pushed,
        socket_dir=str(tmp_path),
        workers=1,
        store=StoreOptions(cache=ChunkCache(str(tmp_path / "c")), endpoint_url=s3_endpoint),
    )
    with PageServer(config) as server:
        vmm = vmms(server.register_fork("a"))
        assert vmm.send(cmd="touch", pages=pages_in_chunk(0) + pages_in_chunk(7))["bad"] == 0
        vmm.close()
        server.wait_ended("a")


@pytest.mark.usefixtures("hugepages")
def test_huge_pages_spanning_many_chunks(s3_bucket, s3_endpoint, tmp_path, proxy):
    huge = 2 << 20
    mem = make_mem_file(tmp_path / "hmem", 2560)  # 10 MiB, then one all-zero 2 MiB page
    with open(mem, "ab") as f:
        f.write(bytes(huge))
    url = f"s3://{s3_bucket}/huge"
    push(parse_s3_url(url), str(mem), make_client(), chunk_size=64 << 10)  # 32 per huge page
    config = ServerConfig(
        mem_file_path=url,
        socket_dir=str(tmp_path),
        workers=1,
        store=StoreOptions(cache=ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url),
    )
    with PageServer(config) as server:
        path = server.register_fork("huge")
        vmm = VmmProcess(path, str(mem), ("8M", "4M"), "--hugetlb", "--page-size", str(huge))
        try:
            server.wait_connected("huge")
            reply = vmm.send(cmd="touch", all=True, order="random")
            assert reply["touched"] == 6 and reply["bad"] == 0, reply
            stats = server.stats("huge")
            assert (stats.faults, stats.pages_copied, stats.zero_pages, stats.errors) == (
                6,
                5,
                1,
                0,
            )
            assert len(chunk_gets(proxy)) == 160  # every data chunk of the 5 pages, once
            path2 = server.register_fork("huge2")
            vmm2 = VmmProcess(path2, str(mem), ("8M", "4M"), "--hugetlb", "--page-size", str(huge))
            try:
                result = server.prefetch("huge2", [HotPage(0, huge), HotPage(1, 0)])
                assert result.installed == 2 and result.fetched_bytes == 0  # in the view
                assert vmm2.send(cmd="touch", all=True)["bad"] == 0
            finally:
                vmm2.kill()
        finally:
            vmm.kill()


def test_a_worker_that_dies_with_parked_faults_loses_none(pushed, s3_server, vmms, proxy):
    restarted = threading.Event()
    server = s3_server(pushed, workers=1, on_worker_restarted=lambda *_: restarted.set())
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    # The worker dies right after it parked the first fault and asked for its chunk: the
    # fetch completes meanwhile; the replacement wakes the vCPU, which faults again.
    old = server._debug_crash_worker_at("a", "parked")
    reply = vmm.send(cmd="touch", all=True)
    assert reply["touched"] == 3072 and reply["bad"] == 0, reply["mismatches"]
    assert restarted.wait(10) and old not in server.worker_pids()
    stats = server.stats("a")
    assert stats.errors == 0 and stats.faults == 3072
    assert set(chunk_gets(proxy).values()) == {1}  # the chunk asked for by the dead worker too


def test_a_cache_entry_that_is_not_a_regular_file_is_a_miss_left_alone(
    pushed, s3_server, vmms, proxy, tmp_path
):
    """A FIFO, a directory or a symlink under a chunk's name is not the cache's: the chunk
    comes from the store, the entry stays as it was, and nothing blocks (close included)."""
    cache = tmp_path / "odd-cache"
    cache.mkdir()
    names = [chunk_key(pushed, i).rsplit("/", 1)[1] for i in (1, 2, 3)]
    os.mkfifo(cache / names[0])
    (cache / names[1]).mkdir()
    (tmp_path / "elsewhere").write_bytes(b"not a chunk")
    (cache / names[2]).symlink_to(tmp_path / "elsewhere")
    server = s3_server(pushed, cache_dir=cache)
    vmm = vmms(server.register_fork("a"))
    pages = pages_in_chunk(1) + pages_in_chunk(2) + pages_in_chunk(3)
    assert vmm.send(cmd="touch", pages=pages)["bad"] == 0
    assert server.stats("a").errors == 0
    assert sum(chunk_gets(proxy).values()) == 3  # each served from the store
    vmm.close()
    server.close()  # returns: no fetch thread is stuck opening the FIFO
    assert stat.S_ISFIFO(os.lstat(cache / names[0]).st_mode)
    assert (cache / names[1]).is_dir() and (cache / names[2]).is_symlink()
    assert (tmp_path / "elsewhere").read_bytes() == b"not a chunk"


def test_a_hung_store_fails_the_fault_within_the_deadline(pushed, vmms, proxy, tmp_path):
    """A store that accepts a chunk's GET and never answers fails the fork when the chunk's
    deadline passes (2 s here), naming the chunk; the server closes at once after."""
    key = chunk_key(pushed, 1)
    options = StoreOptions(
        cache=ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url, fetch_deadline=2.0
    )
    config = ServerConfig(mem_file_path=pushed, socket_dir=str(tmp_path), store=options)
    with PageServer(config) as server:
        proxy.hang(key)
        vmm = vmms(server.register_fork("a"))
        started = time.monotonic()
        with pytest.raises(EOFError):
            vmm.send(cmd="touch", pages=pages_in_chunk(1))
        ended = server.wait_ended("a", timeout=30)
        assert time.monotonic() - started < 15  # 2 s deadline; a read may end at most once late
        assert ended.state == "failed" and ended.error is not None
        assert "chunk 1 of" in ended.error and "\n" not in ended.error


def test_a_503_storm_does_not_use_up_the_retries(pushed, proxy, monkeypatch):
    """After more 503s than botocore's retry quota allows (100 retries), a chunk answered 503
    once is still retried: the retries are ours, bounded by time, not by earlier failures."""
    from pagefork.store import client as s3

    monkeypatch.setattr(s3, "_BACKOFF", 0.001)  # the count matters here, not the pauses
    key = "storm/object"  # small: the count matters, not the bytes
    bucket = parse_s3_url(pushed).bucket
    put_bytes(make_client(), bucket, key, b"x" * 100)
    client = make_client(proxy.url)
    for _ in range(120):
        proxy.fail_next(1, status=503, key_contains=key)
        assert s3.get_bytes(client, bucket, key) == b"x" * 100
    assert proxy.get_count(key) == 240  # every 503 was tried again, the last ones too


def test_a_manifest_that_marks_a_data_page_zero_fails_the_chunk(pushed, s3_server, vmms, s3_bucket):
    """A chunk that verifies against its SHA-256 but holds data where the manifest's zero map
    says zero fails (named), and nothing of it is served."""
    u = parse_s3_url(pushed)
    client = make_client()
    doc = json.loads(get_bytes(client, u.bucket, u.key("manifest.json")))
    zeros = bytearray(zlib.decompress(base64.b64decode(doc["zero_pages"])))
    data_page = CHUNK // PAGE * 2 + 1  # a data page of chunk 2
    assert zeros[data_page] == 0
    zeros[data_page] = 1
    doc["zero_pages"] = base64.b64encode(zlib.compress(bytes(zeros))).decode()
    put_bytes(client, u.bucket, u.key("manifest.json"), json.dumps(doc).encode())
    server = s3_server(pushed)
    vmm = vmms(server.register_fork("a"))
    with pytest.raises(EOFError):
        vmm.send(cmd="touch", pages=[[0, (data_page + 1) * PAGE]])  # same chunk, real data
    ended = server.wait_ended("a", timeout=10)
    assert ended.error is not None and "\n" not in ended.error
    assert f"chunk 2 of {pushed}" in ended.error
    assert f"marks page {data_page} zero" in ended.error


def test_a_chunk_gone_from_the_bucket_or_corrupt_says_what_to_do(
    pushed, s3_server, vmms, s3_bucket
):
    client = make_client()
    client.delete_object(Bucket=s3_bucket, Key=chunk_key(pushed, 1))
    put_bytes(client, s3_bucket, chunk_key(pushed, 2), b"\x01" * CHUNK)
    server = s3_server(pushed)
    for fork, chunk, why in (
        ("gone", 1, "is gone from the bucket (deleted after the push): push the template again"),
        ("bad", 2, f"repair it with 'pagefork push --verify {pushed} --mem-file MEM'"),
    ):
        vmm = vmms(server.register_fork(fork))
        with pytest.raises(EOFError):
            vmm.send(cmd="touch", pages=pages_in_chunk(chunk))
        ended = server.wait_ended(fork, timeout=30)
        assert ended.error is not None and "\n" not in ended.error
        assert f"chunk {chunk} of {pushed}" in ended.error and why in ended.error


def test_a_trickling_chunk_fails_its_fault_at_the_deadline(pushed, vmms, proxy, tmp_path):
    """A store that sends a chunk's body a byte at a time never lets a single read time out;
    the chunk's deadline (2 s here) still bounds the whole GET, and the fork fails, named."""
    key = chunk_key(pushed, 1)
    options = StoreOptions(
        cache=ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url, fetch_deadline=2.0
    )
    config = ServerConfig(mem_file_path=pushed, socket_dir=str(tmp_path), store=options)
    with PageServer(config) as server:
        proxy.trickle(key, 0.2)
        vmm = vmms(server.register_fork("a"))
        started = time.monotonic()
        with pytest.raises(EOFError):
            vmm.send(cmd="touch", pages=pages_in_chunk(1))
        ended = server.wait_ended("a", timeout=30)
        assert time.monotonic() - started < 15  # the deadline is 2 s; a megabyte takes 2.4 days
        assert ended.state == "failed" and ended.error is not None and "\n" not in ended.error
        assert "chunk 1 of" in ended.error and "not read within its deadline" in ended.error


def test_trickling_headers_fail_the_fault_at_the_deadline(pushed, vmms, proxy, tmp_path):
    """A store that sends a chunk's status line and headers a byte at a time (one a second:
    minutes for the lot) never lets a read time out, and the client library is still reading
    the headers; the chunk's deadline (2 s here) bounds that part of the GET too."""
    key = chunk_key(pushed, 1)
    options = StoreOptions(
        cache=ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url, fetch_deadline=2.0
    )
    config = ServerConfig(mem_file_path=pushed, socket_dir=str(tmp_path), store=options)
    with PageServer(config) as server:
        proxy.trickle(key, 1.0, headers=True)
        vmm = vmms(server.register_fork("a"))
        started = time.monotonic()
        with pytest.raises(EOFError):
            vmm.send(cmd="touch", pages=pages_in_chunk(1))
        ended = server.wait_ended("a", timeout=120)
        # The deadline is 2 s; the headers alone take minutes at this pace.
        assert time.monotonic() - started < 20
        assert ended.state == "failed" and ended.error is not None and "\n" not in ended.error
        assert "chunk 1 of" in ended.error and "not read within its deadline" in ended.error


def test_a_store_that_refuses_connections_for_a_while_is_waited_out(pushed, s3_server, vmms, proxy):
    """A store that restarts (every connection dropped, new ones refused for 1.5 s) costs a
    fault time, not its fork: the fetch backs off and retries until the store is back."""
    server = s3_server(pushed)
    vmm = vmms(server.register_fork("a"))
    assert vmm.send(cmd="touch", pages=pages_in_chunk(0))["bad"] == 0  # a pooled connection
    key = chunk_key(pushed, 1)
    refused_at = time.monotonic()  # before: the proxy listens again 1.5 s after this at least
    proxy.refuse_for(1.5)
    reply = vmm.send(cmd="touch", pages=pages_in_chunk(1))
    assert reply["bad"] == 0 and reply["touched"] == 8
    # Served only once the store was back: the chunk came from the one GET that got through.
    assert proxy.listening.is_set() and time.monotonic() - refused_at >= 1.5
    assert proxy.get_count(key) == 1
    stats = server.stats("a")
    assert stats.errors == 0 and stats.state == "serving"


def test_a_transfer_corrupted_once_is_fetched_again(pushed, s3_server, vmms, proxy):
    """One bit flipped on the way (the object in the store is intact): the chunk is fetched
    again and served; nothing corrupt reaches the guest and the fork goes on."""
    key = chunk_key(pushed, 2)
    proxy.flip_bits(key, gets=1)
    server = s3_server(pushed)
    vmm = vmms(server.register_fork("a"))
    reply = vmm.send(cmd="touch", pages=pages_in_chunk(2))
    assert reply["bad"] == 0 and reply["touched"] == 8
    assert proxy.get_count(key) == 2
    assert server.stats("a").errors == 0


def test_a_chunk_corrupted_on_every_transfer_fails_with_the_repair_hint(
    pushed, s3_server, vmms, proxy
):
    key = chunk_key(pushed, 2)
    proxy.flip_bits(key, gets=2)
    server = s3_server(pushed)
    vmm = vmms(server.register_fork("a"))
    with pytest.raises(EOFError):
        vmm.send(cmd="touch", pages=pages_in_chunk(2))
    ended = server.wait_ended("a", timeout=30)
    assert ended.error is not None and "\n" not in ended.error
    assert f"chunk 2 of {pushed}" in ended.error and "does not match its SHA-256" in ended.error
    assert f"repair it with 'pagefork push --verify {pushed} --mem-file MEM'" in ended.error
    assert proxy.get_count(key) == 2  # fetched again once, then refused


def test_a_store_that_stays_away_past_the_deadline_fails_the_fork_naming_the_chunk(
    pushed, vmms, proxy, tmp_path
):
    options = StoreOptions(
        cache=ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url, fetch_deadline=1.5
    )
    config = ServerConfig(mem_file_path=pushed, socket_dir=str(tmp_path), store=options)
    with PageServer(config) as server:
        vmm = vmms(server.register_fork("a"))
        server.wait_connected("a")
        proxy.refuse_for(600)  # gone for good, as far as this test goes
        with pytest.raises(EOFError):
            vmm.send(cmd="touch", pages=pages_in_chunk(1))
        ended = server.wait_ended("a", timeout=30)
        assert ended.state == "failed" and ended.error is not None and "\n" not in ended.error
        assert f"chunk 1 of {pushed}" in ended.error and "cannot connect" in ended.error
