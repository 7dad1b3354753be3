"""A burst of microVM forks alive together: what they hold in memory, with or without KSM.

What ``pagefork demo --share-memory``, the density benchmark and the tests share. The forks of
a burst are restored (and prefetched) at once, resumed together, and kept alive (stopped) after
their guests report ready, so their memory can be measured side by side: right at ready, then
while ``ksmd`` merges what they hold in common, until the merging converges.

Convergence is read from the kernel: the forks' total ``Pss`` sampled as ``ksmd`` completes
full scans; merging has converged once a full scan no longer lowers it by more than 1% of what
merging has saved so far. ``converge_s`` is then the time from the burst's last ready until
the total first came within 2% of its final value (of the way from the at-ready total down).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pagefork import ksm
from pagefork.hotpages import HotPageList
from pagefork.memstats import ProcessMemory, measure, total
from pagefork.regions import PAGE_SIZE
from pagefork.server import PageServer
from pagefork.vmm.kvm.process import ForkProcess, ForkResult
from pagefork.vmm.kvm.template import Template

#: Sampling period of the forks' memory while waiting for ``ksmd``.
SAMPLE_SECONDS = 0.25


@dataclass
class BurstReport:
    """One burst: per-fork ready times and memory, totals, and how merging converged."""

    share_memory: bool
    forks: int
    #: Per fork: whether it was started mergeable (a burst may mix both, side by side).
    shares: list[bool]
    ready_ms: list[float]
    fanout_ms: float
    checksums_ok: bool
    at_ready: list[ProcessMemory]
    settled: list[ProcessMemory]
    #: Pages the forks' guests wrote, and that the page server installed, summed over forks.
    written_pages: int
    touched_pages: int
    copied_pages: int
    zero_pages: int
    #: Distinct template pages the burst touched (its forks' traces, united).
    union_touched_pages: int
    #: Touched pages that stayed the shared zero page (:func:`free_zero_pages`), summed.
    free_zero_pages: int = 0
    #: Distinct touched pages whose template bytes are not all zero: what the burst holds
    #: at best (a file-backed restore's page cache), before the pages it writes.
    union_data_pages: int = 0
    converge_s: float | None = None
    ksmd_cpu_s: float | None = None
    full_scans: int = 0
    ksm_running: bool = False
    #: (seconds since the last ready, forks' total Pss in bytes) while waiting for ksmd.
    timeline: list[tuple[float, int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures (bytes, ms, s); ``pss_total_bytes`` and ``per_fork_pss_bytes`` are
        the settled ones (whole VMM processes), ``guest_*`` guest RAM only."""
        n = max(1, self.forks)
        pss = total(self.settled, "pss")
        guest_pss = total(self.settled, "guest_pss")
        return {
            "share_memory": self.share_memory,
            "shares": self.shares,
            "forks": self.forks,
            "ksm_running": self.ksm_running,
            "pss_total_bytes": pss,
            "per_fork_pss_bytes": pss // n,
            "guest_pss_total_bytes": guest_pss,
            "guest_per_fork_pss_bytes": guest_pss // n,
            "rss_total_bytes": total(self.settled, "rss"),
            "guest_rss_total_bytes": total(self.settled, "guest_rss"),
            "pss_at_ready_total_bytes": total(self.at_ready, "pss"),
            "guest_pss_at_ready_total_bytes": total(self.at_ready, "guest_pss"),
            "ksm_merging_pages": sum(m.ksm_merging_pages or 0 for m in self.settled),
            "converge_s": self.converge_s,
            "ksmd_cpu_s": self.ksmd_cpu_s,
            "full_scans": self.full_scans,
            "written_bytes": self.written_pages * PAGE_SIZE,
            "touched_bytes": self.touched_pages * PAGE_SIZE,
            "union_touched_bytes": self.union_touched_pages * PAGE_SIZE,
            "copied_pages": self.copied_pages,
            "zero_pages": self.zero_pages,
            "free_zero_pages": self.free_zero_pages,
            "union_data_bytes": self.union_data_pages * PAGE_SIZE,
            "ready_ms": self.ready_ms,
            "ready_ms_mean": sum(self.ready_ms) / n,
            "fanout_ms": self.fanout_ms,
            "checksums_ok": self.checksums_ok,
            "per_fork": [
                {"ready_ms": r, **m.to_dict()}
                for r, m in zip(self.ready_ms, self.settled, strict=True)
            ],
            "timeline": [[round(t, 3), p] for t, p in self.timeline],
        }


