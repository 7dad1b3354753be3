"""Layer templates in object storage (a real moto server over HTTP, through the fault-injecting
proxy): ``push --layer --parent`` uploads the layer's own pages, packed, with a manifest that
pins its parent's; a fork of it (a real uffd fork in another process) reads the layered memory,
its changed pages from the layer pack and the rest from the parent's chunks; a host holding
the parent fetches only the layer; a damaged layer object fails only the forks that need it."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from procs import proxy_fixture, s3_env_fixture, s3_server_fixture  # noqa: F401

from conftest import PAGE, S3_ENV, make_mem_file, needs_uffd
from pagefork.errors import StoreError
from pagefork.hotpages import HotPageList
from pagefork.layers.format import write_layer
from pagefork.layers.source import flatten
from pagefork.regions import Region
from pagefork.store.cache import ChunkCache
from pagefork.store.client import get_bytes, make_client, put_bytes
from pagefork.store.layered import MAX_DEPTH
from pagefork.store.layerpush import push_layer
from pagefork.store.layout import (
    HotPack,
    Manifest,
    ParentRef,
    parse_manifest,
    parse_s3_url,
    sha256,
)
from pagefork.store.lazy import LazyTemplate
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3Proxy
from pagefork.testing.vmm import VmmProcess

MIB = 1 << 20
CHUNK = MIB
NPAGES = 3072  # the 12 MiB test mem-file
#: Pages the layer changes: scattered over every chunk (so a chunk-level diff would upload
#: all twelve), some that were zero in the base.
CHANGED = sorted({(c * 256 + i * 37 + 5) % NPAGES for c in range(12) for i in range(5)} | {0, 4})
#: Pages the layer zeroes (data in the base).
ZEROED = (1001, 1002, 1003)


def changed_bytes() -> int:
    return len(CHANGED) * PAGE


@pytest.fixture
def layer(tmp_path: Path, mem_file: Path) -> Path:
    rng = random.Random(7)
    path = tmp_path / "snap.layer"
    write_layer(
        str(path),
        size=NPAGES * PAGE,
        pages=[(p, rng.randbytes(PAGE)) for p in CHANGED],
        zero_runs=[(ZEROED[0], len(ZEROED))],
    )
    return path


@pytest.fixture
def child_mem(tmp_path: Path, mem_file: Path, layer: Path) -> Path:
    """The layered memory, flattened: what a fork of the layer template must read."""
    out = tmp_path / "child.mem"
    flatten(str(mem_file), [str(layer)], str(out))
    return out


@pytest.fixture
def parent_url(s3_bucket: str, mem_file: Path) -> str:
    url = f"s3://{s3_bucket}/base"
    push(parse_s3_url(url), str(mem_file), make_client(), chunk_size=CHUNK)
    return url


@pytest.fixture
def layer_url(s3_bucket: str, mem_file: Path, layer: Path, parent_url: str) -> str:
    url = f"s3://{s3_bucket}/snap"
    push_layer(
        parse_s3_url(url), str(mem_file), [str(layer)], parse_s3_url(parent_url), make_client()
    )
    return url


def manifest_of(url: str) -> Manifest:
    u = parse_s3_url(url)
    return parse_manifest(get_bytes(make_client(), u.bucket, u.key("manifest.json")), url)


def gets(proxy: S3Proxy, part: str) -> int:
    return sum(n for k, n in proxy.gets.items() if part in k)


# --- the manifest -----------------------------------------------------------------------------


def layer_manifest() -> Manifest:
    pack = HotPack("snap/layer-pack-x", "b" * 64, (7, 3), (b"1" * 32, b"2" * 32))
    return Manifest(
        size=3 * MIB,
        chunk_size=MIB,
        chunks=("a" * 64, None, "c" * 64),
        zero_pages=bytes(256) + b"\x01" * 256 + bytes(256),
        parent=ParentRef("base/manifests/" + "d" * 64 + ".json", "d" * 64),
        layer_pack=pack,
    )


def test_a_layer_manifest_round_trips_as_version_3():
    m = layer_manifest()
    doc = json.loads(m.to_json())
    assert doc["version"] == 3 and "chunks" not in doc and doc["memory_chunks"][1] is None
    assert doc["parent"] == {"key": m.parent.key, "sha256": "d" * 64}  # type: ignore[union-attr]
    assert parse_manifest(m.to_json(), "m") == m and m.is_layer


def test_a_manifest_of_a_future_version_is_refused_with_a_clear_error():
    doc = json.loads(layer_manifest().to_json())
    doc["version"] = 4
    with pytest.raises(StoreError, match=r"^manifest m: format version 4 is newer than this "
                       r"pagefork reads \(1 to 3\): upgrade pagefork"):  # fmt: skip
        parse_manifest(json.dumps(doc).encode(), "m")


def test_a_layer_manifest_without_its_parent_is_refused():
    doc = json.loads(layer_manifest().to_json())
    doc["parent"] = None
    with pytest.raises(StoreError, match="manifest m: parent must be"):
        parse_manifest(json.dumps(doc).encode(), "m")


# --- push ------------------------------------------------------------------------------------


def test_push_layer_uploads_the_changed_pages_alone(
    s3_bucket, mem_file, layer, parent_url, proxy, child_mem
):
    url = parse_s3_url(f"s3://{s3_bucket}/snap")
    result = push_layer(
        url, str(mem_file), [str(layer)], parse_s3_url(parent_url), make_client(proxy.url)
    )
    # Counted at the store: the pack (the changed pages), the manifest twice; no chunk.
    put = dict(proxy.put_bytes)
    assert not any("/chunks/" in k for k in put)
    packs = {k: n for k, n in put.items() if "/layer-pack-" in k}
    assert list(packs.values()) == [changed_bytes()] == [result.layer_bytes]
    manifests = sum(n for k, n in put.items() if k.endswith(".json"))
    assert sum(put.values()) == changed_bytes() + manifests
    assert manifests < 2 * (32 << 10)  # the index and zero map, compressed: small
    m = manifest_of(str(url))
    assert m.layer_pack is not None and list(m.layer_pack.pages) == CHANGED
    assert m.parent is not None and m.parent.key.startswith("base/manifests/")
    data = get_bytes(make_client(), s3_bucket, m.layer_pack.key)
    child = child_mem.read_bytes()
    assert data == b"".join(child[p * PAGE : (p + 1) * PAGE] for p in CHANGED)


def test_push_layer_refuses_a_parent_that_is_not_the_memory_below(
    s3_bucket, tmp_path, layer, parent_url, mem_file
):
    other = make_mem_file(tmp_path / "other", NPAGES, seed=5)
    with pytest.raises(StoreError, match=r"is not the memory under layer .* \(chunk 0 differs\)"):
        push_layer(
            parse_s3_url(f"s3://{s3_bucket}/snap"),
            str(other),
            [str(layer)],
            parse_s3_url(parent_url),
            make_client(),
        )
    client = make_client()
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="snap/").get("Contents", [])
    assert listed == []  # nothing uploaded


# --- serving -----------------------------------------------------------------------------------

needs = needs_uffd


def fork_of(server, name: str, mem: Path) -> VmmProcess:  # type: ignore[no-untyped-def]
    return VmmProcess(server.register_fork(name), str(mem), ("8M", "4M"))


@needs
def test_a_fork_of_a_layer_template_reads_the_layered_memory(
    layer_url, s3_server, child_mem, proxy, tmp_path
):
    server = s3_server(layer_url)
    vmm = fork_of(server, "a", child_mem)
    try:
        reply = vmm.send(cmd="touch", all=True)
        assert reply["bad"] == 0 and reply["touched"] > 0
        assert server.stats("a").errors == 0
        # The layer's pages came from its pack; the rest from the parent's twelve chunks.
        assert gets(proxy, "/layer-pack-") >= 1 and gets(proxy, "/chunks/") == 12
    finally:
        vmm.kill()


@needs
def test_a_host_holding_the_parent_fetches_only_the_layer(
    parent_url, layer_url, s3_server, mem_file, child_mem, proxy, tmp_path
):
    cache = tmp_path / "host-cache"
    first = s3_server(parent_url, cache_dir=cache)
    vmm = fork_of(first, "p", mem_file)
    try:
        assert vmm.send(cmd="touch", all=True)["bad"] == 0
    finally:
        vmm.kill()
    first.close()
    proxy.reset_counts()
    server = s3_server(layer_url, cache_dir=cache)
    child = fork_of(server, "c", child_mem)
    try:
        assert child.send(cmd="touch", all=True)["bad"] == 0
    finally:
        child.kill()
    # Its own manifest, its parent's (a few KiB, once: then kept in the host cache) and the
    # layer pack: not one chunk.
    own = "/" + layer_url[len("s3://") :] + "/manifest.json"
    assert gets(proxy, "/chunks/") == 0 and gets(proxy, "/base/manifests/") == 1
    assert {k for k in proxy.gets if "/layer-pack-" not in k and "/base/" not in k} == {own}
    assert gets(proxy, "/layer-pack-") >= 1
    assert proxy.got_bytes < changed_bytes() + (64 << 10)
    # A second server on this host reads the parent's manifest from the cache.
    proxy.reset_counts()
    again = s3_server(layer_url, cache_dir=cache)
    child = fork_of(again, "c2", child_mem)
    try:
        assert child.send(cmd="touch", all=True)["bad"] == 0
    finally:
        child.kill()
    assert gets(proxy, "/base/") == 0 and gets(proxy, "/chunks/") == 0


def damage(kind: str, bucket: str, url: str) -> str:
    """Damage the layer template at ``url``'s object ``kind``; the object's s3:// URL."""
    m = manifest_of(url)
    assert m.layer_pack is not None and m.parent is not None
    client = make_client()
    key = m.layer_pack.key if kind.startswith("pack") else m.parent.key
    good = get_bytes(client, bucket, key)
    if kind in ("pack-corrupt", "parent-corrupt"):
        bad = bytearray(good)
        bad[len(bad) // 2] ^= 0x01
        put_bytes(client, bucket, key, bytes(bad))
    elif kind == "pack-truncated":
        put_bytes(client, bucket, key, good[: len(good) - PAGE])
    else:
        client.delete_object(Bucket=bucket, Key=key)
    return f"s3://{bucket}/{key}"


@needs
@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("pack-corrupt", r"layer pack \S+ page \d+ \(template page \d+\) does not match"),
        ("pack-truncated", "layer pack .* is shorter than its index says"),
        ("pack-missing", "layer pack .* is gone from the bucket: push the layer again"),
        ("parent-corrupt", "parent manifest .* does not match the SHA-256 its child pins"),
        ("parent-missing", "parent manifest .* is gone from the bucket: push the parent"),
    ],
)
def test_a_damaged_layer_object_fails_only_the_forks_that_need_it(
    kind, why, layer_url, parent_url, s3_server, s3_bucket, child_mem, mem_file
):
    where = damage(kind, s3_bucket, layer_url)
    server = s3_server(layer_url)
    other = s3_server(parent_url)
    bad = fork_of(server, "bad", child_mem)
    elsewhere = fork_of(other, "elsewhere", mem_file)
    try:
        with pytest.raises(EOFError):  # SIGKILLed: its guest would hang on that page
            bad.send(cmd="touch", pages=[[0, CHANGED[3] * PAGE]])
        ended = server.wait_ended("bad", timeout=30)
        assert ended.state == "failed" and ended.error is not None
        assert where in ended.error and "\n" not in ended.error, ended.error
        assert re.search(why, ended.error), ended.error
        # Another template's fork, on the same store, is served (pages of three chunks).
        pages = [[0, p * PAGE] for p in range(0, 768, 5)]
        assert elsewhere.send(cmd="touch", pages=pages)["bad"] == 0
    finally:
        bad.kill()
        elsewhere.kill()


