"""Layered templates: demand-fault latency at layer depth 1, 4 and 16 against no layers.

One 64 MiB base mem-file; chains of 1, 4 and 16 layers over it, each layer changing a random
10% of the pages (in runs of 1-8 pages) and zeroing a few runs. Four page servers, one per
variant, serve fresh test VMMs that read one byte of every page in random order. Each server
has one worker, pinned with the VMMs to one CPU, so no variant gains or loses by where its
faults are served. Rounds alternate the variants (ABCD, DCBA, ...), and each ratio is the
median of per-round ratios against the no-layer server: of the guest-visible time per fault,
and of the server's own service time (p50 of its per-fault latencies). A first round per
variant checks every page against the chain's bytes.

What a user also pays: the time to open a chain (resolve it, build the zero index, start the
workers that map it), and the layers' size on disk. The last part opens a 256 MiB chain whose
one layer holds a random half of the pages, the worst case for the number of mappings a
worker needs (``vm.max_map_count``).

Reading it: a layer costs nothing per fault (each worker maps the chain once, and a fault
copies from one address whatever the depth); depth is paid when a chain is opened, and on
disk.
"""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

from _common import (
    PAGE,
    Forks,
    MiB,
    alternating,
    console,
    fmt,
    header,
    make_mem_file,
    median,
    paired_ratio,
    scratch_dir,
    standalone,
    table,
    verdict,
)

from pagefork.layers.format import write_layer
from pagefork.layers.source import LayeredView, flatten, max_segments
from pagefork.server import PageServer, ServerConfig
from pagefork.stats import ForkStats

GUEST = 64 * MiB
PAGES = GUEST // PAGE
DEPTHS = (0, 1, 4, 16)
CHANGED = 0.10
#: The CPU the worker and each VMM run on.
CPU = min(os.sched_getaffinity(0))

TARGETS = {
    "ratio_depth1_over_none": ("<=", 1.05),
    "ratio_depth4_over_none": ("<=", 1.05),
    "ratio_depth16_over_none": ("<=", 1.05),
}
SUMMARY = {
    "ratio_depth1_over_none": "guest-visible time per demand fault, 1 layer / no layers",
    "ratio_depth4_over_none": "the same, 4 layers",
    "ratio_depth16_over_none": "the same, 16 layers",
    "server_ratio_depth1_over_none": "server-side p50 per fault, 1 layer / no layers",
    "server_ratio_depth4_over_none": "the same, 4 layers",
    "server_ratio_depth16_over_none": "the same, 16 layers",
    "none_us_per_fault": "µs per demand fault, no layers",
    "depth16_us_per_fault": "µs per demand fault, 16 layers",
    "depth16_open_ms": "opening a 16-layer chain: resolve, zero index, workers mapped (ms)",
    "none_open_ms": "opening the base alone (ms)",
    "depth16_segments": "segments of the 16-layer chain (mappings per worker, about)",
    "half_random_segments": "segments of a 256 MiB layer holding a random half of the pages",
    "half_random_open_ms": "opening that chain (ms)",
    "half_random_base_open_ms": "opening its base alone (ms)",
    "bad_pages": "pages whose bytes differed from the chain's (must be 0)",
}


class LayeredForks(Forks):
    """:class:`Forks` of a layered template; its VMMs check pages against ``oracle``."""

    def __init__(self, workdir: str, name: str, base: str, layers: list[str], oracle: str) -> None:
        self.name = name
        self.mem_file = oracle
        self.timeout = 30.0
        sockets = os.path.join(workdir, name)
        os.mkdir(sockets)
        self._ended: dict[str, ForkStats] = {}
        self._ended_cond = threading.Condition()
        t0 = time.perf_counter()
        self.server = PageServer(
            ServerConfig(
                mem_file_path=base,
                socket_dir=sockets,
                layers=tuple(layers),
                on_fork_end=self._on_end,
                # One worker on CPU 0, and each VMM pinned there too (see pin_vmm): every fault
                # is then served on its own core, whatever the placement would pick.
                workers=1,
                pin_workers=False,
            )
        )
        self.server.wait_ready(timeout=60)
        for pid in self.server.worker_pids():
            os.sched_setaffinity(pid, {CPU})
        #: Seconds to open the chain and have every worker map it.
        self.open_seconds = time.perf_counter() - t0
        self._n = 0


