"""A layer template served lazily: its own pages from its layer pack, the rest from its parent.

A layer manifest (version 3, :mod:`pagefork.store.layout`) names its parent's manifest by key
and SHA-256 and holds a pack of the pages it changed. Serving one resolves the chain once, on
the first fetch a fork needs (never at open, so a broken chain fails the forks that need it,
not the host): each parent manifest is read (from the host cache when a template of this chain
was served here before, else one GET), checked against the SHA-256 its child pins, down to the
first manifest that is not a layer, the *base*, whose chunks hold every page no layer changed.
Then the layer packs are fetched, top layer first, each page checked against its own SHA-256
and installed in the view with its per-page presence byte (the hot pack's machinery:
:func:`~pagefork.store.hotpack.fetch_pack`); a page a higher layer already installed is not
installed again, so the top layer wins. Only after that may a base chunk be written to the view,
and it writes only the pages not already in: a guest never sees a parent's page where the
layer changed it.

A host that already holds the parent's chunks in its cache thus fetches only the layer's pack
(and its own manifest). A chain deeper than :data:`MAX_DEPTH` is refused with one line.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagefork.errors import StoreError
from pagefork.store import client as s3
from pagefork.store.cache import ChunkCache
from pagefork.store.hotpack import RANGES, fetch_pack
from pagefork.store.layout import (
    MAX_MANIFEST_BYTES,
    PINNED_MANIFESTS,
    HotPack,
    Manifest,
    S3Url,
    parse_manifest,
    parse_s3_url,
    sha256,
)

#: The most layers a template may sit on (itself included): a longer chain is refused.
MAX_DEPTH = 16

Install = Callable[[int, bytes], None]


@dataclass(frozen=True)
class ResolvedChain:
    """A layer template's chain: the base manifest whose chunks serve every page no layer
    holds, and the layer packs, top layer first."""

    base: Manifest
    packs: tuple[HotPack, ...]
    #: The base template (pinned to its manifest): what a damaged base chunk's error names,
    #: since pushing that template again, not the layer, repairs it.
    base_url: S3Url
    #: Templates in the chain, the top one and the base included.
    depth: int = 1


def template_of(bucket: str, key: str, sha: str) -> S3Url:
    """The template (pinned) whose manifest ``key`` is: ``PREFIX/manifests/<sha>.json`` is
    ``s3://BUCKET/PREFIX#sha256=<sha>``; a key of another shape is named as it is."""
    suffix = f"/{PINNED_MANIFESTS}{sha}.json"
    if key.endswith(suffix) and len(key) > len(suffix):
        return S3Url(bucket, key[: -len(suffix)], sha)
    return S3Url(bucket, key)


def repair_hint(where: str) -> str:
    """How a damaged layer object of the template at ``where`` is repaired."""
    return (
        f"push the layer again (pagefork push {where} --mem-file MEM --layer LAYER "
        "--parent s3://BUCKET/PARENT)"
    )


def resolve_chain(
    client: Any, bucket: str, top: Manifest, where: str, cache: ChunkCache | None
) -> ResolvedChain:
    """Read ``top``'s parents down to its base (each checked against the SHA-256 its child
    pins; kept in ``cache`` by that SHA-256). :class:`StoreError` names the object that is
    missing or wrong and how to repair it, or a chain deeper than :data:`MAX_DEPTH`."""
    packs: list[HotPack] = []
    m = top
    depth = 1
    base_url = parse_s3_url(where)  # top itself, when it is not a layer
    while m.parent is not None:
        if m.layer_pack is not None:
            packs.append(m.layer_pack)
        depth += 1
        if depth > MAX_DEPTH:
            raise StoreError(
                f"{where}: its layer chain is deeper than {MAX_DEPTH} templates: push it "
                "without --parent (the whole memory) to start a new chain"
            )
        ref = m.parent
        url = f"s3://{bucket}/{ref.key}"
        data = cache.get(ref.sha256) if cache is not None else None
        if data is not None and sha256(data) != ref.sha256:
            # A manifest is small: hashed even from the cache, so an entry damaged in place
            # (by root, or this user behind the cache's back) is fetched again, not a fork
            # that fails on this host forever.
            data = None
        if data is None:
            try:
                data = s3.get_bytes(client, bucket, ref.key, MAX_MANIFEST_BYTES)
            except StoreError as exc:
                if isinstance(exc, s3.MissingObjectError):
                    raise StoreError(
                        f"{where}: parent manifest {url} is gone from the bucket: push the "
                        f"parent template again from the same files, or {repair_hint(where)} "
                        "over a parent the bucket holds"
                    ) from None
                raise StoreError(f"{where}: parent manifest {exc}") from None
            if sha256(data) != ref.sha256:
                raise StoreError(
                    f"{where}: parent manifest {url} does not match the SHA-256 its child pins "
                    f"({ref.sha256[:12]}...; corrupt or replaced, nothing of it was served): "
                    "push the parent template again from the same files"
                )
            if cache is not None:
                cache.put(ref.sha256, data)
        parent = parse_manifest(data, url)
        if parent.size != m.size or parent.chunk_size != m.chunk_size:
            raise StoreError(
                f"{where}: parent manifest {url} is a template of {parent.size} bytes in "
                f"{parent.chunk_size}-byte chunks, not {m.size} in {m.chunk_size}: "
                f"{repair_hint(where)} over its real parent"
            )
        m = parent
        base_url = template_of(bucket, ref.key, ref.sha256)
    return ResolvedChain(m, tuple(packs), base_url, depth)


