"""Uploading a template: chunk, hash, skip zeros and what the bucket has, upload in parallel.

The mem-file is read once, a chunk at a time. An all-zero chunk is recorded as ``null`` and
never stored; every other chunk is stored once under its SHA-256, after a HEAD shows the bucket
lacks it. Uploads run on a thread pool, with at most ``2 * jobs`` chunks read ahead, so memory
stays bounded whatever the template's size. The manifest goes last: a reader never sees a
manifest whose chunks are not all there.
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
from pagefork.hotpages import decode
from pagefork.layers.capture import ChainPages
from pagefork.memfile import scan_zero_pages
from pagefork.regions import PAGE_SIZE
from pagefork.store import client as s3
from pagefork.store.layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_CHUNKS_PREFIX,
    MANIFEST_NAME,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Blob,
    Manifest,
    S3Url,
    sha256,
)

#: Largest side object (vmstate, hot-page list) a push reads.
_MAX_SIDE_FILE = 1 << 30
#: Uploads in flight at once, unless chosen otherwise.
DEFAULT_JOBS = 16

#: The object names of the side files, under the template's prefix.
_SIDE_NAMES = {"hot_pages": "hot-pages.hpl", "vmstate": "vmstate"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PushResult:
    """What one push did: chunks in the template, of which zero, already in the bucket, and
    uploaded; bytes uploaded (chunks only) and the seconds it took."""

    manifest: Manifest
    chunks: int
    zero_chunks: int
    present_chunks: int
    uploaded_chunks: int
    uploaded_bytes: int
    seconds: float


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
) -> PushResult:
    """Upload ``mem_file`` (and the optional side files) as the template at ``url``. With
    ``layers`` (layer files over the mem-file, bottom first) the memory pushed is what a fork
    of that layered template reads: the chunks it shares with its parent are already in the
    bucket and are not uploaded again, so a pushed snapshot costs the chunks it changed."""
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise StoreError(
            f"chunk size {chunk_size} must be a power of two in "
            f"[{MIN_CHUNK_SIZE >> 10} KiB, {MAX_CHUNK_SIZE >> 20} MiB]"
        )
    if jobs < 1:
        raise StoreError(f"jobs must be at least 1, not {jobs}")
    side: dict[str, bytes] = {}
    if hot_pages is not None:
        data = read_regular(hot_pages, "hot-page file", limit=_MAX_SIDE_FILE, error=StoreError)
        assert data is not None
        decode(data, hot_pages)  # refuse a corrupt list before uploading
        side["hot_pages"] = data
    if vmstate is not None:
        data = read_regular(vmstate, "vmstate", limit=_MAX_SIDE_FILE, error=StoreError)
        assert data is not None
        side["vmstate"] = data
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
        zeros = bytearray()
        done = [0]
        tally = {"present": 0, "uploaded": 0, "bytes": 0}
        seen: set[str] = set()
        lock = threading.Lock()

        def upload(sha: str, data: bytes) -> None:
            key = chunks_prefix + sha
            if s3.exists(client, url.bucket, key):
                kind = "present"
            else:
                s3.put_bytes(client, url.bucket, key, data)
                kind = "uploaded"
            with lock:
                tally[kind] += 1
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
        blobs: dict[str, Blob] = {}
        for name, data in side.items():
            key = url.key(_SIDE_NAMES[name])
            s3.put_bytes(client, url.bucket, key, data)
            blobs[name] = Blob(key, sha256(data), len(data))
        manifest = Manifest(
            size=size,
            chunk_size=chunk_size,
            chunks=tuple(shas),
            zero_pages=bytes(zeros[: (size + PAGE_SIZE - 1) // PAGE_SIZE]),
            chunks_prefix=chunks_prefix,
            hot_pages=blobs.get("hot_pages"),
            vmstate=blobs.get("vmstate"),
        )
        s3.put_bytes(client, url.bucket, url.key(MANIFEST_NAME), manifest.to_json())
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
    )