def make_chain(workdir: str, depth: int, seed: int) -> tuple[list[str], int]:
    """``depth`` layers over the base; returns their paths and total bytes."""
    rng = random.Random(seed)
    paths: list[str] = []
    total = 0
    for d in range(depth):
        pages: dict[int, bytes] = {}
        while len(pages) < PAGES * CHANGED:
            first = rng.randrange(PAGES - 8)
            for p in range(first, first + rng.randint(1, 8)):
                pages[p] = rng.randbytes(PAGE)
        runs = []
        for _ in range(4):
            first = rng.randrange(PAGES - 64)
            if not any(first <= p < first + 64 for p in pages):
                runs.append((first, 64))
        path = os.path.join(workdir, f"d{depth}-layer{d}.pfl")
        total += write_layer(path, size=GUEST, pages=sorted(pages.items()), zero_runs=runs).bytes
        paths.append(path)
    return paths, total


def _open_seconds(base: str, layers: tuple[str, ...], sockets: str) -> tuple[float, int]:
    """Seconds to start a server of the chain with every worker serving; its segments."""
    os.mkdir(sockets)
    t0 = time.perf_counter()
    server = PageServer(ServerConfig(mem_file_path=base, socket_dir=sockets, layers=layers))
    try:
        server.wait_ready(timeout=120)
        seconds = time.perf_counter() - t0
        view = server.memfile
        if isinstance(view, LayeredView) and view.materialized:
            raise RuntimeError("the half-random layer was materialized, not mapped")
        return seconds, len(view.segments) if isinstance(view, LayeredView) else 0
    finally:
        server.close()


