"""A cold chunk's fault served first (one verified block, the rest of the chunk after), and a
warm host cache served without hashing, against a real moto server behind the fault-injecting
proxy, with real uffd faults from test VMM processes that check every byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from procs import proxy_fixture, s3_env_fixture, s3_server_fixture  # noqa: F401

from conftest import PAGE, needs_uffd
from pagefork.errors import StoreError
from pagefork.server import PageServer, ServerConfig
from pagefork.store import lazy as lazy_mod
from pagefork.store.cache import ChunkCache
from pagefork.store.client import get_bytes, make_client, put_bytes
from pagefork.store.layout import Manifest, parse_manifest, parse_s3_url, sha256
from pagefork.store.lazy import LazyTemplate, StoreOptions
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3Proxy

MIB = 1 << 20
CHUNK = MIB  # 12 chunks in the 12 MiB test template
BLOCK = 64 << 10


@pytest.fixture
def pushed(s3_bucket: str, s3_endpoint: str, mem_file: Path) -> str:
    """The test's mem-file pushed with per-block digests (64 KiB); its URL."""
    url = f"s3://{s3_bucket}/tmpl"
    push(parse_s3_url(url), str(mem_file), make_client(s3_endpoint), chunk_size=CHUNK)
    return url


def manifest_of(url: str) -> Manifest:
    u = parse_s3_url(url)
    return parse_manifest(get_bytes(make_client(), u.bucket, u.key("manifest.json")), url)


def pages_in_block(chunk: int, block: int) -> list[list[int]]:
    """The non-zero pages (region 0) of one block (every 4th page of the template is zero)."""
    first = (chunk * CHUNK + block * BLOCK) // PAGE
    return [[0, p * PAGE] for p in range(first, first + BLOCK // PAGE) if p % 4]


def lazy_of(server: PageServer) -> LazyTemplate:
    assert isinstance(server.memfile, LazyTemplate)
    return server.memfile


# --- the manifest -----------------------------------------------------------------------------


def test_push_records_a_digest_per_block_and_the_manifest_round_trips(pushed, mem_file):
    m = manifest_of(pushed)
    assert m.block_size == BLOCK
    data = mem_file.read_bytes()
    for chunk, sha in enumerate(m.chunks):
        assert sha is not None and len(m.block_digests[chunk]) == 32 * (CHUNK // BLOCK)
        at = chunk * CHUNK + 5 * BLOCK
        assert m.block_digest(chunk, 5) == bytes.fromhex(sha256(data[at : at + BLOCK]))
    assert parse_manifest(m.to_json(), "m") == m


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"block_size": 3000}, "block_size 3000 is not a power of two"),
        ({"block_size": 2 * MIB}, r"block_size 2097152 is not a power of two in \[4096"),
        ({"block_digests": "AAAA"}, "block_digests does not decode"),
    ],
)
def test_a_bad_block_digest_list_is_refused_naming_the_field(pushed, change, why):
    doc = json.loads(manifest_of(pushed).to_json())
    doc.update(change)
    with pytest.raises(StoreError, match=f"manifest m: {why}"):
        parse_manifest(json.dumps(doc).encode(), "m")


# --- a cold chunk's fault first -----------------------------------------------------------------

needs = needs_uffd


def server_on(tmp_path: Path, proxy: S3Proxy, url: str, cache: str = "cache") -> PageServer:
    store = StoreOptions(
        cache=ChunkCache(str(tmp_path / cache)), endpoint_url=proxy.url, fetch_deadline=20
    )
    return PageServer(
        ServerConfig(mem_file_path=url, socket_dir=str(tmp_path), store=store, workers=1)
    )


