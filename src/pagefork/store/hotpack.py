"""The hot pack: a template's hot pages in one object, fetched in a few ranged GETs.

A hot set scattered over memory touches most fixed-size chunks, so a cold host that fetched
the chunks holding it would fetch most of the template. The pack holds exactly the hot pages
(zero pages left out: they are never fetched), in first-touch order, under a content address
(``PREFIX/hot-pack-<sha256>``); the manifest's index gives each packed page's page number and
SHA-256. A cold host fetches the pack in :data:`RANGES` parallel ranged GETs of whole pages,
checks every page against its digest, and only then puts it in the memory view (see
:meth:`pagefork.store.lazy.LazyTemplate.ensure_pack`). A range that does not match is fetched
once more; one that still does not, or a pack that is missing or short, fails the forks that
wait for it with an error naming the object and the repair (push the template again). A
store that does not honour byte ranges (it answers each with the whole object) gets one GET
of the whole pack instead, every page still checked against its digest.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pagefork.errors import PrefetchError, StoreError
from pagefork.hotpages import HotPageList
from pagefork.prefetch import PrefetchPlan
from pagefork.regions import PAGE_SIZE, Region
from pagefork.store import client as s3
from pagefork.store.layout import HotPack, S3Url, sha256

#: How a damaged hot pack is repaired (said in the error that fails its forks).
_REPAIR = "push the template again with its hot pages (pagefork push ... --hot-pages FILE)"
#: Ranged GETs a pack is fetched in (at most; at least 64 KiB each).
RANGES = 8
_MIN_RANGE = 64 << 10


def hot_file_pages(
    hot: HotPageList, npages: int, regions: Sequence[Region] | None = None
) -> list[int]:
    """The mem-file page numbers of ``hot``'s pages, in first-touch order, distinct.

    A hot-page list names pages by region and offset; the region's place in the mem-file is
    given by ``regions`` (the forks' layout), else known from a prefetch plan kept with the
    list (an HPL3 file's), else only region 0 is placed (at the start of the file, as a
    single-region VMM lays it out). Pages it cannot place are left out of the pack: they stay
    lazy, served by their chunks.
    """
    offsets: dict[int, int] = {0: 0}
    if regions is not None:
        offsets = {i: r.offset for i, r in enumerate(regions)}
    else:
        for data in hot.plans().values():
            try:
                plan = PrefetchPlan.from_bytes(data)
            except PrefetchError:
                continue
            if plan.planned_for:
                offsets = {i: r.offset for i, r in enumerate(plan.planned_for)}
                break
    out: list[int] = []
    seen: set[int] = set()
    for region, offset in hot.in_order():
        base = offsets.get(region)
        if base is None or offset % PAGE_SIZE:
            continue
        page = (base + offset) // PAGE_SIZE
        if page < npages and page not in seen:
            seen.add(page)
            out.append(page)
    return out


def build_pack(
    url: S3Url,
    pages: Iterable[int],
    read_page: Callable[[int], bytes],
    zeros: bytes,
    name: str = "hot-pack",
) -> tuple[HotPack, bytes] | None:
    """The pack of ``pages`` (zero pages left out) read with ``read_page``, and its bytes
    (its key ``PREFIX/<name>-<sha256>``); None when no page is left."""
    order = [p for p in pages if not zeros[p]]
    if not order:
        return None
    parts = [read_page(p) for p in order]
    for p, data in zip(order, parts, strict=True):
        if len(data) != PAGE_SIZE:
            raise StoreError(f"page {p}: read {len(data)} bytes, not a whole page")
    data = b"".join(parts)
    digest = sha256(data)
    pack = HotPack(
        key=url.key(f"{name}-{digest}"),
        sha256=digest,
        pages=tuple(order),
        digests=tuple(hashlib.sha256(part).digest() for part in parts),
    )
    return pack, data


class _RangesIgnored(Exception):
    """The store answered a ranged GET of the pack with more than the range."""


def _ranges(npages: int) -> list[tuple[int, int]]:
    """(first page, pages) of each ranged GET."""
    per = max(_MIN_RANGE // PAGE_SIZE, -(-npages // RANGES))
    return [(i, min(per, npages - i)) for i in range(0, npages, per)]


def fetch_pack(
    client: Any,
    bucket: str,
    pack: HotPack,
    pool: concurrent.futures.Executor,
    install: Callable[[int, bytes], None],
    deadline: float,
    on_get: Callable[[int], None],
    what: str = "hot pack",
    repair: str = _REPAIR,
) -> None:
    """Fetch ``pack`` in parallel ranged GETs on ``pool``; each page, once it matches its
    digest, goes to ``install(page_number, bytes)``. Raises :class:`StoreError` naming the
    object (``what`` and its URL) and how to ``repair`` it; a page that does not match is
    never installed."""
    where = f"s3://{bucket}/{pack.key}"

    def whole() -> None:
        """The pack in one GET, checked page by page as the ranges are: for a store that
        does not honour byte ranges (it answers each with the whole object)."""
        try:
            data = s3.get_bytes(client, bucket, pack.key, pack.size, deadline, patient=True)
        except StoreError as exc:
            if isinstance(exc, s3.MissingObjectError):
                raise s3.MissingObjectError(
                    f"{what} {where} is gone from the bucket: {repair}"
                ) from None
            raise StoreError(f"{what} {exc}") from None
        on_get(len(data))
        bad = _first_bad(pack, 0, len(pack.pages), data)
        if bad is not None:
            raise StoreError(f"{what} {where} {bad} (nothing of it was served): {repair}")
        for i, page in enumerate(pack.pages):
            install(page, data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])

    def one(first: int, count: int) -> None:
        why = ""
        for _attempt in range(s3.VERIFY_ATTEMPTS):
            try:
                data = s3.get_range(
                    client,
                    bucket,
                    pack.key,
                    first * PAGE_SIZE,
                    count * PAGE_SIZE,
                    deadline,
                    patient=True,
                )
            except StoreError as exc:
                text = str(exc)
                if isinstance(exc, s3.MissingObjectError):
                    raise s3.MissingObjectError(
                        f"{what} {where} is gone from the bucket: {repair}"
                    ) from None
                if "InvalidRange" in text:
                    why = "is shorter than its index says (truncated)"
                    on_get(0)
                    continue
                if "does not honour byte ranges" in text:
                    raise _RangesIgnored from None
                raise StoreError(f"{what} {exc}") from None
            on_get(len(data))
            bad = _first_bad(pack, first, count, data)
            if bad is None:
                for i in range(count):
                    install(pack.pages[first + i], data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])
                return
            why = bad
        raise StoreError(f"{what} {where} {why} (nothing of it was served): {repair}")

    futures = [pool.submit(one, first, count) for first, count in _ranges(len(pack.pages))]
    _, pending = concurrent.futures.wait(futures, max(0.0, deadline - time.monotonic()) + 1)
    for fut in pending:
        fut.cancel()
    if pending:
        raise StoreError(f"{what} {where}: not fetched within its deadline")
    errors = [exc for exc in (fut.exception() for fut in futures) if exc is not None]
    if any(isinstance(exc, _RangesIgnored) for exc in errors):
        whole()  # the store sends whole objects: one GET of it, then every page checked
        return
    for exc in errors:
        raise exc if isinstance(exc, StoreError) else StoreError(f"{what} {where}: {exc}")


def _first_bad(pack: HotPack, first: int, count: int, data: bytes) -> str | None:
    """Why ``data`` is not pages ``first .. first+count`` of ``pack``, or None."""
    if len(data) != count * PAGE_SIZE:
        return "is shorter than its index says (truncated)"
    view = memoryview(data)
    for i in range(count):
        page = view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        if hashlib.sha256(page).digest() != pack.digests[first + i]:
            which = f"page {first + i} (template page {pack.pages[first + i]})"
            return f"{which} does not match its SHA-256"
    return None
