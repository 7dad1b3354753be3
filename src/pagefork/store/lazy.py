"""A template served lazily from object storage.

:class:`LazyTemplate` stands where a :class:`~pagefork.memfile.MemFile` stands in the page
server: workers map its :attr:`~LazyTemplate.fd` read-only and copy pages from it. That fd is a
sparse memfd, the *view*, which the supervisor fills a chunk at a time. A chunk reaches the
view only after its SHA-256 was checked, and only then is its byte in the *presence map* (a
second memfd, one byte per chunk, mapped by every worker) set. A worker that faults in a chunk
whose byte is 0 parks the fault and asks for the chunk; the answer is a ``chunk_ready`` (serve
the parked faults) or a ``chunk_failed`` (fail their forks). So no byte a guest sees was not
verified first.

Fetches run on a thread pool (which bounds their concurrency) and are coalesced: one future,
so one GET, per chunk, however many forks and workers wait for it. The host's
:class:`~pagefork.store.cache.ChunkCache` is read first and written after each fetch. All-zero
chunks are never stored: their presence byte is set at open (a memfd hole reads as zero), and
the manifest's zero-page map keeps every zero page off the copy path anyway.

A chunk is verified twice over: its bytes against its SHA-256, and every page the manifest's
zero map marks zero against those bytes (a lying map would otherwise give a guest zeros where
the template has data); a transfer that arrives corrupt, or bytes that do not match, are
fetched once more before the chunk is declared corrupt. Each chunk has
:data:`~pagefork.store.client.DEADLINE` seconds (a minute; ``fetch_deadline``) for all its
attempts, reads included: a store that hangs, trickles or stays away fails its forks, not the
host, while one that refuses connections, resets them or answers 5xx for a while (restarting) is
waited out within that time.
The manifest is read once, when the template opens: a ``#sha256=`` pin fixes which one.

A template pushed with a hot pack (:mod:`pagefork.store.hotpack`) also has presence per page:
the presence map holds, after its byte per chunk, a byte per page, set for each page installed
from the pack (verified against its own SHA-256). A worker's fault on such a page is served at
once, though its chunk is not in; a prefetch fetches the pack and only the chunks of hot pages
the pack lacks; and a chunk fetched later writes only the pages not already in, so it never
overwrites a page a worker may be copying.

A layer template (a manifest laid over a parent, :mod:`pagefork.store.layered`) uses the same
per-page presence: before its first chunk is written, every page its layers changed is
installed from their packs, and the chunks that serve the rest are its base template's.

Per-page presence serves two more paths. A fault on a chunk not yet on the host, in a template
whose manifest has per-block digests, is answered as soon as the block around it is fetched
and verified; the chunk follows in the background (:mod:`pagefork.store.coldfault` says how
every byte is still verified first). And a template (not a layer one) opened on a host whose
cache holds its chunks installs them all into the view at once, in the background (one read
each, no hashing: the cache verified them when they entered it, :mod:`pagefork.store.cache`
says why that is safe), so a warm host's forks never park; workers started after that map
them in at once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pagefork.errors import StoreError
from pagefork.hotpages import HotPageList, decode
from pagefork.memfile import MemFile, ZeroIndexed
from pagefork.regions import PAGE_SIZE, Region
from pagefork.store import client as s3
from pagefork.store.cache import ChunkCache, default_cache_dir
from pagefork.store.coldfault import block_of, chunk_error, fetch_block
from pagefork.store.hotpack import fetch_pack
from pagefork.store.layered import LayerOverlay
from pagefork.store.layout import (
    Manifest,
    is_s3_url,
    parse_s3_url,
)
from pagefork.store.publish import publish_hot_set
from pagefork.store.viewio import chunks_wanted, write_absent, write_all, zero_map_lies

log = logging.getLogger("pagefork.store")

#: Chunks fetched at once (per template), unless chosen otherwise.
DEFAULT_FETCH_JOBS = 16

ChunkFuture = concurrent.futures.Future[int]


class LazyTemplate(ZeroIndexed):
    """The template at ``url`` (``s3://BUCKET/PREFIX``), served lazily through ``cache``."""

    def __init__(
        self,
        url: str,
        cache: ChunkCache,
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        fetch_jobs: int = DEFAULT_FETCH_JOBS,
        fetch_deadline: float = s3.DEADLINE,
        warm: bool = True,
    ) -> None:
        self.url = parse_s3_url(url)
        self.path = str(self.url)
        self.cache = cache
        self.fetch_deadline = fetch_deadline
        self._own_client = client is None  # closed with the template (its connections)
        if client is None:  # no socket read outlasts a chunk's deadline
            read_timeout = min(s3.READ_TIMEOUT, fetch_deadline)
            client = s3.make_client(endpoint_url, read_timeout=read_timeout)
        self._client = client
        try:
            self.manifest: Manifest
            self.manifest, self.manifest_sha = s3.read_pinned(self._client, self.url)
        except BaseException:
            if self._own_client:
                self._client.close()
            raise
        m = self.manifest
        self.size = m.size
        self.chunk_size = m.chunk_size
        self.nchunks = len(m.chunks)
        self.npages = (m.size + PAGE_SIZE - 1) // PAGE_SIZE
        self.address = 0  # never mapped here: only workers read the view
        self._zeros = bytearray(m.zero_pages)
        self._zero_fd = -1
        self.fd = -1
        self.presence_fd = -1
        self._presence: mmap.mmap | None = None
        try:
            self.fd = os.memfd_create("pagefork-lazy-view", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, m.size)  # sparse: costs memory only as chunks arrive
            self.presence_fd = os.memfd_create("pagefork-presence", os.MFD_CLOEXEC)
            # A byte per chunk, then a byte per page (pages installed from the hot pack).
            os.ftruncate(self.presence_fd, self.nchunks + self.npages)
            self._presence = mmap.mmap(
                self.presence_fd, self.nchunks + self.npages, mmap.MAP_SHARED
            )
        except OSError as exc:
            self.close()
            raise StoreError(f"{self.path}: cannot make the memory view: {exc.strerror}") from None
        for i, sha in enumerate(m.chunks):
            if sha is None:
                self._presence[i] = 1
        self._lock = threading.Lock()
        self._inflight: dict[int, ChunkFuture] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(fetch_jobs, "pagefork-fetch")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "pagefork-cache-write")
        self._closed = False
        # Serialises writes to the view: a chunk's write skips the pages the pack put in.
        self._view_lock = threading.Lock()
        self._pack_lock = threading.Lock()
        self._pack_done = False
        # Pages may come in alone (hot pack, blocks): writes to the view then take turns.
        self._per_page = m.hot_pack is not None or bool(m.block_size) or m.is_layer
        self._blocks: dict[tuple[int, int], ChunkFuture] = {}  # block fetches in flight
        #: GETs issued for chunks and the hot pack, and the bytes they brought (cache hits
        #: not counted); of those, the pack's.
        self.gets = 0
        self.fetched_bytes = 0
        self.pack_gets = 0
        self.pack_bytes = 0
        # A layer template's changed pages, installed before any chunk (None: not a layer).
        self._layers = LayerOverlay.of(self._client, self.url, m, cache, self._install_page)
        #: Ranged GETs of single blocks (a cold chunk's fault first); chunks installed from
        #: the host cache when the template opened.
        self.block_gets = 0
        self.warm_chunks = 0
        self._warmer: threading.Thread | None = None
        if warm and self._layers is None:  # a layer's chunks are its base's
            self._warmer = threading.Thread(
                target=_warm_from_cache, args=(self,), name="pagefork-warm", daemon=True
            )
            self._warmer.start()

    # --- chunks ------------------------------------------------------------------------------
    def present(self, chunk: int) -> bool:
        """True once chunk ``chunk`` is verified and in the view."""
        assert self._presence is not None
        return bool(self._presence[chunk])

    def page_present(self, page: int) -> bool:
        """True once page ``page`` is in the view: its chunk is, or the pack brought it."""
        assert self._presence is not None
        chunk = page * PAGE_SIZE // self.chunk_size
        return bool(self._presence[chunk] or self._presence[self.nchunks + page])

    def chunks_of(self, spans: Iterable[tuple[int, int]]) -> list[int]:
        """The chunks, not yet present, that ``(file_offset, length)`` spans touch (sorted),
        leaving out a chunk whose pages the spans touch all came from the hot pack."""
        assert self._presence is not None
        return chunks_wanted(self._presence, self.nchunks, self.chunk_size, spans)

    def ensure_spans(self, spans: Iterable[tuple[int, int]], timeout: float) -> tuple[int, float]:
        """Bring the pages of ``(file_offset, length)`` spans into the view: the hot pack
        first (when the template has one: a few ranged GETs), then the chunks of what the
        pack lacks. (bytes fetched from the store, seconds taken), as :meth:`ensure`."""
        started = time.monotonic()
        spans = list(spans)
        fetched = self.ensure_layers(timeout) + self.ensure_pack(timeout)
        more, _ = self.ensure(self.chunks_of(spans), timeout - (time.monotonic() - started))
        return fetched + more, time.monotonic() - started

    def ensure_pack(self, timeout: float) -> int:
        """Fetch the hot pack into the view, once per template (later calls return at once;
        one that failed is tried again by the next). Bytes fetched; :class:`StoreError` names
        the pack object and how to repair it."""
        pack = self.manifest.hot_pack
        if pack is None:
            return 0
        with self._pack_lock:  # one fetch: the forks that arrive meanwhile wait for it
            if self._pack_done:
                return 0
            if self._closed:
                raise StoreError(f"{self.path}: template closed")
            fetched = 0

            def counted(n: int) -> None:
                nonlocal fetched
                with self._lock:
                    fetched += n
                    self.gets += 1
                    self.pack_gets += 1
                    self.fetched_bytes += n
                    self.pack_bytes += n

            deadline = time.monotonic() + min(timeout, self.fetch_deadline)
            fetch_pack(
                self._client,
                self.url.bucket,
                pack,
                self._pool,
                self._install_page,
                deadline,
                counted,
            )
            self._pack_done = True
            return fetched

    def ensure_layers(self, timeout: float) -> int:
        """A layer template's changed pages into the view, once (0 for any other); bytes
        fetched (:class:`StoreError` names the layer object that failed)."""
        layers, limit = self._layers, min(timeout, self.fetch_deadline)
        return 0 if layers is None else layers.bring_in(limit)

    def _install_page(self, page: int, data: bytes) -> None:
        """Put verified page ``page`` in the view, then mark it present (a pool thread)."""
        assert self._presence is not None
        if self._zeros[page]:
            return  # a zero page is served as zeros, never copied
        with self._view_lock:
            if self.page_present(page):
                return  # its chunk is in already: never written twice
            write_all(self.fd, data, page * PAGE_SIZE)
            self._presence[self.nchunks + page] = 1

    def request(self, chunk: int) -> ChunkFuture:
        """A future of chunk ``chunk`` arriving in the view (result: bytes fetched from the
        store, 0 from the cache or already present). One fetch per chunk at a time."""
        if not 0 <= chunk < self.nchunks:
            raise StoreError(f"{self.path}: chunk {chunk} is out of range")
        with self._lock:
            fut = self._inflight.get(chunk)
            if fut is not None:
                return fut
            if self._closed or self.present(chunk):  # closed: no presence map left
                fut = concurrent.futures.Future()
                if self._closed:
                    fut.set_exception(StoreError(f"{self.path}: template closed"))
                else:
                    fut.set_result(0)
                return fut
            fut = self._pool.submit(self._fetch, chunk)
            self._inflight[chunk] = fut
        fut.add_done_callback(lambda _f: self._forget(chunk))
        return fut

    def _forget(self, chunk: int) -> None:
        with self._lock:
            self._inflight.pop(chunk, None)

    def ensure(self, chunks: Iterable[int], timeout: float) -> tuple[int, float]:
        """Fetch ``chunks`` in parallel (bounded by the pool) and wait for all of them.

        Returns (bytes fetched from the store, seconds taken); raises :class:`StoreError`
        naming the first chunk that failed, or the timeout.
        """
        started = time.monotonic()
        futures = [self.request(c) for c in chunks]
        _, pending = concurrent.futures.wait(futures, timeout)
        if pending:
            raise StoreError(f"{self.path}: {len(pending)} chunks not fetched within {timeout:g}s")
        fetched = 0
        for fut in futures:
            exc = fut.exception()
            if exc is not None:
                raise exc if isinstance(exc, StoreError) else StoreError(str(exc))
            fetched += fut.result()
        return fetched, time.monotonic() - started

    def _fetch(self, chunk: int) -> int:
        """Bring chunk ``chunk`` into the view, verified (a pool thread)."""
        # A layer template's pages first: its chunks are its base template's.
        m = self.manifest if self._layers is None else self._layers.ensure(self.fetch_deadline)
        sha = m.chunks[chunk]
        if sha is None:
            if self._layers is not None:  # the view's hole is the base; the layer pages are in
                self._presence[chunk] = 1  # type: ignore[index]
            return 0
        length = m.chunk_length(chunk)
        key = m.chunk_key(chunk)
        fetched = 0
        where = f"chunk {chunk} of {self.path}"
        data = self.cache.get(sha, length)  # verified when it entered the cache
        cached = data is not None
        if data is None:
            deadline = time.monotonic() + self.fetch_deadline

            def counted(n: int) -> None:
                nonlocal fetched
                fetched += n
                with self._lock:
                    self.gets += 1
                    self.fetched_bytes += n

            try:
                # Patient: a store that refuses connections for a while (restarting) is waited
                # out, as any transient error is, until the chunk's deadline.
                data = s3.get_verified(
                    self._client,
                    self.url.bucket,
                    key,
                    length,
                    sha,
                    deadline,
                    patient=True,
                    on_get=counted,
                )
            except StoreError as exc:
                base = None if self._layers is None else self._layers.base_url
                raise chunk_error(where, self.url, key, exc, base) from None
        self._install(chunk * self.chunk_size, data, where, chunk, m.zero_pages)
        if not cached:
            # On a thread of its own: the faults waiting for this chunk need not wait for it.
            self._writer.submit(self.cache.put, sha, data)
        return fetched

    def _install(
        self, offset: int, data: bytes, where: str, chunk: int | None, zeros: bytes
    ) -> None:
        """Write verified ``data`` (chunk ``chunk``, or a block of one when None) at file
        ``offset`` into the view, skipping pages already in, then mark it present; ``zeros``
        is the zero map of the manifest that names its bytes."""
        assert self._presence is not None
        first = offset // PAGE_SIZE
        page = zero_map_lies(zeros, first, data)
        if page is not None:
            raise StoreError(
                f"{where}: the manifest marks page {page} zero but its bytes (verified against "
                "their SHA-256) hold data there: the manifest is corrupt; nothing of it was served"
            )
        base, npages = self.nchunks + first, (len(data) + PAGE_SIZE - 1) // PAGE_SIZE
        # Without per-page presence (no pack, no blocks) chunks are written in parallel.
        with self._view_lock if self._per_page else contextlib.nullcontext():
            if self._presence[offset // self.chunk_size]:
                return  # its chunk came in first (or twice): every page of it is in already
            write_absent(self.fd, data, offset, self._presence[base : base + npages])
            # Only now may a worker copy from it: the bytes are in the view and verified.
            if chunk is not None:
                self._presence[chunk] = 1
            else:
                self._presence[base : base + npages] = b"\x01" * npages

    # --- a cold chunk's fault first (pagefork.store.coldfault) --------------------------------
    def request_page(self, chunk: int, offset: int) -> ChunkFuture:
        """A future of the page at file ``offset`` (in chunk ``chunk``) arriving in the view:
        with per-block digests, its block is fetched and verified alone, then the rest of the
        chunk in the background; without, :meth:`request` (the whole chunk)."""
        span = None if not 0 <= chunk < self.nchunks else block_of(self.manifest, chunk, offset)
        if span is None:
            return self.request(chunk)
        block = span[0]
        with self._lock:
            fut = self._inflight.get(chunk)  # the chunk is coming: the page comes with it
            if fut is not None:
                return fut
            whole = self._closed or self.present(chunk)
            if not whole:
                fut = self._blocks.get((chunk, block))
                if fut is not None:
                    return fut
                fut = self._pool.submit(self._fetch_block, chunk, span)
                self._blocks[(chunk, block)] = fut
        if fut is None:  # in already, or closed: request() answers (it takes the lock itself)
            return self.request(chunk)
        # Added before any caller's: the rest of the chunk is asked for before a fault
        # answered on this block can ask again for another page of it.
        fut.add_done_callback(lambda f: self._block_done(chunk, block, f))
        return fut

    def _fetch_block(self, chunk: int, span: tuple[int, int, int]) -> int:
        """Bring the block ``span`` (block, file offset, length) of ``chunk`` into the view,
        verified; from the host cache, whole chunk, when it holds it (a pool thread)."""
        sha = self.manifest.chunks[chunk]
        assert sha is not None
        if self.cache.get(sha, self.manifest.chunk_length(chunk)) is not None:
            return self._fetch(chunk)  # read once more from the page cache: cheap
        fetched = 0

        def counted(n: int) -> None:
            nonlocal fetched
            fetched += n
            with self._lock:
                self.gets += 1
                self.fetched_bytes += n
                self.block_gets += 1

        block, offset, _ = span
        deadline = time.monotonic() + self.fetch_deadline
        try:
            data = fetch_block(
                self._client, self.url, self.manifest, chunk, block, deadline, counted
            )
        except StoreError as exc:
            if isinstance(exc, s3.MissingObjectError):
                raise  # the chunk is gone with it
            # A block that cannot be had verified alone (a store that ignores byte ranges or
            # answers the wrong one, a block that does not match): the whole chunk, verified
            # against its own SHA-256, decides. Its error, if any, names the chunk.
            log.warning("%s: fetching the whole chunk instead", exc)
            return fetched + self._fetch(chunk)
        where = f"block {block} of chunk {chunk} of {self.path}"
        self._install(offset, data, where, None, self.manifest.zero_pages)
        return fetched

    def _block_done(self, chunk: int, block: int, fut: ChunkFuture) -> None:
        with self._lock:
            self._blocks.pop((chunk, block), None)
        if fut.cancelled() or fut.exception() is not None:
            return  # its forks fail with the block's error; a later fault asks again
        with contextlib.suppress(StoreError):
            self.request(chunk)  # the rest, in the background (its failure fails its waiters)

    # --- publishing a hot set recorded here --------------------------------------------------
    def publish_hot_set(self, hot: HotPageList, regions: Sequence[Region]) -> str:
        """Push ``hot`` with its hot pack (see :func:`pagefork.store.publish.publish_hot_set`);
        the URL pinned to the new manifest."""
        return publish_hot_set(self, hot, regions)

    @property
    def client(self) -> Any:
        """The S3 client this template fetches with."""
        return self._client

    @property
    def closed(self) -> bool:
        """True once :meth:`close` began: nothing more is fetched."""
        return self._closed

    # --- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop fetching, drop the view; idempotent."""
        pool = getattr(self, "_pool", None)
        if pool is not None:
            with self._lock:
                self._closed = True
            pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None  # type: ignore[assignment]
            self._writer.shutdown(wait=True)  # every verified chunk fetched is kept
            if self._layers is not None:
                self._layers.close()
        if getattr(self, "_warmer", None) is not None:
            assert self._warmer is not None
            self._warmer.join()
            self._warmer = None
        if self._presence is not None:
            self._presence.close()
            self._presence = None
        if getattr(self, "_own_client", False):
            self._own_client = False
            self._client.close()
        for name in ("fd", "presence_fd", "_zero_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _warm_from_cache(template: LazyTemplate) -> None:
    """Install every chunk of ``template`` the host cache holds, one after another (the
    template's warming thread, the only writer of ``warm_chunks``): one read each, no hashing
    (verified when it entered the cache), so a warm host's forks never park. One chunk at a
    time, so demand fetches always find a pool thread."""
    names = template.cache.names()
    for chunk, sha in enumerate(template.manifest.chunks):
        if sha is None or sha not in names or template.present(chunk):
            continue
        try:
            template.request(chunk).result()
        except (StoreError, concurrent.futures.CancelledError):
            if template.closed:
                return
            continue  # an entry gone bad meanwhile: fetched again, its error to its forks
        template.warm_chunks += 1


@dataclass(frozen=True)
class StoreOptions:
    """How a page server reaches object storage: the host's chunk cache (None: the default
    directory, bounded at 10 GiB), the endpoint (None: from the environment or AWS), how many
    chunks it fetches at once, and optionally a ready S3 client."""

    cache: ChunkCache | None = None
    endpoint_url: str | None = None
    fetch_jobs: int = DEFAULT_FETCH_JOBS
    client: Any = None
    #: Seconds a chunk may take, every attempt and backoff included, before its forks fail.
    fetch_deadline: float = s3.DEADLINE
    #: Install every chunk the host cache holds into the view when the template opens (in the
    #: background, no hashing), so a warm host's forks never wait: the view then holds the
    #: cached part of the template in memory, as a local mem-file's page cache would.
    warm_view: bool = True


def open_mem_source(path: str, options: StoreOptions | None) -> MemFile | LazyTemplate:
    """The mem-file at ``path``, or the lazy template when ``path`` is an ``s3://`` URL."""
    if not is_s3_url(path):
        return MemFile(path, mapped=False)
    options = options or StoreOptions()
    cache = options.cache if options.cache is not None else ChunkCache(default_cache_dir())
    return LazyTemplate(
        path,
        cache,
        client=options.client,
        endpoint_url=options.endpoint_url,
        fetch_jobs=options.fetch_jobs,
        fetch_deadline=options.fetch_deadline,
        warm=options.warm_view,
    )


@contextlib.contextmanager
def client_of(options: StoreOptions) -> Iterator[Any]:
    """``options``' client, or a new one for its endpoint, closed afterwards."""
    if options.client is not None:
        yield options.client
        return
    client = s3.make_client(options.endpoint_url)
    try:
        yield client
    finally:
        client.close()


def pin_with_hot_pages(url: str, options: StoreOptions) -> tuple[str, HotPageList | None]:
    """``url`` pinned to the manifest it names now, and the hot-page list pushed with that
    manifest (None if none was): read once, so the hot set and the memory a server then opens
    come from the same push, whatever is pushed to the prefix meanwhile."""
    with client_of(options) as client:
        u = parse_s3_url(url)
        manifest, sha = s3.read_pinned(client, u)
        pinned = str(u.pinned(sha))
        blob = manifest.hot_pages
        if blob is None:
            return pinned, None
        try:
            data = s3.get_verified(client, u.bucket, blob.key, blob.size, blob.sha256)
        except s3.CorruptObjectError as exc:
            raise StoreError(f"hot-page list {exc}") from None
        return pinned, decode(data, f"s3://{u.bucket}/{blob.key}")