def converge_time(timeline: Sequence[tuple[float, int]], share: float = 0.02) -> float | None:
    """When the total first came within ``share`` of its final value, measured from the
    first sample's level: the time of the first sample ``t`` with ``p - final <= share *
    (first - final)``. None for no samples; 0.0 when nothing was saved."""
    if not timeline:
        return None
    first, final = timeline[0][1], timeline[-1][1]
    saved = first - final
    if saved <= 0:
        return 0.0
    for t, p in timeline:
        if p - final <= share * saved:
            return t
    return timeline[-1][0]  # pragma: no cover - the last sample always qualifies


def free_zero_pages(template: Template, variant: int) -> set[int]:
    """Pages a fork walking ``variant`` touches but never writes whose template bytes are all
    zero: the page server installs them with ``UFFDIO_ZEROPAGE``, so they map the kernel's one
    zero page and cost the fork no memory (not in its ``Rss``)."""
    zero = bytes(PAGE_SIZE)
    touched = template.touched_pages(variant) - template.written_pages(variant)
    return {p for p in touched if template.read_bytes(p, PAGE_SIZE) == zero}


def _measure_all(pids: Sequence[int], guest: bool) -> list[ProcessMemory]:
    return [measure(pid, guest=guest) for pid in pids]


def wait_converged(
    pids: Sequence[int], timeout: float, t0: float
) -> tuple[list[tuple[float, int]], int]:
    """Sample the processes' total ``Pss`` until a full ``ksmd`` scan lowers it by less than
    1% of what merging saved so far (at least two full scans), or ``timeout`` seconds pass.
    Returns the timeline (seconds since ``t0``) and the full scans seen."""
    start_scans = ksm.counters().full_scans
    timeline = [(time.monotonic() - t0, total(_measure_all(pids, False), "pss"))]
    first = timeline[0][1]
    last_scan, at_last_scan = start_scans, first
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(SAMPLE_SECONDS)  # a sampling period, not a wait for an outcome
        pss = total(_measure_all(pids, False), "pss")
        timeline.append((time.monotonic() - t0, pss))
        scans = ksm.counters().full_scans
        if scans > last_scan:
            dropped = at_last_scan - pss
            saved = first - pss
            if scans - start_scans >= 2 and dropped <= 0.01 * max(saved, 1):
                return timeline, scans - start_scans
            last_scan, at_last_scan = scans, pss
    return timeline, ksm.counters().full_scans - start_scans


