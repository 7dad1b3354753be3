"""Uploading a template: chunk, hash, skip zeros and what the bucket has, upload in parallel.

The mem-file is read once, a chunk at a time. An all-zero chunk is recorded as ``null`` and
never stored; every other chunk is stored once under its SHA-256 (kept as its ``sha256``
metadata too), after a HEAD shows the bucket lacks it. A chunk whose HEAD shows another size or
SHA-256 is uploaded again, and ``verify`` GETs and hashes every chunk already there, so pushing
again repairs a corrupt bucket. Uploads run on a thread pool, with at most ``2 * jobs`` chunks
read ahead, so memory stays bounded whatever the template's size. The manifest goes last: a
reader never sees a manifest whose chunks are not all there. It is stored twice: as
``manifest.json`` and as ``manifests/<its SHA-256>.json``, which later pushes never overwrite
(nor the side files, named by their SHA-256), so templates pinned to it keep their memory.

A push with a hot-page list also uploads the hot pack (:mod:`pagefork.store.hotpack`): the hot
pages themselves, in first-touch order, in one object the manifest indexes. It is uploaded on
every push (it is the size of the hot set), so pushing again repairs a damaged one.

The manifest also records a SHA-256 per ``block_size`` piece of every chunk (64 KiB unless
chosen otherwise; 0: none), so a reader can verify one block of a chunk on its own and serve a
page fault before the rest of its chunk arrives.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pagefork.errors import StoreError
from pagefork.files import open_regular, read_regular
from pagefork.hotpages import HotPageList, decode
from pagefork.layers.capture import ChainPages
from pagefork.memfile import scan_zero_pages
from pagefork.regions import PAGE_SIZE
from pagefork.store import client as s3
from pagefork.store.hotpack import build_pack, hot_file_pages
from pagefork.store.layout import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CHUNKS_PREFIX,
    MANIFEST_NAME,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    SHA_METADATA,
    Blob,
    Manifest,
    S3Url,
    block_digests_of,
    sha256,
    valid_block_size,
    valid_chunks_prefix,
)

#: Largest side object (vmstate, hot-page list) a push reads.
_MAX_SIDE_FILE = 1 << 30
#: Uploads in flight at once, unless chosen otherwise.
DEFAULT_JOBS = 16

#: The object names of the side files, under the template's prefix.
_SIDE_NAMES = {"hot_pages": "hot-pages-{}.hpl", "vmstate": "vmstate-{}"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PushResult:
    """What one push did: chunks in the template, of which zero, already in the bucket, and
    uploaded (of those, ``repaired``: in the bucket but bad); bytes uploaded (chunks only) and
    the seconds it took."""

    manifest: Manifest
    chunks: int
    zero_chunks: int
    present_chunks: int
    uploaded_chunks: int
    uploaded_bytes: int
    seconds: float
    repaired_chunks: int = 0
    #: Bytes of the hot pack uploaded (0 without one).
    pack_bytes: int = 0
    #: A layer push's: bytes of the layer pack uploaded (its pages) and its page count.
    layer_bytes: int = 0
    layer_pages: int = 0


def push(
    url: S3Url,
    mem_file: str,
    client: Any,
    *,
    hot_pages: str | None = None,
    vmstate: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunks_prefix: str = DEFAULT_CHUNKS_PREFIX,
    jobs: int = DEFAULT_JOBS,
    progress: Progress | None = None,
    layers: Sequence[str] = (),
    verify: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> PushResult:
    """Upload ``mem_file`` (and the optional side files) as the template at ``url``. With
    ``layers`` (layer files over the mem-file, bottom first) the memory pushed is what a fork
    of that layered template reads: the chunks it shares with its parent are already in the
    bucket and are not uploaded again, so a pushed snapshot costs the chunks it changed. With
    ``verify`` every chunk the bucket has is read back and hashed; a bad one is uploaded again.
    ``block_size`` (0: none) is the piece of a chunk the manifest gives a SHA-256 of its own."""
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise StoreError(
            f"chunk size {chunk_size} must be a power of two in "
            f"[{MIN_CHUNK_SIZE >> 10} KiB, {MAX_CHUNK_SIZE >> 20} MiB]"
        )
    block_size = min(block_size, chunk_size)  # a block never spans chunks
    if block_size and not valid_block_size(block_size, chunk_size):
        raise StoreError(f"block size {block_size} must be a power of two of whole pages, or 0")
    if jobs < 1:
        raise StoreError(f"jobs must be at least 1, not {jobs}")
    if not valid_chunks_prefix(chunks_prefix):  # the reader's own check
        raise StoreError(
            f"chunks prefix {chunks_prefix!r} must be a key prefix ending in '/' with no empty, "
            "'.' or '..' part"
        )
    side, hot = read_side_files(hot_pages, vmstate)
    chain = ChainPages([mem_file, *layers]) if layers else None
    fd = open_regular(mem_file, "mem-file", error=StoreError) if chain is None else -1
    started = time.monotonic()
    try:
        size = os.fstat(fd).st_size if chain is None else chain.size
        if size == 0:
            raise StoreError(f"mem-file {mem_file}: file is empty")
        s3.check_bucket(client, url.bucket)  # fail early: endpoint, bucket, credentials
        nchunks = (size + chunk_size - 1) // chunk_size
        shas: list[str | None] = [None] * nchunks
        blocks: list[bytes] = [b""] * nchunks  # per-block digests (none for a zero chunk)
        zeros = bytearray()
        done = [0]
        tally = {"present": 0, "uploaded": 0, "bytes": 0, "repaired": 0}
        seen: set[str] = set()
        lock = threading.Lock()

        def upload(sha: str, data: bytes) -> None:
            key = chunks_prefix + sha
            state = _in_bucket(client, url.bucket, key, sha, data, verify)
            kind = "present" if state == "good" else "uploaded"
            if kind == "uploaded":
                s3.put_bytes(client, url.bucket, key, data, {SHA_METADATA: sha})
            with lock:
                tally[kind] += 1
                if state == "bad":
                    tally["repaired"] += 1
                if kind == "uploaded":
                    tally["bytes"] += len(data)
                done[0] += len(data)
                if progress is not None:
                    progress(done[0], size)

        with concurrent.futures.ThreadPoolExecutor(jobs, "pagefork-push") as pool:
            inflight: set[concurrent.futures.Future[None]] = set()
            for i in range(nchunks):
                length = min(chunk_size, size - i * chunk_size)
                if chain is None:
                    data = os.pread(fd, length, i * chunk_size)
                else:  # chunks are whole pages: the layers' pages laid over the base
                    data = chain.read_range(i * chunk_size // PAGE_SIZE, length // PAGE_SIZE)
                if len(data) != length:
                    raise StoreError(f"mem-file {mem_file}: shrank while being read")
                page_zeros = scan_zero_pages(data)
                zeros += page_zeros
                if page_zeros.find(0) < 0:
                    with lock:
                        done[0] += length
                        if progress is not None:
                            progress(done[0], size)
                    continue  # an all-zero chunk is never stored
                sha = sha256(data)
                shas[i] = sha
                if block_size:
                    blocks[i] = block_digests_of(data, block_size)
                if sha in seen:  # the same content twice in this template: stored once
                    with lock:
                        done[0] += length
                    continue
                seen.add(sha)
                inflight.add(pool.submit(upload, sha, data))
                if len(inflight) >= 2 * jobs:
                    finished, inflight = concurrent.futures.wait(
                        inflight, return_when=concurrent.futures.FIRST_COMPLETED
                    )
                    for fut in finished:
                        fut.result()  # the first failure stops the push
            for fut in concurrent.futures.as_completed(inflight):
                fut.result()
        blobs = upload_side_files(url, client, side)
        zero_map = bytes(zeros[: (size + PAGE_SIZE - 1) // PAGE_SIZE])
        packed = None
        if hot is not None:

            def read_page(page: int) -> bytes:
                if chain is None:
                    return os.pread(fd, PAGE_SIZE, page * PAGE_SIZE)
                return bytes(chain.read_range(page, 1))

            packed = build_pack(url, hot_file_pages(hot, len(zero_map)), read_page, zero_map)
            if packed is not None:
                s3.put_bytes(client, url.bucket, packed[0].key, packed[1])
        manifest = Manifest(
            size=size,
            chunk_size=chunk_size,
            chunks=tuple(shas),
            zero_pages=zero_map,
            chunks_prefix=chunks_prefix,
            hot_pages=blobs.get("hot_pages"),
            vmstate=blobs.get("vmstate"),
            hot_pack=None if packed is None else packed[0],
            block_size=block_size,
            block_digests=tuple(blocks) if block_size else (),
        )
        put_manifest(url, client, manifest)
    finally:
        if chain is not None:
            chain.close()
        else:
            os.close(fd)
    return PushResult(
        manifest=manifest,
        chunks=nchunks,
        zero_chunks=sum(1 for s in shas if s is None),
        present_chunks=tally["present"],
        uploaded_chunks=tally["uploaded"],
        uploaded_bytes=tally["bytes"],
        seconds=time.monotonic() - started,
        repaired_chunks=tally["repaired"],
        pack_bytes=0 if packed is None else len(packed[1]),
    )


def read_side_files(
    hot_pages: str | None, vmstate: str | None
) -> tuple[dict[str, bytes], HotPageList | None]:
    """The side files to push (by manifest field) and the hot-page list, decoded (a corrupt
    one is refused before anything is uploaded)."""
    side: dict[str, bytes] = {}
    hot: HotPageList | None = None
    if hot_pages is not None:
        data = read_regular(hot_pages, "hot-page file", limit=_MAX_SIDE_FILE, error=StoreError)
        assert data is not None
        hot = decode(data, hot_pages)
        side["hot_pages"] = data
    if vmstate is not None:
        data = read_regular(vmstate, "vmstate", limit=_MAX_SIDE_FILE, error=StoreError)
        assert data is not None
        side["vmstate"] = data
    return side, hot


def upload_side_files(url: S3Url, client: Any, side: dict[str, bytes]) -> dict[str, Blob]:
    """Upload the side files, each named by its SHA-256 under the template's prefix."""
    blobs: dict[str, Blob] = {}
    for name, data in side.items():
        digest = sha256(data)
        key = url.key(_SIDE_NAMES[name].format(digest))
        s3.put_bytes(client, url.bucket, key, data)
        blobs[name] = Blob(key, digest, len(data))
    return blobs


