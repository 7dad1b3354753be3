"""The hot pack: a template's hot pages in one object (a real moto server over HTTP, through
the fault-injecting proxy), fetched by a cold host's prefetch in a few ranged GETs, verified
page by page, and served per page though their chunks are not in."""

from __future__ import annotations

import base64
import json
import os
import re
import zlib
from pathlib import Path

import pytest
from procs import proxy_fixture, s3_env_fixture, s3_server_fixture  # noqa: F401

from conftest import PAGE, needs_uffd
from pagefork.errors import PrefetchError, StoreError
from pagefork.hotpages import HotPageList, decode, encode
from pagefork.prefetch import plan_hot_set
from pagefork.regions import Region
from pagefork.store import lazy as lazy_mod
from pagefork.store.cache import ChunkCache
from pagefork.store.client import get_bytes, make_client, put_bytes
from pagefork.store.hotpack import RANGES, _ranges, hot_file_pages
from pagefork.store.layout import HotPack, Manifest, parse_manifest, parse_s3_url, sha256
from pagefork.store.lazy import LazyTemplate
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3Proxy

MIB = 1 << 20
CHUNK = MIB  # 12 chunks in the 12 MiB test template; chunks 0-7 are region 0


def hot_pages() -> list[tuple[int, int]]:
    """Scattered hot pages: 6 non-zero pages in each of region 0's 8 chunks, in an order that
    is not address order (first-touch order is what the pack keeps)."""
    pages = []
    for c in (5, 0, 7, 2, 6, 1, 4, 3):
        first = c * CHUNK // PAGE
        pages += [(0, (first + i) * PAGE) for i in (9, 3, 130, 77, 201, 2)]
    return pages  # page i is zero when i % 4 == 0: none of these is


@pytest.fixture
def packed(s3_bucket: str, s3_endpoint: str, mem_file: Path, tmp_path: Path) -> str:
    """The test's mem-file pushed with the hot set (so with a hot pack); its URL."""
    hpl = tmp_path / "hot.hpl"
    hpl.write_bytes(encode(HotPageList.from_pages(hot_pages()), "hpl2"))  # first-touch order
    url = f"s3://{s3_bucket}/tmpl"
    push(
        parse_s3_url(url),
        str(mem_file),
        make_client(s3_endpoint),
        chunk_size=CHUNK,
        hot_pages=str(hpl),
    )
    return url


def manifest_of(url: str) -> Manifest:
    u = parse_s3_url(url)
    return parse_manifest(get_bytes(make_client(), u.bucket, u.key("manifest.json")), url)


def gets(proxy: S3Proxy, part: str) -> int:
    return sum(n for k, n in proxy.gets.items() if part in k)


# --- the manifest -----------------------------------------------------------------------------


def test_a_manifest_with_a_pack_round_trips_and_one_without_stays_version_1():
    zeros = bytes(768)
    base = Manifest(size=3 * MIB, chunk_size=MIB, chunks=("a" * 64,) * 3, zero_pages=zeros)
    assert json.loads(base.to_json())["version"] == 1
    assert parse_manifest(base.to_json(), "m") == base
    pack = HotPack("p/hot-pack-x", "b" * 64, (7, 3, 500), (b"1" * 32, b"2" * 32, b"3" * 32))
    with_pack = Manifest(
        size=3 * MIB, chunk_size=MIB, chunks=("a" * 64,) * 3, zero_pages=zeros, hot_pack=pack
    )
    doc = json.loads(with_pack.to_json())
    assert doc["version"] == 2 and doc["hot_pack"]["size"] == 3 * PAGE
    assert parse_manifest(with_pack.to_json(), "m").hot_pack == pack