def run_burst(
    server: PageServer,
    template: Template,
    indices: Sequence[int],
    *,
    share_memory: bool | Sequence[bool],
    hot: HotPageList | None = None,
    timeout: float = 120.0,
    converge_timeout: float = 30.0,
) -> BurstReport:
    """Run one fork per entry of ``indices`` at once, keep them alive, measure their memory.

    ``hot`` prefetches it into every fork before the vCPUs resume. With ``share_memory`` each
    VMM is marked mergeable before it starts (a sequence: per fork, so one burst can hold both
    kinds side by side, under the same load), and when KSM runs the burst then waits (up to
    ``converge_timeout`` seconds) for merging to converge. KSM itself is never turned on here.
    """
    if isinstance(share_memory, bool):
        shares = [share_memory] * len(indices)
    else:
        shares = list(share_memory)
        if len(shares) != len(indices):
            raise ValueError("share_memory needs one entry per fork index")
    any_share = any(shares)
    running = ksm.running()
    cpu0 = ksm.ksmd_cpu_seconds() if any_share and running else None
    names: list[str] = []
    procs: list[ForkProcess] = []
    try:
        t_start = time.monotonic()
        for index, share in zip(indices, shares, strict=True):
            name = f"burst-{index}-{time.monotonic_ns() % 1_000_000_000}"
            socket_path = server.register_fork(name, record=False)
            names.append(name)
            procs.append(
                ForkProcess(
                    str(template.path),
                    socket_path,
                    index,
                    snapshots=True,  # stays alive, stopped, after its result
                    share_memory=share,
                )
            )

        def prepare(k: int) -> float:
            server.wait_connected(names[k], timeout=timeout)
            t0 = time.monotonic()
            if hot is not None:
                server.prefetch(names[k], hot)
            spent = time.monotonic() - t0
            procs[k].wait_restored(timeout=timeout)
            return spent

        with ThreadPoolExecutor(max_workers=len(procs)) as pool:
            prefetch_s = list(pool.map(prepare, range(len(procs))))
        for p in procs:
            p.go()
        results: list[ForkResult] = [p.wait_result(timeout=timeout) for p in procs]
        t_ready = max(r.t_ready for r in results)
        ready_ms = [
            (r.restore_seconds + s + r.run_seconds) * 1e3
            for r, s in zip(results, prefetch_s, strict=True)
        ]
        pids = [p.pid for p in procs]
        at_ready = _measure_all(pids, True)
        stats = [server.stats(n) for n in names]
        timeline: list[tuple[float, int]] = []
        scans = 0
        if any_share and running:
            timeline, scans = wait_converged(pids, converge_timeout, t_ready)
        settled = _measure_all(pids, True)
        cpu1 = ksm.ksmd_cpu_seconds() if cpu0 is not None else None
        variants = [template.variant_of(i) for i in indices]
        union: set[int] = set()
        for v in set(variants):
            union |= template.touched_pages(v)
        return BurstReport(
            share_memory=any_share,
            forks=len(procs),
            shares=shares,
            ready_ms=ready_ms,
            fanout_ms=(t_ready - t_start) * 1e3,
            checksums_ok=all(r.checksum_ok for r in results),
            at_ready=at_ready,
            settled=settled,
            written_pages=sum(len(template.written_pages(v)) for v in variants),
            touched_pages=sum(len(template.touched_pages(v)) for v in variants),
            copied_pages=sum(s.pages_copied + s.prefetched_pages for s in stats),
            zero_pages=sum(s.zero_pages for s in stats),
            union_touched_pages=len(union),
            free_zero_pages=sum(len(free_zero_pages(template, v)) for v in variants),
            union_data_pages=sum(
                1 for p in union if template.read_bytes(p, PAGE_SIZE) != bytes(PAGE_SIZE)
            ),
            converge_s=converge_time(timeline) if timeline else (0.0 if running else None),
            ksmd_cpu_s=(cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            full_scans=scans,
            ksm_running=running,
            timeline=timeline,
        )
    finally:
        errors: list[BaseException] = []
        for p in procs:
            try:
                p.close()
            except Exception as exc:  # collected; the first is re-raised
                errors.append(exc)
        for name in names:
            try:
                server.unregister_fork(name)
            except Exception as exc:
                errors.append(exc)
        if errors and sys.exc_info()[1] is None:
            raise errors[0]


def side_by_side(
    server: PageServer,
    template: Template,
    indices: Sequence[int],
    hot: HotPageList | None,
    on_done: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Two bursts of the same forks, without then with sharing: ``{"unshared": ...,
    "shared": ...}``, each :meth:`BurstReport.to_dict`."""
    out: dict[str, dict[str, Any]] = {}
    for share in (False, True):
        report = run_burst(server, template, indices, share_memory=share, hot=hot)
        out["shared" if share else "unshared"] = report.to_dict()
        if on_done is not None:
            on_done()
    return out