def put_manifest(url: S3Url, client: Any, manifest: Manifest) -> str:
    """Store ``manifest`` as ``manifests/<sha256>.json`` (kept for pins) and then as the
    prefix's ``manifest.json``; its SHA-256."""
    doc = manifest.to_json()
    digest = sha256(doc)
    s3.put_bytes(client, url.bucket, s3.pinned_key(url, digest), doc)
    s3.put_bytes(client, url.bucket, url.key(MANIFEST_NAME), doc)
    return digest


def _in_bucket(client: Any, bucket: str, key: str, sha: str, data: bytes, verify: bool) -> str:
    """``"good"`` when the bucket holds chunk ``sha`` intact at ``key`` (a HEAD shows its size
    and the SHA-256 its upload recorded; with ``verify`` its bytes are read back and hashed),
    ``"missing"``, or ``"bad"``."""
    found = s3.head(client, bucket, key)
    if found is None:
        return "missing"
    # No recorded SHA-256: written by someone else, or by a push before it was recorded; either
    # way unknown, so uploaded again (once: the upload records it).
    recorded = found.get("Metadata", {}).get(SHA_METADATA)
    if int(found.get("ContentLength", -1)) != len(data) or recorded != sha:
        return "bad"
    if verify:
        try:
            if sha256(s3.get_bytes(client, bucket, key, limit=len(data))) != sha:
                return "bad"
        except s3.TransferCorruptError:
            return "bad"  # uploaded again: cheaper than telling a bad copy from a bad transfer
    return "good"