@pytest.mark.parametrize(
    ("kind", "repair"),
    [
        ("gone", "is gone from the bucket (deleted after the push): push the parent {base}#"),
        ("corrupt", "repair it with 'pagefork push --verify {base} --mem-file MEM'"),
    ],
)
def test_a_damaged_base_chunk_of_a_layer_names_the_parent_to_push_again(
    kind, repair, layer_url, parent_url, s3_bucket, tmp_path
):
    key = manifest_of(parent_url).chunk_key(5)
    client = make_client()
    if kind == "gone":
        client.delete_object(Bucket=s3_bucket, Key=key)
    else:
        put_bytes(client, s3_bucket, key, b"\x01" * CHUNK)
    lazy = LazyTemplate(layer_url, ChunkCache(str(tmp_path / "c")), warm=False)
    try:
        with pytest.raises(StoreError) as info:
            lazy.ensure([5], 30)
    finally:
        lazy.close()
    text = str(info.value)
    # The chunk is the parent's: pushing the layer again would not bring it back.
    assert f"s3://{s3_bucket}/{key} (a chunk of {layer_url}'s parent template" in text, text
    assert repair.format(base=parent_url) in text, text
    assert "push the template again" not in text and "\n" not in text


def test_a_chain_deeper_than_the_bound_is_refused(s3_bucket, tmp_path):
    client = make_client()
    small = make_mem_file(tmp_path / "small", 32)  # 128 KiB in two 64 KiB chunks: quick
    below = f"s3://{s3_bucket}/small"
    push(parse_s3_url(below), str(small), client, chunk_size=64 << 10)
    # Layers that change nothing, each over the one before: MAX_DEPTH of them over the base.
    empty = tmp_path / "empty.layer"
    write_layer(str(empty), size=32 * PAGE, pages=[])
    for i in range(MAX_DEPTH - 1):
        url = f"s3://{s3_bucket}/l{i}"
        push_layer(parse_s3_url(url), str(small), [str(empty)], parse_s3_url(below), client)
        below = url
    # The push of one more is refused: no host would serve it.
    deep = parse_s3_url(f"s3://{s3_bucket}/deep")
    with pytest.raises(StoreError, match=f"chain of {MAX_DEPTH} templates: .*deeper than"):
        push_layer(deep, str(small), [str(empty)], parse_s3_url(below), client)
    assert not client.list_objects_v2(Bucket=s3_bucket, Prefix="deep/").get("Contents")
    # A store that holds one anyway (made by hand) is refused when served.
    top = manifest_of(below)
    u = parse_s3_url(below)
    pin = sha256(get_bytes(client, s3_bucket, u.key("manifest.json")))
    over = dataclasses.replace(top, parent=ParentRef(u.key(f"manifests/{pin}.json"), pin))
    put_bytes(client, s3_bucket, deep.key("manifest.json"), over.to_json())
    below = str(deep)
    lazy = LazyTemplate(below, ChunkCache(str(tmp_path / "c")))
    try:
        with pytest.raises(StoreError, match=f"deeper than {MAX_DEPTH} templates"):
            lazy.ensure([0], 30)
    finally:
        lazy.close()
    # One less is served.
    lazy = LazyTemplate(f"s3://{s3_bucket}/l{MAX_DEPTH - 2}", ChunkCache(str(tmp_path / "c")))
    try:
        lazy.ensure([0], 30)
        assert lazy.present(0)
    finally:
        lazy.close()


