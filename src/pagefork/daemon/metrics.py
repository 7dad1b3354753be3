"""The daemon's Prometheus metrics, per template, all named ``pagefork_*``.

Counters are the sum of two parts: forks that ended (their final stats, added once when their
session ends) and live forks (their current stats, read at scrape time). A fork's final stats
are never below its live ones, so the sums only grow, as Prometheus counters must.

Fault latency is a histogram in seconds. The fork manager feeds it with each fork's new
fault-service latencies at every scrape (only the samples since the last one) and the rest when
the fork is released, so a dashboard sees faults while forks are live, each exactly once.

Memory is a gauge read at scrape time from the kernel (:mod:`pagefork.memstats`) for every
live fork's VMM: per template (the sum over its forks) and per fork, by figure (``rss``,
``pss``, ``private``, ``shared``, ``guest_pss``: guest RAM only), plus the pages KSM merged.
The ``pss`` sum of a template is what its forks cost the host together.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pagefork.memstats import ProcessMemory
from pagefork.stats import ForkStats

#: Bucket upper bounds of the fault latency histogram, in seconds (5 µs .. 100 ms).
LATENCY_BUCKETS = (
    5e-6,
    10e-6,
    20e-6,
    50e-6,
    100e-6,
    200e-6,
    500e-6,
    1e-3,
    2e-3,
    5e-3,
    10e-3,
    100e-3,
)
CONTENT_TYPE = CONTENT_TYPE_LATEST

#: ForkStats counters exported as ``pagefork_<name>_total`` with their help text.
COUNTERS = {
    "faults": "Page faults served on demand",
    "pages_copied": "Pages installed by UFFDIO_COPY in the fault path",
    "zero_pages": "Pages installed by UFFDIO_ZEROPAGE in the fault path",
    "prefetched_pages": "Pages installed by prefetch before the guest ran",
    "misses": "Demand faults after a prefetch (pages the hot set lacked)",
    "errors": "Fork-fatal errors",
}
#: ProcessMemory fields exported as the ``kind`` label of the memory gauges.
MEMORY_KINDS = ("rss", "pss", "private", "shared", "guest_rss", "guest_pss")


@dataclass
class _Totals:
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    forks_ended: int = 0
    worker_restarts: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0


class DaemonMetrics:
    """Per-template totals of ended forks and the fault latency histogram; thread safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, _Totals] = {}

    def fork_ended(self, template_id: str, stats: ForkStats) -> None:
        """Add an ended fork's final counters to its template's totals."""
        with self._lock:
            totals = self._totals.setdefault(template_id, _Totals())
            for name in COUNTERS:
                totals.counters[name] += int(getattr(stats, name))
            totals.forks_ended += 1

    def worker_restarted(self, template_id: str) -> None:
        """Count a worker process of the template's page server that died and was replaced."""
        with self._lock:
            self._totals.setdefault(template_id, _Totals()).worker_restarts += 1

    def observe_fault_latencies(self, template_id: str, latencies_ns: Iterable[int]) -> None:
        """Add fault-service latencies (nanoseconds) to the template's histogram; the caller
        hands each sample once."""
        with self._lock:
            totals = self._totals.setdefault(template_id, _Totals())
            for ns in latencies_ns:
                seconds = ns / 1e9
                totals.latency_sum += seconds
                totals.buckets[_bucket(seconds)] += 1

    def render(
        self,
        live: Mapping[str, Sequence[ForkStats]],
        templates: Sequence[str],
        hot_pages: Mapping[str, int],
        forks: Mapping[str, Mapping[str, int]] | None = None,
        memory: Mapping[str, Sequence[tuple[str, ProcessMemory]]] | None = None,
    ) -> bytes:
        """The Prometheus text exposition: the current stats of forks whose session goes on
        (``live``) per template, every registered template id, each template's hot-set size,
        and how many forks it has in each state (``forks``: template -> {"live": n,
        "exited": n}, the fork manager's :meth:`~pagefork.daemon.manager.ForkManager.
        fork_counts`; without it, the forks in ``live`` are counted as live), and the memory
        of its live forks' VMMs (``memory``: per template, (fork, measured memory) pairs)."""
        if forks is None:
            forks = {t: {"live": len(s), "exited": 0} for t, s in live.items()}
        counts = forks
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(lambda: self._families(live, templates, hot_pages, counts)))
        registry.register(_Collector(lambda: _memory_families(memory or {})))
        return generate_latest(registry)

    def _families(
        self,
        live: Mapping[str, Sequence[ForkStats]],
        templates: Sequence[str],
        hot_pages: Mapping[str, int],
        forks: Mapping[str, Mapping[str, int]],
    ) -> Iterator[Metric]:
        with self._lock:
            totals = {t: _copy(v) for t, v in self._totals.items()}
        names = sorted(set(totals) | set(live) | set(templates) | set(forks))
        label = ["template"]
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(f"pagefork_{name}", help_text, labels=label)
            for t in names:
                value = totals[t].counters[name] if t in totals else 0
                value += sum(int(getattr(s, name)) for s in live.get(t, ()))
                family.add_metric([t], value)
            yield family
        started = CounterMetricFamily(
            "pagefork_forks_ended", "Forks whose session ended", labels=label
        )
        live_forks = GaugeMetricFamily(
            "pagefork_live_forks", "Forks held whose VMM runs (state live)", labels=label
        )
        exited_forks = GaugeMetricFamily(
            "pagefork_exited_forks",
            "Forks held whose VMM has exited, until they are released (state exited)",
            labels=label,
        )
        hot = GaugeMetricFamily(
            "pagefork_hot_pages", "Pages in the template's hot set (0: none yet)", labels=label
        )
        for t in names:
            started.add_metric([t], totals[t].forks_ended if t in totals else 0)
            live_forks.add_metric([t], forks.get(t, {}).get("live", 0))
            exited_forks.add_metric([t], forks.get(t, {}).get("exited", 0))
            hot.add_metric([t], hot_pages.get(t, 0))
        restarts = CounterMetricFamily(
            "pagefork_worker_restarts",
            "Worker processes of the template's page server that died and were replaced",
            labels=label,
        )
        for t in names:
            restarts.add_metric([t], totals[t].worker_restarts if t in totals else 0)
        yield started
        yield restarts
        yield live_forks
        yield exited_forks
        yield hot
        yield GaugeMetricFamily("pagefork_templates", "Templates registered", value=len(templates))
        latency = HistogramMetricFamily(
            "pagefork_fault_latency_seconds",
            "Fault service time: from reading the fault to the page installed",
            labels=label,
        )
        for t in names:
            tot = totals.get(t, _Totals())
            cumulative: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), tot.buckets, strict=True):
                running += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric([t], cumulative, sum_value=tot.latency_sum)
        yield latency