class LayerOverlay:
    """The layer pages of one layer template, brought into its view once.

    :meth:`ensure` resolves the chain and installs every layer page (``install(page, bytes)``,
    called only for verified pages), then returns the base manifest; concurrent callers wait
    for the one fetch, and one that failed is tried again by the next caller. Its ranged GETs
    run on a pool of its own: the callers are the template's chunk fetchers, so the fetch must
    not wait for a thread of theirs.
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        top: Manifest,
        where: str,
        cache: ChunkCache | None,
        install: Install,
    ) -> None:
        self._client = client
        self._bucket = bucket
        self._top = top
        self._where = where
        self._cache = cache
        self._install = install
        self._lock = threading.Lock()
        #: The GETs of layer packs made and the bytes they brought.
        self.gets = 0
        self.fetched_bytes = 0
        self._count_lock = threading.Lock()
        self._chain: ResolvedChain | None = None
        self._ready = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    @classmethod
    def of(
        cls, client: Any, url: S3Url, top: Manifest, cache: ChunkCache | None, install: Install
    ) -> LayerOverlay | None:
        """The overlay of the template at ``url`` whose manifest is ``top``; None when it is
        not a layer template."""
        if not top.is_layer:
            return None
        return cls(client, url.bucket, top, str(url), cache, install)

    @property
    def base_url(self) -> S3Url | None:
        """The base template whose chunks serve the pages no layer holds (None until the
        chain is resolved)."""
        return None if self._chain is None else self._chain.base_url

    @property
    def ready(self) -> bool:
        """True once every layer page is in the view."""
        return self._ready

    def bring_in(self, timeout: float) -> int:
        """:meth:`ensure`, returning the bytes it fetched (0 when the pages were in)."""
        if self._ready:
            return 0
        before = self.fetched_bytes
        self.ensure(timeout)
        return self.fetched_bytes - before

    def _counted(self, n: int) -> None:
        with self._count_lock:
            self.gets += 1
            self.fetched_bytes += n

    def ensure(self, timeout: float) -> Manifest:
        """Bring every layer page into the view (once); the base manifest."""
        if self._ready:
            assert self._chain is not None
            return self._chain.base
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._where}: template closed")
            if self._ready:
                assert self._chain is not None
                return self._chain.base
            deadline = time.monotonic() + timeout
            if self._chain is None:
                self._chain = resolve_chain(
                    self._client, self._bucket, self._top, self._where, self._cache
                )
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(RANGES, "pagefork-layer")
            for pack in self._chain.packs:  # top first: a page it installs is never replaced
                fetch_pack(
                    self._client,
                    self._bucket,
                    pack,
                    self._pool,
                    self._install,
                    deadline,
                    self._counted,
                    what=f"{self._where}: layer pack",
                    repair=repair_hint(self._where),
                )
            self._ready = True
            return self._chain.base

    def close(self) -> None:
        """Stop: later :meth:`ensure` calls fail; idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