def test_a_layer_over_a_layer_whose_parent_is_gone_is_refused_at_push(
    s3_bucket, mem_file, tmp_path, layer, layer_url
):
    client = make_client()
    client.delete_object(Bucket=s3_bucket, Key=manifest_of(layer_url).parent.key)
    empty = tmp_path / "empty.layer"
    write_layer(str(empty), size=NPAGES * PAGE, pages=[])
    top = parse_s3_url(f"s3://{s3_bucket}/top")
    with pytest.raises(StoreError, match=r"parent manifest .*base/manifests/.* is gone"):
        push_layer(top, str(mem_file), [str(layer), str(empty)], parse_s3_url(layer_url), client)
    # Nothing of the refused layer was uploaded: no fork of it could have run.
    assert not client.list_objects_v2(Bucket=s3_bucket, Prefix="top/").get("Contents")


def test_a_layer_over_a_parent_never_pushed_names_the_parent(s3_bucket, mem_file, layer):
    parent = parse_s3_url(f"s3://{s3_bucket}/nothere")
    top = parse_s3_url(f"s3://{s3_bucket}/top")
    with pytest.raises(StoreError) as info:
        push_layer(top, str(mem_file), [str(layer)], parent, make_client())
    assert str(info.value) == (
        f"parent {parent}: s3://{s3_bucket}/nothere/manifest.json: no such object"
    )


