"""The supervisor's prefetch service: plans made once per hot set and layout, prefetches that
a caller waits for, and a lazy template's chunk fetches for the workers' parked faults.

A plan goes to a worker once and then by its token (:meth:`WorkerProcess.send_prefetch`). A
prefetch whose worker dies is sent again to the worker that adopts its fork: installing a page
twice is harmless (EEXIST).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pagefork.errors import PrefetchError, StoreError
from pagefork.hotpages import HotPage, HotPageList
from pagefork.prefetch import PrefetchPlan, PrefetchResult, plan_hot_set, plan_prefetch
from pagefork.regions import Region
from pagefork.serving import messages as M
from pagefork.serving.forks import ForkRecord, ForkTable
from pagefork.serving.pool import WorkerProcess
from pagefork.store.lazy import LazyTemplate

#: Prefetch plans kept (one per hot set and region layout; a template usually needs one).
PLAN_CACHE_SIZE = 16
#: How much longer than its own timeout a prefetch caller waits for a worker's answer.
_PREFETCH_GRACE = 60.0


@dataclass(eq=False)
class _Request:
    """A prefetch a caller waits for; re-sent to the new worker if the first one dies."""

    req: int
    key: str
    plan: PrefetchPlan
    timeout: float
    token: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: PrefetchResult | None = None
    error: str | None = None
    installed: int = 0


class PrefetchService:
    """Plans, prefetch requests and lazy chunk fetches of one page server."""

    def __init__(
        self,
        table: ForkTable,
        is_zero: Callable[[int, int], bool],
        lazy: LazyTemplate | None,
        tell_workers: Callable[[M.ToWorker], None],
    ) -> None:
        self._table = table
        self._is_zero = is_zero
        self._lazy = lazy
        self._tell_workers = tell_workers
        self._requests: dict[int, _Request] = {}
        self._plans: OrderedDict[tuple[object, ...], tuple[HotPageList, PrefetchPlan, int]] = (
            OrderedDict()
        )
        self._plans_lock = threading.Lock()

    def plans_cached(self) -> int:
        """How many plans are cached now."""
        with self._plans_lock:
            return len(self._plans)

    def prefetch(
        self, entry: ForkRecord, hot_pages: HotPageList | Sequence[HotPage], timeout: float
    ) -> PrefetchResult:
        """Install ``hot_pages`` into the connected fork ``entry`` through its worker."""
        fork_id = entry.fork_id
        token, plan = self._plan(hot_pages, list(entry.regions))
        fetched = self._fetch_for(fork_id, plan, timeout)
        request = _Request(next(self._table.serial), "", plan, timeout, token)
        with self._table.lock:
            if entry.final or entry.worker is None:
                raise PrefetchError(f"fork {fork_id}: session has ended")
            request.key = entry.key
            self._requests[request.req] = request
            worker = entry.worker
        try:
            worker.send_prefetch(request.req, entry.key, token, plan, timeout)
            installs = plan.pages + plan.bridged_pages
            if not request.done.wait(timeout + _PREFETCH_GRACE + installs / 10_000):
                raise PrefetchError(f"fork {fork_id}: its worker did not finish the prefetch")
        finally:
            with self._table.lock:
                self._requests.pop(request.req, None)
        if request.error is not None:
            exc = PrefetchError(request.error)
            exc.installed = request.installed
            raise exc
        assert request.result is not None
        if fetched is not None:
            return dataclasses.replace(
                request.result, fetched_bytes=fetched[0], fetch_seconds=fetched[1]
            )
        return request.result

    # --- what workers say and what happens to forks (lock held) -------------------------
    def answered(self, message: M.Prefetched) -> None:
        """A worker finished prefetch ``message.req``."""
        request = self._requests.get(message.req)
        if request is not None:
            request.result, request.error = message.result, message.error
            request.installed = message.installed
            request.done.set()

    def fork_ended(self, entry: ForkRecord) -> None:
        """Fail the prefetches still waiting on ``entry``'s session."""
        for request in self._requests.values():
            if request.key == entry.key and not request.done.is_set():
                request.error = f"fork {entry.fork_id}: session has ended"
                request.done.set()

    def resend_to(self, new: WorkerProcess) -> None:
        """Send again to ``new`` the unfinished prefetches of the forks it adopted."""
        for request in self._requests.values():
            owner = self._table.by_key.get(request.key)
            if owner is not None and owner.worker is new and not request.done.is_set():
                new.send_prefetch(
                    request.req, request.key, request.token, request.plan, request.timeout
                )

    # --- plans and lazy fetches ---------------------------------------------------------
    def _plan(
        self, hot_pages: HotPageList | Sequence[HotPage], regions: list[Region]
    ) -> tuple[int | None, PrefetchPlan]:
        """``(token, plan)`` for ``hot_pages`` on this layout, made once per hot set and layout.

        Every fork of a template has the same region sizes and offsets, so a plan is reused
        across forks, relocated by region base; its token lets a worker that has it already
        be sent the token alone. A :class:`HotPageList` only grows, so its identity and length
        name its content (the cache holds it, so the id stays unique).
        """
        if not isinstance(hot_pages, HotPageList):
            return None, plan_prefetch(list(hot_pages), regions, self._is_zero)
        layout = tuple((r.size, r.offset, r.page_size) for r in regions)
        key = (id(hot_pages), len(hot_pages), layout)
        with self._plans_lock:
            hit = self._plans.get(key)
            if hit is not None:
                self._plans.move_to_end(key)
                return hit[2], hit[1]
        # The plan kept with the list (an HPL3 file's, or one made for an earlier fork of this
        # layout) when it fits; else planned now and kept with it.
        plan = plan_hot_set(hot_pages, regions, self._is_zero)
        token = next(self._table.serial)
        with self._plans_lock:
            self._plans[key] = (hot_pages, plan, token)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return token, plan

    def _fetch_for(
        self, fork_id: str, plan: PrefetchPlan, timeout: float
    ) -> tuple[int, float] | None:
        """A lazy template: fetch the plan's chunks in parallel before the worker installs
        them; (bytes fetched, seconds). None for a mem-file."""
        if self._lazy is None:
            return None
        chunks = self._lazy.chunks_of((r.file_offset, r.length) for r in plan.runs if not r.zero)
        try:
            return self._lazy.ensure(chunks, timeout)
        except StoreError as exc:
            raise PrefetchError(f"fork {fork_id}: {exc}") from None

    def need(self, chunk: int) -> None:
        """A worker has faults parked on ``chunk``: fetch it (once, however many ask), then
        tell every worker it is in or that it failed."""
        if self._lazy is None:
            return
        try:
            fut = self._lazy.request(chunk)
        except StoreError as exc:
            self._tell_workers(M.ChunkFailed(chunk, str(exc)))
            return

        def done(fut: concurrent.futures.Future[int]) -> None:
            if fut.cancelled():
                return  # closing
            exc = fut.exception()
            if exc is None:
                self._tell_workers(M.ChunkReady(chunk))
            else:
                self._tell_workers(M.ChunkFailed(chunk, str(exc)))

        fut.add_done_callback(done)
