"""Fork fan-out of the built-in microVM against a :class:`~pagefork.server.PageServer`.

What ``pagefork demo``, the tests and the benchmark share: start fork processes, let the page
server take their uffds, prefetch a hot set before the vCPUs resume (Firecracker's
``resume_vm: false`` then ``PATCH /vm Resumed``), and collect per-fork figures from both sides:
the guest's (ready time, checksum) and the server's (faults, prefetched pages, misses).

The fork-ready time is wall time, from the fork's start (before the handshake) to the guest's
ready, whatever overlaps: a prefetch starts as soon as the handshake is in, while the VMM still
restores its vCPUs. Only the wait of a fork of a burst for its siblings at the start barrier
(resumed together, to serve them all at once) is left out: it is the orchestrator's, not the
fork's. ``restore_ms``, ``prefetch_ms`` and ``run_ms`` are the parts, which may overlap.

Four modes: ``warmup`` records the pages it faults, ``demand`` is served fault by fault,
``prefetch`` installs a hot set before resume, and ``present`` installs every page of guest
RAM before resume and leaves that population out of its ready time (``restore + run``): the
physical limit, a fork whose memory is all there (its ``prefetch_ms`` still says what the
population took).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from pagefork.errors import PageforkError, UffdError, VmmError
from pagefork.hotpages import HotPageList
from pagefork.prefetch import PrefetchResult
from pagefork.regions import PAGE_SIZE
from pagefork.server import PageServer
from pagefork.uffd import open_userfaultfd
from pagefork.vmm.kvm.process import ForkProcess, ForkResult
from pagefork.vmm.kvm.template import Template
from pagefork.vmm.kvm.vm import kvm_available

Mode = Literal["warmup", "demand", "prefetch", "present"]


def every_page(template: Template) -> HotPageList:
    """Every page of the template's guest RAM, region by region: what ``present`` installs."""
    return HotPageList.from_pages(
        (i, off) for i, r in enumerate(template.layout) for off in range(0, r.size, PAGE_SIZE)
    )


@dataclass(frozen=True)
class Stream:
    """A hot set installed by resuming early: its first ``head`` pages (first-touch order) go
    in before resume, and the page server's worker streams the rest while the guest runs,
    serving the guest's faults ahead of it (``PageServer.prefetch(..., head=)``)."""

    hot: HotPageList
    head: int

    def __post_init__(self) -> None:
        if self.head < 0:
            raise ValueError("head must be >= 0")

    @property
    def pages(self) -> int:
        """Pages in the whole hot set."""
        return len(self.hot)


def check_environment() -> None:
    """Raise :class:`VmmError` with a one-line reason when KVM or userfaultfd is unusable."""
    reason = kvm_available()
    if reason is not None:
        raise VmmError(f"KVM is not available ({reason}); the microVM needs /dev/kvm")
    try:
        fd = open_userfaultfd()
    except UffdError as exc:
        raise VmmError(f"userfaultfd is not available ({exc})") from None
    os.close(fd)


