"""The supervisor's prefetch service: plans made once per hot set and layout, prefetches that
a caller waits for, and a lazy template's chunk fetches for the workers' parked faults.

A plan goes to a worker once and then by its token (:meth:`WorkerProcess.send_prefetch`). A
prefetch whose worker dies is sent again to the worker that adopts its fork: installing a page
twice is harmless (EEXIST).

A prefetch may be armed before its fork connects (:meth:`PrefetchService.arm`): the supervisor
then sends it to the fork's worker together with the fork itself, the moment the handshake is
in, while the VMM still restores, instead of after a caller woken by the handshake has asked for
it (a thread switch and a round trip later).
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
from pagefork.prefetch import (
    PrefetchPlan,
    PrefetchResult,
    plan_hot_set,
    plan_prefetch,
    prepare_planner,
)
from pagefork.regions import Region
from pagefork.serving import messages as M
from pagefork.serving.forks import ForkRecord, ForkTable
from pagefork.serving.pool import WorkerProcess
from pagefork.serving.state import Stage
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
    head: int | None = None
    done: threading.Event = field(default_factory=threading.Event)
    #: Set when the head is in (a streamed prefetch) or when it is done, whichever is first.
    head_done: threading.Event = field(default_factory=threading.Event)
    head_result: PrefetchResult | None = None
    result: PrefetchResult | None = None
    error: str | None = None
    installed: int = 0
    fetched: tuple[int, float] | None = None

    def finish(self, result: PrefetchResult | None, error: str | None, installed: int) -> None:
        self.result, self.error, self.installed = result, error, installed
        self.done.set()
        self.head_done.set()

    def outcome(self) -> PrefetchResult:
        """The whole prefetch's result, or its :class:`PrefetchError` (call once done)."""
        if self.error is not None:
            exc = PrefetchError(self.error)
            exc.installed = self.installed
            raise exc
        assert self.result is not None
        return _with_fetch(self.result, self.fetched)


@dataclass(eq=False)
class _Armed:
    """A prefetch asked for before its fork connected: started at the handshake."""

    hot: HotPageList | Sequence[HotPage]
    timeout: float
    head: int | None
    request: _Request | None = None
    #: Why it could not start (a list that does not fit the fork's regions).
    error: str | None = None