def _memory_families(
    memory: Mapping[str, Sequence[tuple[str, ProcessMemory]]],
) -> Iterator[Metric]:
    total = GaugeMetricFamily(
        "pagefork_memory_bytes",
        "Memory of the template's live forks' VMMs, summed (kind: rss, pss, private, shared; "
        "guest_*: guest RAM only). The pss sum is what the forks cost together",
        labels=["template", "kind"],
    )
    per_fork = GaugeMetricFamily(
        "pagefork_fork_memory_bytes",
        "Memory of one live fork's VMM (kind as in pagefork_memory_bytes)",
        labels=["template", "fork", "kind"],
    )
    merged = GaugeMetricFamily(
        "pagefork_ksm_merging_pages",
        "Pages of the template's live forks that KSM merged (ksm_stat)",
        labels=["template"],
    )
    for t in sorted(memory):
        forks = memory[t]
        for kind in MEMORY_KINDS:
            total.add_metric([t, kind], sum(int(getattr(m, kind)) for _, m in forks))
            for fork, m in forks:
                per_fork.add_metric([t, fork, kind], int(getattr(m, kind)))
        merged.add_metric([t], sum(m.ksm_merging_pages or 0 for _, m in forks))
    yield total
    yield per_fork
    yield merged


def _bucket(seconds: float) -> int:
    for i, bound in enumerate(LATENCY_BUCKETS):
        if seconds <= bound:
            return i
    return len(LATENCY_BUCKETS)


def _copy(t: _Totals) -> _Totals:
    return _Totals(
        dict(t.counters), t.forks_ended, t.worker_restarts, list(t.buckets), t.latency_sum
    )


class _Collector:
    """A prometheus_client collector over a function that yields metric families."""

    def __init__(self, families: Callable[[], Iterator[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        """Called by ``generate_latest``."""
        return self._families()


__all__ = ["CONTENT_TYPE", "COUNTERS", "LATENCY_BUCKETS", "MEMORY_KINDS", "DaemonMetrics"]