@dataclass
class ForkReport:
    """One fork's figures from the guest and from the page server."""

    name: str
    mode: Mode
    fork_index: int
    variant: int
    ready_ms: float
    restore_ms: float
    prefetch_ms: float
    run_ms: float
    checksum_ok: bool
    faults: int
    pages_copied: int
    zero_pages: int
    prefetched_pages: int
    misses: int
    specific_pages: int
    #: Touched pages whose bytes were wrong (checked after ready); any makes checksum_ok false.
    bad_pages: int = 0
    fault_latency_us: dict[str, float] = field(default_factory=dict)
    progress: list[tuple[float, int]] = field(default_factory=list)
    #: The guest's checksum per vCPU.
    checksums: list[int] = field(default_factory=list)
    #: Resumed early: pages installed before resume, and streamed after it (by the end of the
    #: stream, which may outlast ready); pages of the hot set the guest faulted in before the
    #: stream reached them (faults that raced the stream).
    head_pages: int = 0
    streamed_pages: int = 0
    raced: int = 0
    #: Faults that found their page already installed (by a prefetch that won the race).
    already_present: int = 0
    #: The fork's memory at ready (``pagefork.memstats`` figures, ``*_bytes``).
    memory: dict[str, Any] = field(default_factory=dict)
    #: When, in ms from the fork's start, the orchestrator saw its handshake, the prefetch's
    #: install began and ended in the worker (a stream: its head), and the orchestrator was set
    #: to resume it (0 when not reached); ``restore_ms`` says when the VMM was restored.
    handshake_at_ms: float = 0.0
    install_from_ms: float = 0.0
    install_to_ms: float = 0.0
    set_to_go_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (progress as [ms since resume, pages read])."""
        doc = dict(self.__dict__)
        doc["progress"] = [[round(t, 3), p] for t, p in self.progress]
        return doc


class _Fork:
    """A fork in flight: its process and the name the server knows it by."""

    def __init__(
        self,
        server: PageServer,
        template: Template,
        name: str,
        index: int,
        record: bool,
        arm: tuple[HotPageList, int | None] | None = None,
    ) -> None:
        self.name = name
        self.index = index
        socket_path = server.register_fork(name, record=record)
        if arm is not None:  # installing starts at the handshake, as the VMM restores
            server.prefetch_at_handshake(name, arm[0], head=arm[1])
        # A child template (a snapshot) checks its pages against its base and layers.
        memory = template.memory_chain if len(template.memory_chain) > 1 else ()
        self.process = ForkProcess(str(template.path), socket_path, index, memory=memory)
        self.prefetch_seconds = 0.0
        #: What the prefetch call returned (a streamed one: the head's result).
        self.prefetched: PrefetchResult | None = None
        #: When the orchestrator was done preparing the fork (monotonic; 0: not yet).
        self.prepared_at = 0.0
        #: When the orchestrator saw its handshake (monotonic; 0: not yet).
        self.connected_at = 0.0


def _report(
    server: PageServer,
    template: Template,
    fork: _Fork,
    mode: Mode,
    result: ForkResult,
    warmup_pages: set[int] | None,
    stream: Stream | None = None,
) -> ForkReport:
    head_pages = streamed = raced = 0
    if stream is not None:
        try:
            # The stream may outlast ready: its figures are the whole prefetch's.
            whole = server.stream_result(fork.name, timeout=30.0) or fork.prefetched
        except PageforkError:
            whole = fork.prefetched  # the fork ended mid-stream: what the head did
        if whole is not None:
            streamed, raced = whole.streamed, whole.raced
            head_pages = whole.installed - whole.streamed
    stats = server.wait_ended(fork.name, timeout=30.0)
    specific = 0
    if warmup_pages is not None:
        specific = len(template.touched_pages(result.variant) - warmup_pages)
    if mode == "present":
        # The physical limit: memory already there, however long it took to put it there.
        ready = result.restore_seconds + result.run_seconds
    else:
        # Wall time; less only a burst's wait at the barrier after this fork was set to go.
        set_to_go = max(result.t_restored, fork.prepared_at or result.t_restored)
        ready = result.ready_seconds - max(0.0, result.t_go - set_to_go)

    def since_start(t: float) -> float:
        return (t - result.t_start) * 1e3 if t else 0.0

    pre = fork.prefetched
    install_from = since_start(pre.started_at) if pre is not None else 0.0
    install_to = install_from + pre.head_seconds * 1e3 if pre is not None else 0.0
    total_pages: dict[int, int] = {}
    progress = []
    for t, vcpu, pages in result.progress:
        total_pages[vcpu] = pages
        progress.append(((t - result.t_go) * 1e3, sum(total_pages.values())))
    return ForkReport(
        name=fork.name,
        mode=mode,
        fork_index=fork.index,
        variant=result.variant,
        ready_ms=ready * 1e3,
        restore_ms=result.restore_seconds * 1e3,
        prefetch_ms=fork.prefetch_seconds * 1e3,
        run_ms=result.run_seconds * 1e3,
        checksum_ok=result.checksum_ok,
        faults=stats.faults,
        pages_copied=stats.pages_copied,
        zero_pages=stats.zero_pages,
        prefetched_pages=stats.prefetched_pages,
        misses=stats.misses,
        specific_pages=specific,
        bad_pages=len(result.bad_pages),
        fault_latency_us=dict(stats.latency_us),
        progress=progress,
        checksums=list(result.checksums),
        head_pages=head_pages,
        streamed_pages=streamed,
        raced=raced,
        already_present=stats.already_present,
        memory=dict(result.memory),
        handshake_at_ms=since_start(fork.connected_at),
        install_from_ms=install_from,
        install_to_ms=install_to,
        set_to_go_ms=since_start(fork.prepared_at),
    )


def run_forks(
    server: PageServer,
    template: Template,
    indices: Sequence[int],
    mode: Mode,
    *,
    hot: HotPageList | None = None,
    warmup_variant: int | None = None,
    concurrent: bool = False,
    timeout: float = 60.0,
    on_done: Callable[[ForkReport], None] | None = None,
    stream: Stream | None = None,
    at_handshake: bool = True,
) -> list[ForkReport]:
    """Run one fork per entry of ``indices`` (fork index picks the trace variant).

    ``mode`` ``warmup`` records hot pages, ``prefetch`` installs ``hot`` before resuming,
    ``present`` installs ``hot`` (default: :func:`every_page`) and leaves that out of ready.
    Sequential by default; ``concurrent`` restores (and prefetches) all forks in parallel,
    then resumes them together, so the page server serves them all at once.
    ``warmup_variant`` lets each report say how many of its pages the warm-up never touched
    (the misses a perfect prefetch leaves). With ``stream`` (mode ``prefetch``), only its
    head is installed before resume and the worker streams the rest while the guest runs.
    ``at_handshake`` arms the prefetch when the fork is registered, so its worker starts
    installing the moment the handshake is in; False asks for it once the handshake is seen.
    """
    if stream is not None:
        if mode != "prefetch":
            raise VmmError("a stream needs prefetch mode")
        hot = stream.hot
    if mode == "prefetch" and hot is None:
        raise VmmError("prefetch mode needs a hot-page list")
    if mode == "present" and hot is None:
        hot = every_page(template)
    warmup_pages = template.touched_pages(warmup_variant) if warmup_variant is not None else None
    reports: list[ForkReport] = []
    groups = [list(indices)] if concurrent else [[i] for i in indices]
    for group in groups:
        forks: list[_Fork] = []
        try:
            for index in group:
                name = f"{mode}-{index}-{time.monotonic_ns() % 1_000_000_000}"
                head = stream.head if stream is not None else None
                armed = at_handshake and mode in ("prefetch", "present") and hot is not None
                arm = (hot, head) if armed and hot is not None else None
                forks.append(_Fork(server, template, name, index, record=mode == "warmup", arm=arm))

            def prepare(fork: _Fork) -> None:
                server.wait_connected(fork.name, timeout=timeout)
                fork.connected_at = time.monotonic()
                if mode in ("prefetch", "present"):
                    assert hot is not None
                    # Wall clock of the whole call: planning counts as much as the copies.
                    t0 = time.monotonic()
                    head = stream.head if stream is not None else None
                    fork.prefetched = server.prefetch(fork.name, hot, head=head)
                    fork.prefetch_seconds = time.monotonic() - t0
                fork.prepared_at = time.monotonic()
                fork.process.wait_restored(timeout=timeout)

            if len(forks) == 1:
                prepare(forks[0])
            else:
                # A burst prefetches every fork at once, as forks started together would: each
                # fork's prefetch time then includes the contention, not a serial queue that
                # only the orchestrator waits through.
                with ThreadPoolExecutor(max_workers=len(forks)) as pool:
                    for future in [pool.submit(prepare, fork) for fork in forks]:
                        future.result()
            for fork in forks:
                fork.process.go()
            for fork in forks:
                result = fork.process.wait_result(timeout=timeout)
                report = _report(server, template, fork, mode, result, warmup_pages, stream)
                reports.append(report)
                if on_done is not None:
                    on_done(report)
        finally:
            # Each in its own try: one failing close must not leak the other forks.
            errors: list[BaseException] = []
            for fork in forks:
                try:
                    fork.process.close()
                except Exception as exc:  # collected; the first is re-raised
                    errors.append(exc)
                if mode != "warmup":
                    try:
                        server.unregister_fork(fork.name)
                    except Exception as exc:
                        errors.append(exc)
            if errors and sys.exc_info()[1] is None:
                raise errors[0]
    return reports


def warm_up(
    server: PageServer, template: Template, fork_index: int = 0, timeout: float = 60.0
) -> tuple[ForkReport, HotPageList]:
    """Run the recording warm-up fork; returns its report and the hot set it touched."""
    [report] = run_forks(server, template, [fork_index], "warmup", timeout=timeout)
    hot = server.hot_pages(report.name)
    server.unregister_fork(report.name)
    server.prepare_prefetch()  # the hot set is recorded: no fork should pay for the planner
    return report, hot


def fork_index(template: Template, k: int, warmup_variant: int) -> int:
    """Fork index of the ``k``-th (from 0) fork after a warm-up that walked ``warmup_variant``.

    The indices map onto the *other* variants in turn, so no measured fork walks the very
    trace the hot set was recorded from (that would flatter prefetch). Distinct ``k`` give
    distinct indices. With a single variant there is no other: it is reused.
    """
    if k < 0:
        raise ValueError("k must be >= 0")
    n = template.variants
    if n == 1:
        return k
    others = [v for v in range(n) if v != warmup_variant % n]
    rounds, pick = divmod(k, len(others))
    return others[pick] + n * rounds


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of ``values``."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize(reports: Sequence[ForkReport]) -> dict[str, Any]:
    """Per-mode figures: ready p50/p95/p99, mean faults, prefetched pages and misses."""
    ready = [r.ready_ms for r in reports]
    return {
        "forks": len(reports),
        "ready_ms_p50": percentile(ready, 50),
        "ready_ms_p95": percentile(ready, 95),
        "ready_ms_p99": percentile(ready, 99),
        "restore_ms_p50": percentile([r.restore_ms for r in reports], 50),
        "prefetch_ms_p50": percentile([r.prefetch_ms for r in reports], 50),
        "run_ms_p50": percentile([r.run_ms for r in reports], 50),
        "demand_faults_mean": statistics.fmean(r.faults for r in reports) if reports else 0.0,
        "prefetched_pages_mean": statistics.fmean(r.prefetched_pages for r in reports)
        if reports
        else 0.0,
        "misses_mean": statistics.fmean(r.misses for r in reports) if reports else 0.0,
        "specific_pages_mean": statistics.fmean(r.specific_pages for r in reports)
        if reports
        else 0.0,
        "checksums_ok": all(r.checksum_ok for r in reports),
    }
