"""The object-storage layout, the host chunk cache and pushing (the cache and layout tests
need no server; pushes go to a real moto server over HTTP)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest

from conftest import PAGE, make_mem_file
from pagefork.errors import PageforkError, StoreError
from pagefork.store.cache import ChunkCache, parse_size
from pagefork.store.client import get_bytes, make_client, put_bytes
from pagefork.store.layout import Manifest, parse_manifest, parse_s3_url, sha256
from pagefork.store.lazy import StoreOptions
from pagefork.store.push import push
from pagefork.store.template import fetch_pushed

MIB = 1 << 20


# --- URLs and manifests -----------------------------------------------------------------------


def test_s3_url_parts():
    u = parse_s3_url("s3://my-bucket/templates/base/")
    assert (u.bucket, u.prefix, u.key("manifest.json")) == (
        "my-bucket",
        "templates/base",
        "templates/base/manifest.json",
    )
    assert str(u) == "s3://my-bucket/templates/base"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("/tmp/mem", "is not an s3://BUCKET/PREFIX URL"),
        ("s3://", "is not a valid bucket name"),
        ("s3://Bad_Bucket/x", "is not a valid bucket name"),
        ("s3://bucket", "give a prefix"),
        ("s3://bucket/a/../b", "'..'"),
    ],
)
def test_bad_s3_urls_are_refused_with_the_reason(text, why):
    with pytest.raises(StoreError, match=why):
        parse_s3_url(text)


def _manifest(size: int = 3 * MIB, chunk: int = MIB) -> Manifest:
    n = (size + chunk - 1) // chunk
    zeros = bytearray(size // PAGE)
    zeros[chunk // PAGE : 2 * chunk // PAGE] = b"\x01" * (chunk // PAGE)  # chunk 1 all zero
    chunks = tuple(None if i == 1 else sha256(bytes([i])) for i in range(n))
    return Manifest(size=size, chunk_size=chunk, chunks=chunks, zero_pages=bytes(zeros))


def test_manifest_round_trips():
    m = _manifest()
    again = parse_manifest(m.to_json(), "m")
    assert again == m
    assert again.chunk_key(2) == "chunks/" + m.chunks[2]
    assert again.stored_bytes == 2 * MIB


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"format": "other"}, "not a pagefork-template manifest"),
        ({"version": 4}, "format version 4 is newer than this pagefork reads"),
        ({"version": 0}, r"format version 0 is not one of \(1, 2, 3\)"),
        ({"chunk_size": 3 << 20}, "not a power of two"),
        ({"size": -1}, "size -1"),
        ({"chunks": []}, "chunks must be a list of 3 entries"),
        ({"chunks": [None, None, "xyz"]}, "chunk 2: 'xyz'"),
        ({"chunks": [None, None, None]}, "chunk 0 is null .* marks data"),
        ({"zero_pages": "!!"}, "zero_pages does not decode"),
        ({"chunks_prefix": "../x/"}, "chunks_prefix"),
        ({"vmstate": {"key": "v"}}, "vmstate must be null"),
    ],
)
def test_a_bad_manifest_names_the_field(change, why):
    import json

    doc = json.loads(_manifest().to_json())
    doc.update(change)
    with pytest.raises(StoreError, match=f"manifest s3://b/p/manifest.json: .*{why}"):
        parse_manifest(json.dumps(doc).encode(), "s3://b/p/manifest.json")
    with pytest.raises(StoreError, match="not JSON"):
        parse_manifest(b"\xff{", "m")


def test_a_manifest_whose_zero_map_inflates_too_far_is_refused():
    import base64
    import json
    import zlib

    doc = json.loads(_manifest().to_json())
    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in about 64 KiB
    doc["zero_pages"] = base64.b64encode(bomb).decode()
    with pytest.raises(StoreError, match="zero_pages must hold 768 bytes"):
        parse_manifest(json.dumps(doc).encode(), "m")
    doc["size"] = 1 << 50
    with pytest.raises(StoreError, match="size 1125899906842624 is not"):
        parse_manifest(json.dumps(doc).encode(), "m")


# --- the chunk cache --------------------------------------------------------------------------


def _entry(i: int, size: int = 100_000) -> tuple[str, bytes]:
    data = bytes([i]) * size
    return sha256(data), data


def test_cache_returns_what_was_put_and_detects_corruption(tmp_path):
    cache = ChunkCache(str(tmp_path / "c"), 10 * MIB)
    sha, data = _entry(1)
    assert cache.get(sha) is None
    cache.put(sha, data)
    assert cache.get(sha, len(data)) == data
    path = tmp_path / "c" / sha
    assert path.stat().st_mode & 0o777 == 0o400  # read-only: verified once, when it entered
    path.chmod(0o600)  # a local writer must make it writable first: then it is hashed again
    path.write_bytes(b"\x02" + data[1:])
    assert cache.get(sha) is None  # detected: never handed out
    assert not path.exists() and cache.corrupt == 1
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # no temporaries left


def test_cache_evicts_least_recently_used_first_and_survives_restart(tmp_path):
    cache = ChunkCache(str(tmp_path / "c"), 350_000)
    entries = [_entry(i) for i in range(4)]
    for n, (sha, data) in enumerate(entries[:3]):
        cache.put(sha, data)
        os.utime(tmp_path / "c" / sha, (1000 + n, 1000 + n))  # a, b, c: oldest first
    assert cache.get(entries[0][0]) is not None  # a is now the most recently used
    cache.put(*entries[3])  # over the bound: evict down to 90% of it
    left = {p.name for p in (tmp_path / "c").iterdir()}
    assert left == {entries[0][0], entries[2][0], entries[3][0]}  # b went first
    assert cache.evicted == 1
    again = ChunkCache(str(tmp_path / "c"), 350_000)  # a restart: the entries are still there
    assert again.used_bytes == 300_000
    assert again.get(entries[3][0]) == entries[3][1]


def test_cache_never_removes_files_it_did_not_create(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "notes.txt").write_bytes(b"x" * 500_000)
    cache = ChunkCache(str(d), 150_000)
    for i in range(3):
        cache.put(*_entry(i))
    assert (d / "notes.txt").read_bytes() == b"x" * 500_000
    assert sum(1 for p in d.iterdir() if p.name != "notes.txt") == 1


def test_cache_is_safe_for_concurrent_writers(tmp_path):
    caches = [ChunkCache(str(tmp_path / "c"), 10 * MIB) for _ in range(4)]
    sha, data = _entry(7, 1 << 20)
    threads = [threading.Thread(target=c.put, args=(sha, data)) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c.get(sha) == data for c in caches)
    assert [p.name for p in (tmp_path / "c").iterdir()] == [sha]


def test_cache_refuses_a_bad_directory_and_size(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StoreError, match=r"cache directory .*file: "):
        ChunkCache(str(tmp_path / "file"))
    with pytest.raises(StoreError, match="positive"):
        ChunkCache(str(tmp_path / "c"), 0)
    assert parse_size("512M") == 512 << 20 and parse_size("2G") == 2 << 30
    with pytest.raises(StoreError, match="not a positive size"):
        parse_size("lots")


# --- pushing ----------------------------------------------------------------------------------


def test_push_skips_zero_chunks_and_chunks_the_bucket_has(tmp_path, s3_bucket, s3_endpoint):
    client = make_client(s3_endpoint)
    base = make_mem_file(tmp_path / "base", 1024)  # 4 MiB: 4 chunks of 1 MiB
    with open(base, "r+b") as f:
        f.seek(2 * MIB)
        f.write(bytes(MIB))  # chunk 2 all zero
    first = push(parse_s3_url(f"s3://{s3_bucket}/one"), str(base), client, chunk_size=MIB)
    assert (first.chunks, first.zero_chunks, first.uploaded_chunks) == (4, 1, 3)
    assert first.uploaded_bytes == 3 * MIB
    # A second template sharing all but one chunk uploads only that one.
    derived = tmp_path / "derived"
    derived.write_bytes(base.read_bytes())
    with open(derived, "r+b") as f:
        f.seek(3 * MIB + 5)
        f.write(b"changed")
    second = push(parse_s3_url(f"s3://{s3_bucket}/two"), str(derived), client, chunk_size=MIB)
    assert (second.uploaded_chunks, second.present_chunks) == (1, 2)
    assert second.uploaded_bytes == MIB
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix="chunks/")["Contents"]
    assert len(listed) == 4  # 3 + 1: stored once, shared
    raw = get_bytes(client, s3_bucket, "two/manifest.json")
    m = parse_manifest(raw, "two")
    assert m.chunks[2] is None and m.chunks[0] == first.manifest.chunks[0]
    # Every 4th page is zero, and chunk 2; page 768 got the change.
    expected = [1 if (i % 4 == 0 and i != 768) or 512 <= i < 768 else 0 for i in range(1024)]
    assert m.zero_pages == bytes(expected)


def test_push_uploads_side_files_and_refuses_a_corrupt_hot_page_list(
    tmp_path, s3_bucket, s3_endpoint
):
    client = make_client(s3_endpoint)
    mem = make_mem_file(tmp_path / "mem", 256)
    (tmp_path / "vmstate").write_bytes(b"state")
    (tmp_path / "bad.hpl").write_bytes(b"garbage")
    with pytest.raises(PageforkError, match=r"bad\.hpl"):
        push(
            parse_s3_url(f"s3://{s3_bucket}/t"),
            str(mem),
            client,
            hot_pages=str(tmp_path / "bad.hpl"),
        )
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket)  # nothing uploaded
    result = push(
        parse_s3_url(f"s3://{s3_bucket}/t"), str(mem), client, vmstate=str(tmp_path / "vmstate")
    )
    assert result.manifest.vmstate is not None
    assert get_bytes(client, s3_bucket, result.manifest.vmstate.key) == b"state"


def test_push_to_a_missing_bucket_is_one_line(tmp_path, s3_endpoint):
    mem = make_mem_file(tmp_path / "mem", 16)
    with pytest.raises(StoreError, match=r"^s3://no-such-bucket-here: the bucket does not exist$"):
        push(parse_s3_url("s3://no-such-bucket-here/t"), str(mem), make_client(s3_endpoint))


def test_pushing_again_repairs_corrupt_chunks(tmp_path, s3_bucket, s3_endpoint):
    """A chunk overwritten with the wrong size or without its recorded SHA-256 is uploaded
    again by a plain push; one with the right size and metadata but wrong bytes only by
    ``verify``, which reads every chunk back."""
    client = make_client(s3_endpoint)
    mem = make_mem_file(tmp_path / "mem", 1024)  # 4 chunks of 1 MiB, none zero
    url = parse_s3_url(f"s3://{s3_bucket}/t")
    m = push(url, str(mem), client, chunk_size=MIB).manifest
    keys = [m.chunk_key(i) for i in range(4)]
    put_bytes(client, s3_bucket, keys[0], b"\x01" * 10)  # wrong size
    put_bytes(client, s3_bucket, keys[1], b"\x01" * MIB)  # right size, no SHA-256 recorded
    sly = m.chunks[2]
    assert sly is not None
    put_bytes(client, s3_bucket, keys[2], b"\x01" * MIB, {"sha256": sly})  # lies in full
    again = push(url, str(mem), client, chunk_size=MIB)
    assert (again.uploaded_chunks, again.repaired_chunks, again.present_chunks) == (2, 2, 2)
    data = mem.read_bytes()
    assert get_bytes(client, s3_bucket, keys[0]) == data[:MIB]
    assert get_bytes(client, s3_bucket, keys[1]) == data[MIB : 2 * MIB]
    assert get_bytes(client, s3_bucket, keys[2]) == b"\x01" * MIB  # a HEAD cannot tell
    verified = push(url, str(mem), client, chunk_size=MIB, verify=True)
    assert (verified.repaired_chunks, verified.present_chunks) == (1, 3)
    assert get_bytes(client, s3_bucket, keys[2]) == data[2 * MIB : 3 * MIB]


@pytest.mark.parametrize("prefix", ["../", "a/../", "a//", "./", "chunks"])
def test_push_refuses_a_chunk_prefix_readers_would_refuse(prefix, tmp_path, s3_bucket, s3_endpoint):
    client = make_client(s3_endpoint)
    mem = make_mem_file(tmp_path / "mem", 16)
    with pytest.raises(StoreError, match=f"chunks prefix {re.escape(repr(prefix))}"):
        push(parse_s3_url(f"s3://{s3_bucket}/t"), str(mem), client, chunks_prefix=prefix)
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket)


def test_a_side_file_larger_than_its_manifest_says_is_not_read(tmp_path, s3_bucket, s3_endpoint):
    """A manifest naming a 5-byte vmstate whose object is 8 MiB: refused after at most its
    stated size, not read whole."""
    client = make_client(s3_endpoint)
    mem = make_mem_file(tmp_path / "mem", 256)
    (tmp_path / "vmstate").write_bytes(b"state")
    url = f"s3://{s3_bucket}/t"
    vmstate = push(
        parse_s3_url(url), str(mem), client, vmstate=str(tmp_path / "vmstate")
    ).manifest.vmstate
    assert vmstate is not None and vmstate.size == 5
    put_bytes(client, s3_bucket, vmstate.key, bytes(8 * MIB))
    with pytest.raises(StoreError, match=r"larger than 5 bytes"):
        fetch_pushed(url, StoreOptions(endpoint_url=s3_endpoint))


_WRITER = """
import hashlib, os, sys
from pagefork.store.cache import ChunkCache
cache = ChunkCache(sys.argv[1], 8 << 20)
print("ready", flush=True)
sys.stdin.readline()  # both start writing together
for _ in range(15):
    data = os.urandom(1 << 19)
    cache.put(hashlib.sha256(data).hexdigest(), data)
"""


def test_processes_sharing_a_cache_keep_it_within_the_bound(tmp_path):
    """Two processes each write 7.5 MiB into one cache bounded at 8 MiB: together 15 MiB, but
    the directory, rescanned as they write, stays within the bound."""
    d = tmp_path / "shared"
    d.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(d)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.close()
    for p in procs:
        assert p.wait(60) == 0
        assert p.stdout is not None
        p.stdout.close()
    on_disk = sum(f.stat().st_size for f in d.iterdir())
    assert on_disk <= 8 * MIB, on_disk / MIB
    assert not [f for f in d.iterdir() if f.name.startswith(".tmp-")]
