"""A demand fault on a cold chunk is served first: one verified block, then the rest.

A worker whose fault lands in a chunk not yet on this host parks it and names the faulting
file offset (:class:`~pagefork.serving.messages.Need`). When the template's manifest has
per-block digests (:mod:`pagefork.store.layout`: a SHA-256 per ``block_size`` piece of every
chunk, 64 KiB by default), the supervisor does not wait for the whole chunk
(:meth:`~pagefork.store.lazy.LazyTemplate.request_page`):

1. It fetches the one block around the faulting page with a ranged GET of the chunk's object,
   checks it against that block's digest (:func:`fetch_block`), writes it into the view, and
   only then sets the presence byte of each of its pages. The parked fault is answered.
2. It then fetches the whole chunk in the background, as any chunk is (one future per chunk,
   so every other fault in it waits on that one GET), verified against the chunk's SHA-256.
   That write skips the pages already present, so a page a worker may be copying is never
   written again.

How verification covers every byte before it reaches a guest: a worker copies a page only
when its chunk's presence byte or its own page byte is set. A chunk's byte is set only after
the whole chunk matched its SHA-256; a page's byte only after the block holding it matched its
block digest (or, for a hot-pack page, its page digest). The digests come from the manifest,
itself checked as it was read (pinned by SHA-256 when the URL is). A block that does not match
is fetched once more; nothing of it is written to the view. If it still cannot be had verified
(a corrupt object, or a store that ignores byte ranges or answers the wrong one), the whole
chunk is fetched instead and decides: served if it matches its SHA-256, else the forks
waiting on it fail with an error naming the object and the repair.

A manifest without block digests (pushed before they were recorded, or with a block size of
0) keeps the whole-chunk path: the fault waits for its chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pagefork.errors import StoreError
from pagefork.store import client as s3
from pagefork.store.layout import Manifest, S3Url


def block_of(manifest: Manifest, chunk: int, offset: int) -> tuple[int, int, int] | None:
    """(block, its first byte in the file, its length) of the block of ``chunk`` that holds
    file offset ``offset``; None when the manifest has no block digests, the chunk is one
    block, or ``offset`` is not in a stored chunk."""
    if not manifest.block_size or manifest.chunks[chunk] is None:
        return None
    if manifest.block_size >= manifest.chunk_length(chunk):
        return None  # one block is the chunk: fetched whole, verified against its SHA-256
    start = chunk * manifest.chunk_size
    within = offset - start
    if not 0 <= within < manifest.chunk_length(chunk):
        return None
    block = within // manifest.block_size
    first = block * manifest.block_size
    length = min(manifest.block_size, manifest.chunk_length(chunk) - first)
    return block, start + first, length


def chunk_error(
    where: str, url: S3Url, key: str, exc: StoreError, base: S3Url | None = None
) -> StoreError:
    """``exc`` (from fetching ``key``, a chunk's object, or a block of it) as the one-line
    error its forks fail with: what is wrong, where, and how to repair it. ``base`` is the
    template whose chunk it is when that is not ``url`` (a layer template's base): the
    repair is then to push that one, not the layer."""
    owner = url if base is None else base
    whose = "" if base is None else f" (a chunk of {url}'s parent template {base})"
    if isinstance(exc, s3.CorruptObjectError):
        return StoreError(
            f"{where}: s3://{url.bucket}/{key}{whose} does not match its SHA-256 (corrupt "
            "object in the store; nothing of it was served): repair it with 'pagefork push "
            f"--verify s3://{owner.bucket}/{owner.prefix} --mem-file MEM'"
        )
    if isinstance(exc, s3.MissingObjectError):
        again = "push the template again" if base is None else f"push the parent {base} again"
        return s3.MissingObjectError(
            f"{where}: s3://{url.bucket}/{key}{whose} is gone from the bucket (deleted after "
            f"the push): {again}"
        )
    return StoreError(f"{where}: {exc}")


def fetch_block(
    client: Any,
    url: S3Url,
    manifest: Manifest,
    chunk: int,
    block: int,
    deadline: float,
    on_get: Callable[[int], None],
) -> bytes:
    """Block ``block`` of chunk ``chunk``, fetched with one ranged GET and checked against its
    digest (fetched once more if it does not match); :class:`StoreError` as
    :func:`chunk_error` says, naming the block."""
    key = manifest.chunk_key(chunk)
    first = block * manifest.block_size
    length = min(manifest.block_size, manifest.chunk_length(chunk) - first)
    where = f"block {block} of chunk {chunk} of {url}"
    try:
        return s3.get_verified_range(
            client,
            url.bucket,
            key,
            first,
            length,
            manifest.block_digest(chunk, block),
            deadline,
            patient=True,
            on_get=on_get,
        )
    except StoreError as exc:
        raise chunk_error(where, url, key, exc) from None