def _with_fetch(result: PrefetchResult, fetched: tuple[int, float] | None) -> PrefetchResult:
    if fetched is None:
        return result
    return dataclasses.replace(result, fetched_bytes=fetched[0], fetch_seconds=fetched[1])


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
        # Fork id -> its streamed prefetch, kept (done or not) until the fork is unregistered.
        self._streams: dict[str, _Request] = {}
        # Fork id -> the prefetch armed for its handshake, until a caller takes its result.
        self._armed: dict[str, _Armed] = {}
        self._plans: OrderedDict[tuple[object, ...], tuple[HotPageList, PrefetchPlan, int]] = (
            OrderedDict()
        )
        self._plans_lock = threading.Lock()
        self._plans_made = 0
        self._planner_ready = False

    def prepare(self) -> None:
        """Get planning ready now: numpy and the host's copy costs (tens of ms, once per
        process). Called when a hot set is recorded or loaded, or will be, so that the first
        fork to prefetch does not wait for it; the plan itself is made at that fork's prefetch
        (it needs the fork's regions) and then reused for every fork of the same layout."""
        with self._plans_lock:
            if self._planner_ready:
                return
            self._planner_ready = True
        prepare_planner()

    def plans_cached(self) -> int:
        """How many plans are cached now."""
        with self._plans_lock:
            return len(self._plans)

    def plans_made(self) -> int:
        """How many plans were made (or read from a hot-page file) for a hot set and layout."""
        with self._plans_lock:
            return self._plans_made

    def arm(
        self,
        entry: ForkRecord,
        hot_pages: HotPageList | Sequence[HotPage],
        timeout: float,
        head: int | None = None,
    ) -> None:
        """Start prefetching ``hot_pages`` into ``entry`` the moment its handshake is in (at
        once if it is in already); :meth:`prefetch` with the same list then waits for it."""
        with self._table.lock:
            if entry.final:
                raise PrefetchError(f"fork {entry.fork_id}: session has ended")
            if entry.fork_id in self._armed:
                raise PrefetchError(f"fork {entry.fork_id}: a prefetch is armed for it already")
            armed = _Armed(hot_pages, timeout, head)
            self._armed[entry.fork_id] = armed
            if entry.connected:
                self._start_armed(entry, armed)

    def connected(self, entry: ForkRecord) -> None:
        """``entry``'s handshake is in and its worker has it (lock held): start its armed
        prefetch, if any. A lazy template's is left to its caller, which fetches first."""
        armed = self._armed.get(entry.fork_id)
        if armed is not None and armed.request is None and armed.error is None:
            self._start_armed(entry, armed)

    def _start_armed(self, entry: ForkRecord, armed: _Armed) -> None:
        # Lock held. The plan is cached (or stored with the list) in the usual case; planning
        # anew here holds the lock for about a millisecond.
        if self._lazy is not None or entry.worker is None or entry.stage is Stage.MOVING:
            # Not now: a lazy template's chunks come first (the caller's prefetch() sends it),
            # and a moving fork's worker is letting it go (it starts once the fork's new
            # worker serves it: ForkFollower.adopted).
            return
        try:
            token, plan = self._plan(armed.hot, list(entry.regions))
        except PrefetchError as exc:
            armed.error = str(exc)
            return
        request = _Request(
            next(self._table.serial), entry.key, plan, armed.timeout, token, armed.head
        )
        self._requests[request.req] = request
        armed.request = request
        entry.worker.send_prefetch(request.req, entry.key, token, plan, armed.timeout, armed.head)

    def prefetch(
        self,
        entry: ForkRecord,
        hot_pages: HotPageList | Sequence[HotPage],
        timeout: float,
        head: int | None = None,
    ) -> PrefetchResult:
        """Install ``hot_pages`` into the connected fork ``entry`` through its worker.

        With ``head``, return once the first ``head`` hot pages are in (the result so far);
        the worker streams the rest, and :meth:`stream_result` waits for the whole. A prefetch
        armed for the fork (:meth:`arm`) is waited for instead of sent: ``hot_pages`` must be
        the list it was armed with, and its own ``head`` holds.
        """
        fork_id = entry.fork_id
        with self._table.lock:
            armed = self._armed.pop(fork_id, None)
        if armed is not None:
            if armed.hot is not hot_pages:
                raise PrefetchError(f"fork {fork_id}: another hot set was armed for it")
            if armed.error is not None:
                raise PrefetchError(armed.error)
            if armed.request is not None:
                return self._wait(entry, armed.request, timeout)
            head = armed.head  # armed, but left to this call (a lazy template's)
        token, plan = self._plan(hot_pages, list(entry.regions))
        request = _Request(next(self._table.serial), "", plan, timeout, token, head)
        request.fetched = self._fetch_for(fork_id, plan, timeout)
        with self._table.changed:
            # A fork moving to another worker (pagefork.serving.following) is taken by it soon.
            self._table.changed.wait_for(lambda: entry.stage is not Stage.MOVING, timeout)
            if entry.stage is Stage.MOVING:
                raise PrefetchError(f"fork {fork_id}: still moving to another worker")
            if entry.final or entry.worker is None:
                raise PrefetchError(f"fork {fork_id}: session has ended")
            streaming_now = self._streams.get(fork_id)
            if streaming_now is not None and not streaming_now.done.is_set():
                raise PrefetchError(f"fork {fork_id}: a prefetch is still streaming into it")
            request.key = entry.key
            self._requests[request.req] = request
            worker = entry.worker
        try:
            worker.send_prefetch(request.req, entry.key, token, plan, timeout, head)
        except BaseException:
            with self._table.lock:
                self._requests.pop(request.req, None)
            raise
        return self._wait(entry, request, timeout)

    def _wait(self, entry: ForkRecord, request: _Request, timeout: float) -> PrefetchResult:
        """Wait for ``request``'s head (or the whole, unstreamed) and return its result."""
        fork_id = entry.fork_id
        streaming = False
        try:
            installs = request.plan.pages + request.plan.bridged_pages
            if not request.head_done.wait(timeout + _PREFETCH_GRACE + installs / 10_000):
                raise PrefetchError(f"fork {fork_id}: its worker did not finish the prefetch")
            with self._table.lock:
                streaming = not request.done.is_set()
                if streaming:
                    self._streams[fork_id] = request
        finally:
            if not streaming:
                with self._table.lock:
                    self._requests.pop(request.req, None)
        if streaming:
            assert request.head_result is not None
            return _with_fetch(request.head_result, request.fetched)
        return request.outcome()

    def stream_result(self, fork_id: str, timeout: float) -> PrefetchResult | None:
        """Wait for the streamed prefetch of ``fork_id`` to finish: its whole result (None if
        none streams into it), or :class:`PrefetchError`."""
        with self._table.lock:
            request = self._streams.get(fork_id)
        if request is None:
            return None
        if not request.done.wait(timeout):
            raise PrefetchError(f"fork {fork_id}: the prefetch still streams after {timeout} s")
        return request.outcome()

    # --- what workers say and what happens to forks (lock held) -------------------------
    def answered(self, message: M.Prefetched | M.PrefetchHead) -> None:
        """A worker finished prefetch ``message.req``, or installed its head."""
        request = self._requests.get(message.req)
        if request is None:
            return
        if isinstance(message, M.PrefetchHead):
            if not request.head_done.is_set():  # a re-sent prefetch says it again
                request.head_result = message.result
                request.head_done.set()
            return
        request.finish(message.result, message.error, message.installed)
        if request.head_result is not None:
            # Streamed: the caller has its head already; the whole is kept for stream_result.
            self._requests.pop(message.req, None)
            if request.result is not None:
                request.result = dataclasses.replace(
                    request.result, head_seconds=request.head_result.head_seconds
                )

    def in_flight(self, entry: ForkRecord) -> bool:
        """True while a prefetch runs or streams into ``entry`` (lock held)."""
        stream = self._streams.get(entry.fork_id)
        if stream is not None and not stream.done.is_set():
            return True
        return any(r.key == entry.key and not r.done.is_set() for r in self._requests.values())

    def fork_ended(self, entry: ForkRecord) -> None:
        """Fail the prefetches still waiting on ``entry``'s session."""
        for request in self._requests.values():
            if request.key == entry.key and not request.done.is_set():
                request.finish(None, f"fork {entry.fork_id}: session has ended", 0)
        stream = self._streams.get(entry.fork_id)
        if stream is not None:
            self._requests.pop(stream.req, None)
            if entry.ephemeral:
                del self._streams[entry.fork_id]  # nobody can ask for it by name any more

    def forget(self, fork_id: str) -> None:
        """The fork is unregistered: drop what its stream or its armed prefetch left (lock
        held)."""
        self._streams.pop(fork_id, None)
        self._armed.pop(fork_id, None)

    def resend_to(self, new: WorkerProcess) -> None:
        """Send again to ``new`` the unfinished prefetches of the forks it adopted."""
        for request in self._requests.values():
            owner = self._table.by_key.get(request.key)
            if owner is not None and owner.worker is new and not request.done.is_set():
                # Installing a page twice is harmless; a head already answered is not awaited.
                head = None if request.head_result is not None else request.head
                new.send_prefetch(
                    request.req, request.key, request.token, request.plan, request.timeout, head
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
        if self._lazy is not None and self._lazy.manifest.hot_pack is not None:
            # The hot pack holds the hot pages alone: a bridged gap would cost its chunk.
            plan = plan_prefetch(hot_pages, regions, self._is_zero, bridge_gap=0)
        else:
            plan = plan_hot_set(hot_pages, regions, self._is_zero)
        token = next(self._table.serial)
        with self._plans_lock:
            self._plans_made += 1
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
        spans = [(r.file_offset, r.length) for r in plan.runs if not r.zero]
        try:  # the hot pack (if any), then the chunks of what it lacks
            return self._lazy.ensure_spans(spans, timeout)
        except StoreError as exc:
            raise PrefetchError(f"fork {fork_id}: {exc}") from None

    def need(self, chunk: int, offset: int = -1) -> None:
        """A worker has faults parked on ``chunk``: fetch it (once, however many ask; the
        block holding file ``offset`` first, when the template allows), then tell every worker
        it is in (the parked faults whose pages are still out ask again) or that it failed."""
        if self._lazy is None:
            return
        try:
            fut = self._lazy.request_page(chunk, offset)
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