@pytest.mark.parametrize(
    ("pages", "size", "why"),
    [
        ((1, 1), 2 * PAGE, "lists a page twice"),
        ((1, 0), 2 * PAGE, "page 0 is outside the template or marked zero"),
        ((1, 768), 2 * PAGE, "page 768 is outside"),
        ((1, 2), 3 * PAGE, "lists 2 pages but its size is"),
    ],
)
def test_a_bad_pack_index_is_refused_naming_the_fault(pages, size, why):
    zeros = bytearray(768)
    zeros[0] = 1
    pack = HotPack("k", "b" * 64, pages, tuple(b"d" * 32 for _ in pages))
    m = Manifest(
        size=3 * MIB,
        chunk_size=MIB,
        chunks=("a" * 64,) * 3,
        zero_pages=bytes(zeros),
        hot_pack=pack,
    )
    doc = json.loads(m.to_json())
    doc["hot_pack"]["size"] = size
    with pytest.raises(StoreError, match=f"manifest m: hot_pack {why}"):
        parse_manifest(json.dumps(doc).encode(), "m")


# --- push ------------------------------------------------------------------------------------


def test_push_packs_the_hot_pages_in_first_touch_order(packed, mem_file, s3_bucket):
    pack = manifest_of(packed).hot_pack
    assert pack is not None
    want = [off // PAGE for _, off in hot_pages()]
    assert list(pack.pages) == want
    data = get_bytes(make_client(), s3_bucket, pack.key)
    assert sha256(data) == pack.sha256 and pack.key.endswith(pack.sha256)
    template = mem_file.read_bytes()
    assert data == b"".join(template[p * PAGE : (p + 1) * PAGE] for p in want)


# --- a cold host's prefetch ---------------------------------------------------------------------

needs = needs_uffd


@needs
def test_a_cold_prefetch_fetches_the_pack_alone_and_the_guest_sees_the_template(
    packed, s3_server, vmms, proxy, monkeypatch
):
    # Bridging is on (gaps of up to 8 pages between hot pages would be copied too), yet no
    # bridged page may cost its chunk: the pack holds the hot pages alone.
    monkeypatch.setenv("PAGEFORK_BRIDGE_GAP", "8")
    server = s3_server(packed)
    vmm = vmms(server.register_fork("a"))
    server.wait_connected("a")
    hot = hot_pages()
    result = server.prefetch("a", HotPageList.from_pages(hot))
    assert result.installed == len(hot)
    # Exactly the hot set's bytes, in a few ranged GETs; not one chunk.
    assert result.fetched_bytes == len(hot) * PAGE
    assert gets(proxy, "/hot-pack-") <= RANGES and gets(proxy, "/chunks/") == 0
    reply = vmm.send(cmd="touch", pages=[list(p) for p in hot])
    assert reply["bad"] == 0
    assert server.stats("a").faults == 0
    # The rest stays lazy: every page still matches, its chunks fetched on demand (each whole
    # once, after the block of its first fault).
    assert vmm.send(cmd="touch", all=True)["bad"] == 0
    assert isinstance(server.memfile, LazyTemplate)
    assert 0 < server.memfile.block_gets <= 12
    assert gets(proxy, "/chunks/") == 12 + server.memfile.block_gets


@needs
def test_pack_pages_are_served_per_page_without_their_chunk(packed, s3_server, vmms, proxy):
    server = s3_server(packed)
    vmms(server.register_fork("a"))
    server.wait_connected("a")
    server.prefetch("a", HotPageList.from_pages(hot_pages()))
    # Another fork, not prefetched, faults on the hot pages: served from the pack's pages in
    # the view, with no chunk fetched for them.
    b = vmms(server.register_fork("b"))
    reply = b.send(cmd="touch", pages=[list(p) for p in hot_pages()])
    assert reply["bad"] == 0 and server.stats("b").faults == len(hot_pages())
    assert gets(proxy, "/chunks/") == 0
    # A page beside them that the pack lacks fetches its block, then its chunk, once.
    other = [[0, (5 * CHUNK // PAGE + 10) * PAGE]]
    assert b.send(cmd="touch", pages=other)["bad"] == 0
    lazy = server.memfile
    assert isinstance(lazy, LazyTemplate) and lazy.block_gets == 1
    lazy.ensure([5], 30)  # waits for the chunk's fetch in flight: no GET of its own
    assert gets(proxy, "/chunks/") == 2


def test_a_chunk_fetched_later_never_rewrites_a_pack_page(
    packed, proxy, tmp_path, monkeypatch, mem_file
):
    lazy = LazyTemplate(
        packed, ChunkCache(str(tmp_path / "c")), endpoint_url=proxy.url, fetch_jobs=4
    )
    try:
        assert lazy.ensure_pack(30) == len(hot_pages()) * PAGE
        pack = lazy.manifest.hot_pack
        assert pack is not None
        assert all(lazy.page_present(p) for p in pack.pages)
        # The chunks of a plan whose pages all came from the pack are not fetched.
        assert lazy.chunks_of((p * PAGE, PAGE) for p in pack.pages) == []
        writes: list[tuple[int, int]] = []
        real = os.pwrite

        def spy(fd: int, data: bytes, offset: int) -> int:
            writes.append((offset, len(data)))
            return real(fd, data, offset)

        monkeypatch.setattr(lazy_mod.os, "pwrite", spy)
        lazy.ensure([5], 30)
        packed_here = {p for p in pack.pages if p * PAGE // CHUNK == 5}
        assert len(packed_here) == 6
        written = {o // PAGE + i for o, n in writes for i in range(n // PAGE)}
        assert written.isdisjoint(packed_here)
        assert written | packed_here == set(range(5 * 256, 6 * 256))
        view = os.pread(lazy.fd, CHUNK, 5 * CHUNK)
        assert view == mem_file.read_bytes()[5 * CHUNK : 6 * CHUNK]
    finally:
        lazy.close()


# --- a damaged pack -----------------------------------------------------------------------------


@needs
@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("corrupt", r"page \d+ \(template page \d+\) does not match its SHA-256"),
        ("truncated", "is shorter than its index says"),
        ("missing", "is gone from the bucket: push the template again"),
    ],
)
def test_a_damaged_pack_fails_only_the_prefetch_that_needs_it(
    damage, why, packed, s3_server, vmms, proxy, s3_bucket
):
    pack = manifest_of(packed).hot_pack
    assert pack is not None
    client = make_client()
    good = get_bytes(client, s3_bucket, pack.key)
    if damage == "corrupt":
        bad = bytearray(good)
        bad[len(bad) - 100] ^= 0xFF  # the last range's last page
        put_bytes(client, s3_bucket, pack.key, bytes(bad))
    elif damage == "truncated":
        put_bytes(client, s3_bucket, pack.key, good[: len(good) - PAGE])
    else:
        client.delete_object(Bucket=s3_bucket, Key=pack.key)
    server = s3_server(packed)
    a = vmms(server.register_fork("a"))
    server.wait_connected("a")
    with pytest.raises(PrefetchError) as err:
        server.prefetch("a", HotPageList.from_pages(hot_pages()))
    text = str(err.value)
    assert f"s3://{s3_bucket}/{pack.key}" in text and "\n" not in text
    assert "fork a: hot pack" in text and "push the template again" in text
    assert re.search(why, text), text
    assert server.stats("a").prefetched_pages == 0
    # Nothing of a bad page reached the view: the fork goes on, on demand, every byte right.
    assert a.send(cmd="touch", all=True)["bad"] == 0
    assert server.stats("a").errors == 0


@needs
def test_a_pack_transfer_corrupted_once_is_fetched_again(packed, s3_server, vmms, proxy):
    proxy.flip_bits("/hot-pack-", gets=1)
    server = s3_server(packed)
    a = vmms(server.register_fork("a"))
    server.wait_connected("a")
    result = server.prefetch("a", HotPageList.from_pages(hot_pages()))
    assert result.installed == len(hot_pages())
    # The range that arrived corrupt, fetched once more; the others once.
    assert gets(proxy, "/hot-pack-") == len(_ranges(len(hot_pages()))) + 1 > 2
    assert a.send(cmd="touch", pages=[list(p) for p in hot_pages()])["bad"] == 0


def test_an_old_manifest_without_a_pack_still_loads(s3_bucket, s3_endpoint, mem_file, tmp_path):
    url = f"s3://{s3_bucket}/old"
    push(parse_s3_url(url), str(mem_file), make_client(s3_endpoint), chunk_size=CHUNK)
    u = parse_s3_url(url)
    doc = json.loads(get_bytes(make_client(), u.bucket, u.key("manifest.json")))
    assert doc["version"] == 1 and "hot_pack" not in doc
    zeros = zlib.decompress(base64.b64decode(doc["zero_pages"]))
    lazy = LazyTemplate(url, ChunkCache(str(tmp_path / "c")), endpoint_url=s3_endpoint)
    try:
        assert lazy.manifest.hot_pack is None and lazy.manifest.zero_pages == zeros
        assert lazy.ensure_pack(10) == 0
    finally:
        lazy.close()


# --- a hot set recorded on a host, published ---------------------------------------------------


def test_a_hot_set_recorded_here_is_published_with_its_pack(
    s3_bucket, s3_endpoint, mem_file, tmp_path
):
    url = f"s3://{s3_bucket}/rec"
    push(parse_s3_url(url), str(mem_file), make_client(s3_endpoint), chunk_size=CHUNK)
    regions = [Region(0x7000_0000, 8 * MIB, 0), Region(0x9000_0000, 4 * MIB, 8 * MIB)]
    # First touches in both regions; region 1's pages lie 8 MiB into the mem-file.
    hot = HotPageList.from_pages([(1, 5 * PAGE), (0, 9 * PAGE), (1, 2 * PAGE), (0, 4 * PAGE)])
    cache = ChunkCache(str(tmp_path / "c"))
    here = LazyTemplate(url, cache, endpoint_url=s3_endpoint)
    try:
        here.ensure([0, 8], 30)  # what the recording fork faulted in
        pinned = here.publish_hot_set(hot, regions)
    finally:
        here.close()
    current = manifest_of(url)
    assert current.hot_pack is not None and pinned.endswith(sha256(current.to_json()))
    # In first-touch order, the zero page (4: every 4th page is zero) left out.
    assert current.hot_pack.pages == (2048 + 5, 9, 2048 + 2)
    template = mem_file.read_bytes()
    cold = LazyTemplate(pinned, ChunkCache(str(tmp_path / "cold")), endpoint_url=s3_endpoint)
    try:
        assert cold.ensure_pack(30) == 3 * PAGE
        for p in current.hot_pack.pages:
            assert os.pread(cold.fd, PAGE, p * PAGE) == template[p * PAGE : (p + 1) * PAGE]
        assert cold.gets == 1 and not cold.present(8)
    finally:
        cold.close()


def test_publishing_never_replaces_a_newer_push(s3_bucket, s3_endpoint, mem_file, tmp_path):
    url = f"s3://{s3_bucket}/rec"
    client = make_client(s3_endpoint)
    push(parse_s3_url(url), str(mem_file), client, chunk_size=CHUNK)
    here = LazyTemplate(url, ChunkCache(str(tmp_path / "c")), endpoint_url=s3_endpoint)
    try:
        here.ensure([0], 30)
        newer = push(parse_s3_url(url), str(mem_file), client, chunk_size=2 * CHUNK)
        one = HotPageList.from_pages([(0, 9 * PAGE)])
        pinned = here.publish_hot_set(one, [Region(0x7000_0000, 12 * MIB, 0)])
    finally:
        here.close()
    assert manifest_of(url) == newer.manifest  # the newer push stays current
    pinned_to = LazyTemplate(pinned, ChunkCache(str(tmp_path / "d")), endpoint_url=s3_endpoint)
    try:
        assert pinned_to.manifest.hot_pack is not None
        assert pinned_to.manifest.hot_pack.pages == (9,)
    finally:
        pinned_to.close()


def test_push_places_other_regions_by_the_plan_kept_with_the_list():
    regions = [Region(0x7000_0000, 8 * MIB, 0), Region(0x9000_0000, 4 * MIB, 8 * MIB)]
    hot = HotPageList.from_pages([(1, 3 * PAGE), (0, 5 * PAGE), (1, 0)])
    # Without a layout only region 0 can be placed: region 1's pages stay lazy.
    assert hot_file_pages(hot, 3072) == [5]
    plan_hot_set(hot, regions, lambda _o, _n: False)  # an HPL3 list carries this plan
    again = decode(encode(hot, "hpl3"))
    assert hot_file_pages(again, 3072) == [2048 + 3, 5, 2048]
