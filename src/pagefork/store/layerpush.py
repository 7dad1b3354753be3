"""Pushing a layer: the pages a snapshot changed, over a parent template already pushed.

``push_layer`` uploads what the topmost layer file changed, not the memory it changes: its data
pages go into one content-addressed object (``PREFIX/layer-pack-<sha256>``, in page order,
each page's SHA-256 in the manifest's index), and a version 3 manifest names the parent's
manifest by its pinned key and SHA-256. Nothing else of the memory is uploaded, so a push
costs the bytes the guest changed.

The parent must be the memory under that layer (the mem-file and the layers below it): the
layered memory is read once, locally, a chunk at a time, and each chunk's SHA-256 is compared
with the parent's (a chunk the layer touches is compared as the memory below reads it), so a
layer is never laid over memory it was not taken over. The manifest also records the SHA-256
of every chunk of the layered memory, which is what the next layer pushed over it is
compared with.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from pagefork.errors import StoreError
from pagefork.layers.capture import ChainPages
from pagefork.layers.format import LayerFile
from pagefork.memfile import scan_zero_pages
from pagefork.regions import PAGE_SIZE
from pagefork.store import client as s3
from pagefork.store.hotpack import build_pack, hot_file_pages
from pagefork.store.layered import MAX_DEPTH, resolve_chain
from pagefork.store.layout import Manifest, ParentRef, S3Url, sha256
from pagefork.store.push import (
    Progress,
    PushResult,
    put_manifest,
    read_side_files,
    upload_side_files,
)


def push_layer(
    url: S3Url,
    mem_file: str,
    layers: Sequence[str],
    parent: S3Url,
    client: Any,
    *,
    hot_pages: str | None = None,
    vmstate: str | None = None,
    progress: Progress | None = None,
) -> PushResult:
    """Push the top of ``layers`` (layer files over ``mem_file``, bottom first) as a layer
    template at ``url`` over the template at ``parent`` (the memory of ``mem_file`` and the
    layers below the top one, pushed before, in the same bucket)."""
    if not layers:
        raise StoreError("a layer push needs a layer file (--layer) over the mem-file")
    if parent.bucket != url.bucket:
        raise StoreError(
            f"parent {parent} is in bucket {parent.bucket!r}, the layer goes to "
            f"{url.bucket!r}: a layer and its parent share a bucket"
        )
    if parent.prefix == url.prefix:
        raise StoreError(f"{url}: a layer cannot be pushed over its own prefix; give it its own")
    side, hot = read_side_files(hot_pages, vmstate)
    started = time.monotonic()
    s3.check_bucket(client, url.bucket)
    try:
        pm, psha = s3.read_pinned(client, parent)
    except StoreError as exc:  # say which URL of the command line it is about
        raise StoreError(f"parent {parent}: {exc}") from None
    parent_key = s3.pinned_key(parent, psha)
    if pm.is_layer:  # every manifest below it must be there and right, or no fork would run
        below_chain = resolve_chain(client, parent.bucket, pm, str(parent.pinned(psha)), None)
        if below_chain.depth + 1 > MAX_DEPTH:
            raise StoreError(
                f"parent {parent} is a layer chain of {below_chain.depth} templates: a layer "
                f"over it would be deeper than {MAX_DEPTH}, which no host serves: push the "
                "memory whole (without --parent) to start a new chain"
            )
    if not s3.exists(client, parent.bucket, parent_key):  # what the layer will point to
        raise StoreError(
            f"parent {parent}: s3://{parent.bucket}/{parent_key} is missing: push the parent "
            "template again, then the layer"
        )
    with contextlib.ExitStack() as stack:
        top = stack.enter_context(LayerFile(layers[-1]))
        chain = ChainPages([mem_file, *layers])
        stack.callback(chain.close)
        below = ChainPages([mem_file, *layers[:-1]])
        stack.callback(below.close)
        size = chain.size
        if pm.size != size:
            raise StoreError(
                f"parent {parent} is a template of {pm.size} bytes; the layered memory has "
                f"{size}: name the template pushed from {mem_file} and the layers below "
                f"{layers[-1]}"
            )
        chunk_size = pm.chunk_size
        touched: set[int] = {p * PAGE_SIZE // chunk_size for p in top.index}
        for first, count in top.zero_runs:
            last = ((first + count) * PAGE_SIZE - 1) // chunk_size
            touched.update(range(first * PAGE_SIZE // chunk_size, last + 1))
        nchunks = (size + chunk_size - 1) // chunk_size
        shas: list[str | None] = []
        zeros = bytearray()
        for i in range(nchunks):
            first = i * chunk_size // PAGE_SIZE
            count = (min(chunk_size, size - i * chunk_size) + PAGE_SIZE - 1) // PAGE_SIZE
            data = chain.read_range(first, count)
            page_zeros = scan_zero_pages(data)
            zeros += page_zeros
            sha = None if page_zeros.find(0) < 0 else sha256(data)
            shas.append(sha)
            under = sha
            if i in touched:
                lower = below.read_range(first, count)
                under = None if scan_zero_pages(lower).find(0) < 0 else sha256(lower)
            if under != pm.chunks[i]:
                raise StoreError(
                    f"parent {parent} is not the memory under layer {layers[-1]} (chunk {i} "
                    f"differs): name the template pushed from {mem_file} and the layers below "
                    "it, or push that first"
                )
            if progress is not None:
                progress(min(size, (i + 1) * chunk_size), size)
        zero_map = bytes(zeros[: (size + PAGE_SIZE - 1) // PAGE_SIZE])
        packed = build_pack(
            url, sorted(top.index), lambda p: bytes(chain.read_range(p, 1)), zero_map, "layer-pack"
        )
        if packed is not None:
            s3.put_bytes(client, url.bucket, packed[0].key, packed[1])
        blobs = upload_side_files(url, client, side)
        hot_pack = None
        if hot is not None:
            made = build_pack(
                url,
                hot_file_pages(hot, len(zero_map)),
                lambda p: bytes(chain.read_range(p, 1)),
                zero_map,
            )
            if made is not None:
                s3.put_bytes(client, url.bucket, made[0].key, made[1])
                hot_pack = made
        manifest = Manifest(
            size=size,
            chunk_size=chunk_size,
            chunks=tuple(shas),
            zero_pages=zero_map,
            hot_pages=blobs.get("hot_pages"),
            vmstate=blobs.get("vmstate"),
            hot_pack=None if hot_pack is None else hot_pack[0],
            parent=ParentRef(parent_key, psha),
            layer_pack=None if packed is None else packed[0],
        )
        put_manifest(url, client, manifest)
    return PushResult(
        manifest=manifest,
        chunks=nchunks,
        zero_chunks=sum(1 for s in shas if s is None),
        present_chunks=0,
        uploaded_chunks=0,
        uploaded_bytes=0,
        seconds=time.monotonic() - started,
        pack_bytes=0 if hot_pack is None else len(hot_pack[1]),
        layer_bytes=0 if packed is None else len(packed[1]),
        layer_pages=0 if packed is None else len(packed[0].pages),
    )