@needs
def test_a_cold_fault_is_served_before_the_rest_of_its_chunk_arrives(pushed, vmms, proxy, tmp_path):
    # The store holds every whole-chunk GET unanswered: only a ranged GET of the faulting
    # block can serve the fault.
    proxy.hang("/chunks/", whole_only=True)
    server = server_on(tmp_path, proxy, pushed)
    try:
        vmm = vmms(server.register_fork("a"))
        reply = vmm.send(cmd="touch", pages=pages_in_block(3, 7))
        assert reply["bad"] == 0 and reply["touched"] == len(pages_in_block(3, 7))
        lazy = lazy_of(server)
        assert lazy.block_gets == 1 and not lazy.present(3)
        assert lazy.fetched_bytes == BLOCK
        # The rest of the chunk comes once the store answers: every byte of it right.
        proxy.hang(None)
        first = 3 * CHUNK // PAGE
        rest = [[0, p * PAGE] for p in range(first, first + CHUNK // PAGE) if p % 4]
        assert vmm.send(cmd="touch", pages=rest)["bad"] == 0
        assert lazy.present(3) and lazy.block_gets == 1
        key = manifest_of(pushed).chunk_key(3)
        assert proxy.get_count(key) == 2  # the block, then the whole chunk
        assert server.stats("a").errors == 0
    finally:
        proxy.hang(None)
        server.close()


def test_the_rest_of_a_chunk_never_rewrites_a_block_already_served(
    pushed, proxy, tmp_path, monkeypatch, mem_file
):
    lazy = LazyTemplate(pushed, ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url)
    try:
        proxy.hang("/chunks/", whole_only=True)  # the rest waits until the block is checked
        writes: list[tuple[int, int]] = []
        real = os.pwrite

        def spy(fd: int, data: bytes, offset: int) -> int:
            writes.append((offset, len(data)))
            return real(fd, data, offset)

        monkeypatch.setattr(lazy_mod.os, "pwrite", spy)
        assert lazy.request_page(4, 4 * CHUNK + 3 * BLOCK + 5 * PAGE).result(30) == BLOCK
        block = set(range((4 * CHUNK + 3 * BLOCK) // PAGE, (4 * CHUNK + 4 * BLOCK) // PAGE))
        assert all(lazy.page_present(p) for p in block) and not lazy.present(4)
        assert {o // PAGE + i for o, n in writes for i in range(n // PAGE)} == block
        writes.clear()
        proxy.hang(None)
        lazy.ensure([4], 30)  # the fetch of the rest, in flight since the block came
        written = {o // PAGE + i for o, n in writes for i in range(n // PAGE)}
        assert written.isdisjoint(block)
        assert written | block == set(range(4 * CHUNK // PAGE, 5 * CHUNK // PAGE))
        assert os.pread(lazy.fd, CHUNK, 4 * CHUNK) == mem_file.read_bytes()[4 * CHUNK : 5 * CHUNK]
        assert lazy.block_gets == 1 and proxy.get_count(manifest_of(pushed).chunk_key(4)) == 2
    finally:
        proxy.hang(None)
        lazy.close()


@needs
def test_a_corrupt_block_fails_only_the_fork_that_needs_it(
    pushed, vmms, proxy, tmp_path, s3_bucket, mem_file
):
    key = manifest_of(pushed).chunk_key(5)
    data = bytearray(mem_file.read_bytes()[5 * CHUNK : 6 * CHUNK])
    data[2 * BLOCK + 100] ^= 0xFF  # block 2 of chunk 5, in the store itself
    put_bytes(make_client(), s3_bucket, key, bytes(data))
    server = server_on(tmp_path, proxy, pushed)
    try:
        bad = vmms(server.register_fork("bad"))
        good = vmms(server.register_fork("good"))
        with pytest.raises(EOFError):  # SIGKILLed: its guest would hang on that block
            bad.send(cmd="touch", pages=pages_in_block(5, 2))
        ended = server.wait_ended("bad", timeout=20)
        assert ended.state == "failed" and ended.error is not None
        # The block did not match (twice): the whole chunk decided, and it is corrupt too.
        assert "chunk 5 of" in ended.error, ended.error
        assert f"s3://{s3_bucket}/{key} does not match" in ended.error
        assert "does not match its SHA-256" in ended.error and "push --verify" in ended.error
        assert "\n" not in ended.error
        assert proxy.get_count(key) == 4  # the block twice, then the chunk twice
        # Nothing of it reached the view; the other fork goes on, every byte right.
        assert not any(lazy_of(server).page_present(p // PAGE) for _, p in pages_in_block(5, 2))
        assert good.send(cmd="touch", pages=pages_in_block(4, 2))["bad"] == 0
        assert server.stats("good").errors == 0
    finally:
        server.close()


@needs
def test_a_manifest_without_block_digests_serves_whole_chunks(
    pushed, vmms, proxy, tmp_path, s3_bucket
):
    doc = json.loads(manifest_of(pushed).to_json())
    del doc["block_size"], doc["block_digests"]  # as a push before they were recorded
    old = json.dumps(doc).encode()
    put_bytes(make_client(), s3_bucket, "old/manifest.json", old)
    server = server_on(tmp_path, proxy, f"s3://{s3_bucket}/old")
    try:
        vmm = vmms(server.register_fork("a"))
        assert vmm.send(cmd="touch", pages=pages_in_block(3, 7))["bad"] == 0
        lazy = lazy_of(server)
        assert lazy.block_gets == 0 and lazy.present(3) and lazy.fetched_bytes == CHUNK
    finally:
        server.close()


# --- a warm host cache ------------------------------------------------------------------------


@needs
def test_a_warm_cache_is_served_without_hashing(pushed, vmms, proxy, tmp_path):
    first = server_on(tmp_path, proxy, pushed)
    try:
        assert vmms(first.register_fork("a")).send(cmd="touch", all=True)["bad"] == 0
    finally:
        first.close()  # its cache writes are flushed
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 12 and all(p.stat().st_mode & 0o777 == 0o400 for p in entries)
    gets = sum(n for k, n in proxy.gets.items() if "/chunks/" in k)
    second = server_on(tmp_path, proxy, pushed)
    try:
        reply = vmms(second.register_fork("b")).send(cmd="touch", all=True)
        assert reply["bad"] == 0 and reply["touched"] == 3072
        lazy = lazy_of(second)
        assert lazy.fetched_bytes == 0 and lazy.gets == 0
        assert lazy.cache.hashed == 0 and lazy.cache.trusted >= 12
        assert sum(n for k, n in proxy.gets.items() if "/chunks/" in k) == gets
    finally:
        second.close()


def _cached(tmp_path: Path) -> tuple[ChunkCache, str, bytes, Path]:
    cache = ChunkCache(str(tmp_path / "c"))
    data = os.urandom(256 << 10)
    sha = sha256(data)
    cache.put(sha, data)
    return cache, sha, data, tmp_path / "c" / sha


def test_a_cache_entry_made_writable_and_changed_is_refused_and_removed(tmp_path):
    cache, sha, data, path = _cached(tmp_path)
    assert cache.get(sha, len(data)) == data and cache.trusted == 1 and cache.hashed == 0
    path.chmod(0o600)
    path.write_bytes(b"\x00" + data[1:])
    assert cache.get(sha, len(data)) is None  # hashed, found wrong: never handed out
    assert cache.hashed == 1 and cache.corrupt == 1 and not path.exists()


def test_a_cache_entry_made_writable_but_intact_is_hashed_then_trusted_again(tmp_path):
    cache, sha, data, path = _cached(tmp_path)
    path.chmod(0o644)
    assert cache.get(sha) == data and cache.hashed == 1
    assert path.stat().st_mode & 0o777 == 0o400  # sealed again once verified
    assert cache.get(sha) == data and cache.hashed == 1 and cache.trusted == 1


def test_a_cache_entry_that_is_a_symlink_or_not_ours_is_a_miss_left_alone(tmp_path):
    cache, sha, data, path = _cached(tmp_path)
    real = tmp_path / "elsewhere"
    os.rename(path, real)
    path.symlink_to(real)  # the right bytes, but not a file the cache made
    assert cache.get(sha, len(data)) is None and path.is_symlink()
    os.unlink(path)
    os.rename(real, path)
    os.chown(path, 12345, 12345)  # another user's file (only root could put it there)
    assert cache.get(sha, len(data)) is None and path.exists()
    os.link(path, tmp_path / "alias")
    os.chown(path, os.geteuid(), os.getegid())
    assert cache.get(sha, len(data)) == data and cache.hashed == 1  # a second name: hashed
    assert cache.trusted == 0


def test_a_cache_directory_another_user_can_write_is_refused(tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(StoreError, match=r"shared: writable by other users \(mode 777\)"):
        ChunkCache(str(d))
    d.chmod(0o700)
    os.chown(d, 12345, 12345)
    with pytest.raises(StoreError, match=r"shared: owned by uid 12345, not this user"):
        ChunkCache(str(d))