def test_an_old_manifest_still_loads_and_serves(s3_bucket, mem_file, tmp_path, parent_url):
    m = manifest_of(parent_url)
    assert json.loads(m.to_json())["version"] == 1
    lazy = LazyTemplate(parent_url, ChunkCache(str(tmp_path / "c")))
    try:
        assert not lazy.manifest.is_layer and lazy.ensure_layers(10) == 0
        lazy.ensure([2], 30)
        assert os.pread(lazy.fd, CHUNK, 2 * CHUNK) == mem_file.read_bytes()[2 * CHUNK : 3 * CHUNK]
    finally:
        lazy.close()


@needs
def test_a_chain_of_two_layers_serves_the_top_layers_pages(
    s3_bucket, mem_file, layer, layer_url, s3_server, tmp_path, proxy
):
    # A second layer over the first: it rewrites some of the first's pages and zeroes one.
    rng = random.Random(11)
    top = tmp_path / "top.layer"
    again = CHANGED[::3]
    write_layer(
        str(top),
        size=NPAGES * PAGE,
        pages=[(p, rng.randbytes(PAGE)) for p in (*again, 2001)],
        zero_runs=[(CHANGED[1], 1)],
    )
    url = f"s3://{s3_bucket}/snap2"
    result = push_layer(
        parse_s3_url(url), str(mem_file), [str(layer), str(top)], parse_s3_url(layer_url),
        make_client(),
    )  # fmt: skip
    assert result.layer_pages == len(again) + 1
    want = tmp_path / "top.mem"
    flatten(str(mem_file), [str(layer), str(top)], str(want))
    server = s3_server(url)
    vmm = fork_of(server, "a", want)
    try:
        assert vmm.send(cmd="touch", all=True)["bad"] == 0
    finally:
        vmm.kill()
    # Both layers' packs; the base's chunks; nothing of the layer pushed as chunks.
    assert gets(proxy, "/snap2/layer-pack-") >= 1 and gets(proxy, "/snap/layer-pack-") >= 1
    assert gets(proxy, "/chunks/") == 12