def half_random(workdir: str) -> tuple[int, float, float, int]:
    """A 256 MiB chain whose layer holds a random half of the pages: (segments, seconds to
    open it, seconds to open its base alone, the worker budget of segments)."""
    size = 256 * MiB
    base = os.path.join(workdir, "big.mem")
    with open(base, "wb") as f:
        f.truncate(size)
    rng = random.Random(7)
    pages = sorted(rng.sample(range(size // PAGE), size // PAGE // 2))
    layer = os.path.join(workdir, "big.pfl")
    data = b"\x5a" * PAGE
    write_layer(layer, size=size, pages=((p, data) for p in pages))
    alone: list[float] = []
    chain: list[float] = []
    segments = 0
    for r, layers in alternating(3, ((), (layer,))):  # medians of 3, interleaved
        seconds, n = _open_seconds(base, layers, os.path.join(workdir, f"big-{r}-{len(layers)}"))
        (chain if layers else alone).append(seconds)
        segments = max(segments, n)
    return segments, median(chain), median(alone), max_segments()


def main(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns its figures."""
    rounds = 3 if quick else 11
    header(
        "layers: demand faults at layer depth 1, 4, 16 vs no layers",
        f"{GUEST // MiB} MiB guest ({PAGES} pages), each layer changes {CHANGED:.0%} of the "
        f"pages; one fault per page in random order, fresh VMM per round, {rounds} rounds, "
        "variants interleaved.",
    )
    figures: dict[str, Any] = {"rounds": rounds}
    with scratch_dir() as workdir:
        base = os.path.join(workdir, "base.mem")
        make_mem_file(base, GUEST, 0.25, seed=1)
        servers: dict[int, Forks] = {}
        sizes: dict[int, int] = {}
        try:
            for depth in DEPTHS:
                if depth == 0:
                    servers[0] = LayeredForks(workdir, "none", base, [], base)
                    figures["none_open_ms"] = servers[0].open_seconds * 1e3
                    continue
                layers, sizes[depth] = make_chain(workdir, depth, seed=depth)
                oracle = os.path.join(workdir, f"d{depth}.flat")
                flatten(base, layers, oracle)
                forks = LayeredForks(workdir, f"d{depth}", base, layers, oracle)
                servers[depth] = forks
                assert isinstance(forks.server.memfile, LayeredView)
                figures[f"depth{depth}_segments"] = len(forks.server.memfile.segments)
                figures[f"depth{depth}_open_ms"] = forks.open_seconds * 1e3
                figures[f"depth{depth}_layer_mib"] = sizes[depth] / MiB
            bad = 0
            for forks in servers.values():  # one checked round each, untimed
                with forks.fork(GUEST) as fork:
                    bad += int(fork.vm.send(cmd="touch", all=True, verify=True)["bad"])
            figures["bad_pages"] = bad
            console.print(f"correctness (every page of every variant checked): {bad} bad")
            us: dict[int, list[float]] = {d: [] for d in DEPTHS}
            served_p50: dict[int, list[float]] = {d: [] for d in DEPTHS}
            for r, depth in alternating(rounds, DEPTHS):
                with servers[depth].fork(GUEST) as fork:
                    os.sched_setaffinity(fork.vm.pid, {CPU})  # the thread that touches
                    reply = fork.vm.send(
                        cmd="touch", all=True, order="random", seed=r + 1, verify=False
                    )
                assert fork.stats is not None
                if fork.stats.faults != PAGES:
                    raise RuntimeError(f"depth {depth}: {fork.stats.faults} faults, not {PAGES}")
                us[depth].append(float(reply["seconds"]) / PAGES * 1e6)
                served_p50[depth].append(fork.stats.latency_us["p50"])
        finally:
            for forks in servers.values():
                forks.close()
        segments, seconds, alone, budget = half_random(workdir)
    figures["half_random_segments"] = segments
    figures["half_random_open_ms"] = seconds * 1e3
    figures["half_random_base_open_ms"] = alone * 1e3
    figures["segment_budget"] = budget
    rows = []
    for depth in DEPTHS:
        name = "none" if depth == 0 else f"depth{depth}"
        figures[f"{name}_us_per_fault"] = median(us[depth])
        figures[f"{name}_server_p50_us"] = median(served_p50[depth])
        ratio = paired_ratio(us[depth], us[0]) if depth else 1.0
        server_ratio = paired_ratio(served_p50[depth], served_p50[0]) if depth else 1.0
        if depth:
            figures[f"ratio_depth{depth}_over_none"] = ratio
            figures[f"server_ratio_depth{depth}_over_none"] = server_ratio
        rows.append(
            [
                "none" if depth == 0 else str(depth),
                fmt(median(us[depth])),
                fmt(ratio),
                fmt(median(served_p50[depth])),
                fmt(server_ratio),
                fmt(figures.get(f"depth{depth}_open_ms", figures["none_open_ms"]), 0),
                str(figures.get(f"depth{depth}_segments", 0)),
                fmt(sizes.get(depth, 0) / MiB, 1),
            ]
        )
    table(
        "demand faults by layer depth (median of rounds; ratio: median of per-round ratios)",
        ["depth", "µs/fault", "vs none", "srv p50", "vs none", "open ms", "segments", "MiB"],
        rows,
    )
    for depth in DEPTHS[1:]:
        console.print(
            verdict(f"depth {depth} / none", figures[f"ratio_depth{depth}_over_none"], "<=", 1.05)
        )
    for depth in DEPTHS[1:]:
        per_round = [a / b for a, b in zip(us[depth], us[0], strict=True)]
        console.print(f"depth {depth} / none per round: " + ", ".join(fmt(x) for x in per_round))
    console.print(
        f"256 MiB chain, a random half of its pages in one layer: {segments:,} segments "
        f"(a worker may map {budget:,}), opened and mapped by every worker in "
        f"{fmt(seconds * 1e3, 0)} ms; its base alone: {fmt(alone * 1e3, 0)} ms"
    )
    return figures


if __name__ == "__main__":
    standalone(main)