def test_push_layer_from_the_command_line(s3_bucket, s3_endpoint, mem_file, layer, parent_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(S3_ENV, AWS_ENDPOINT_URL=s3_endpoint)
    argv = [sys.executable, "-m", "pagefork", "push", f"s3://{s3_bucket}/snap"]
    argv += ["--mem-file", str(mem_file), "--layer", str(layer), "--json"]
    done = subprocess.run(
        [*argv, "--parent", parent_url], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["layer_pages"] == len(CHANGED) and doc["layer_bytes"] == changed_bytes()
    # A parent in another bucket: one line naming both, no traceback.
    bad = subprocess.run(
        [*argv, "--parent", "s3://elsewhere/base"], capture_output=True, text=True, env=env
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "a layer and its parent share a bucket" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    verify = subprocess.run(
        [*argv, "--parent", parent_url, "--verify"], capture_output=True, text=True, env=env
    )
    assert verify.returncode != 0 and "--verify, --chunk-size and --chunks-prefix do not" in (
        verify.stderr
    )


def test_a_hot_set_published_from_a_layer_template_keeps_it_a_layer(layer_url, child_mem, tmp_path):
    # The hot pages: layer pages and pages of the parent, in region 0 (the mem-file's start).
    hot_pages = [CHANGED[5], 9, CHANGED[2], 10]
    hot = HotPageList.from_pages([(0, p * PAGE) for p in hot_pages])
    here = LazyTemplate(layer_url, ChunkCache(str(tmp_path / "c")))
    try:
        here.ensure([0, hot_pages[0] * PAGE // CHUNK, hot_pages[2] * PAGE // CHUNK], 30)
        pinned = here.publish_hot_set(hot, [Region(0x7000_0000, 12 * MIB, 0)])
    finally:
        here.close()
    published = manifest_of(layer_url)
    assert published.is_layer and published.layer_pack == manifest_of(pinned).layer_pack
    assert published.hot_pack is not None and list(published.hot_pack.pages) == hot_pages
    child = child_mem.read_bytes()
    cold = LazyTemplate(pinned, ChunkCache(str(tmp_path / "cold")))
    try:
        assert cold.ensure_pack(30) == len(hot_pages) * PAGE
        cold.ensure(range(12), 60)
        view = bytearray(os.pread(cold.fd, NPAGES * PAGE, 0))
        for p in range(NPAGES):  # a page the zero map marks is served as zeros, not copied
            if cold.manifest.zero_pages[p]:
                view[p * PAGE : (p + 1) * PAGE] = bytes(PAGE)
        assert view == child  # every byte the layered memory's
    finally:
        cold.close()


def test_a_layer_template_is_served_by_a_store_that_ignores_byte_ranges(
    layer_url, child_mem, s3_endpoint, tmp_path
):
    # A store that answers every GET with the whole object: the layer pack is fetched whole,
    # once, and every page of it still checked against its digest.
    client = make_client(s3_endpoint)

    def drop_range(request, **_kw):  # type: ignore[no-untyped-def]
        if "Range" in request.headers:
            del request.headers["Range"]

    client.meta.events.register("before-sign.s3.GetObject", drop_range)
    lazy = LazyTemplate(layer_url, ChunkCache(str(tmp_path / "c")), client=client, warm=False)
    try:
        lazy.ensure(range(12), 60)
        view, want = os.pread(lazy.fd, 12 * CHUNK, 0), child_mem.read_bytes()
        zeros = lazy.manifest.zero_pages  # served as zeros, whatever the view holds there
        bad = [
            p
            for p in range(NPAGES)
            if (bytes(PAGE) if zeros[p] else view[p * PAGE : (p + 1) * PAGE])
            != want[p * PAGE : (p + 1) * PAGE]
        ]
        assert bad == [] and lazy.gets >= 1
    finally:
        lazy.close()
        client.close()


def test_a_parent_manifest_damaged_in_the_host_cache_is_fetched_again(
    layer_url, s3_bucket, tmp_path
):
    cache_dir = tmp_path / "c"
    lazy = LazyTemplate(layer_url, ChunkCache(str(cache_dir)), warm=False)
    try:
        lazy.ensure([0], 30)
    finally:
        lazy.close()
    pin = manifest_of(layer_url).parent.sha256
    entry = cache_dir / pin
    good = entry.read_bytes()
    entry.write_bytes(good[: len(good) // 2])  # still 0400 (root writes through the mode)
    assert entry.stat().st_mode & 0o777 == 0o400
    lazy = LazyTemplate(layer_url, ChunkCache(str(cache_dir)), warm=False)
    try:
        lazy.ensure([0], 30)
        assert lazy.present(0)
    finally:
        lazy.close()
    assert entry.read_bytes() == good  # and the cache holds the right one again
