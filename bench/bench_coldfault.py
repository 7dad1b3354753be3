"""A cold chunk's first fault, and a new server's first fork on a warm host cache.

A local S3-compatible server (``moto_server``) runs behind the latency proxy of
:mod:`pagefork.testing.s3proxy` (a process of its own). Every fork is a test VMM (its own
process) that checks every byte it touches.

a. **A demand fault on a cold chunk.** A fresh page server and an empty host cache each round;
   the guest touches one page in each of a few chunks, one touch at a time: each touch is one
   fault whose chunk is not on the host. Compared: the template pushed without per-block
   digests (the fault waits for its whole 2 MiB chunk) and with them (the fault waits for the
   one block around it: 16, 64 or 256 KiB; the rest of the chunk follows in the background).
   Store at 0 ms and 20 ms added latency, and at 20 ms over a link capped at 40 MiB/s (shared
   by all GETs): the cap is where the bytes of a whole chunk cost most.
b. **Warm host cache.** A new page server on a host whose cache holds the whole template: its
   first fork walks a scattered hot set on demand. *warm view*: the chunks the cache holds are
   installed into the view when the template opens (in the background, one read each, no
   hashing); *on fault*: each chunk is read from the cache (no hashing) when a fault first
   needs it. Against a local mem-file served the same way (its server already open, as the
   cache-backed server's workers are started before the walk is timed). The template's open
   (until the server is ready) is shown beside: it is what a user pays once per server.

Run: ``python bench/bench_coldfault.py [--quick]``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Any

from _common import (
    PAGE,
    MiB,
    alternating,
    console,
    fmt,
    header,
    make_mem_file,
    median,
    paired_ratio,
    s3_store,
    scattered_runs,
    scratch_dir,
    standalone,
    table,
)

from pagefork.server import PageServer, ServerConfig
from pagefork.store.cache import ChunkCache
from pagefork.store.client import make_client
from pagefork.store.layout import parse_s3_url
from pagefork.store.lazy import LazyTemplate, StoreOptions
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3ProxyProcess
from pagefork.testing.vmm import VmmProcess

TARGETS = {"warm_cache_ratio": ("<=", 1.2)}
SUMMARY = {
    "cold_fault_ms_whole_0ms": "(a) a cold chunk's first fault, whole chunk (ms), 0 ms store",
    "cold_fault_ms_block_0ms": "(a) the same, its 64 KiB block first (ms)",
    "cold_fault_ms_whole_20ms": "(a) a cold chunk's first fault, whole chunk (ms), 20 ms store",
    "cold_fault_ms_block_20ms": "(a) the same, its 64 KiB block first (ms)",
    "cold_fault_ms_whole_20ms_cap": "(a) whole chunk (ms), 20 ms store over a 40 MiB/s link",
    "cold_fault_ms_block_20ms_cap": "(a) the same, its 64 KiB block first (ms)",
    "warm_cache_ratio": "(b) a new server's first fork from a warm host cache / local mem-file",
    "warm_fault_ratio": "(b) the same, chunks read from the cache on fault only",
    "warm_cache_new_ratio": "(b) a warm-cache first fork / a new local mem-file server's first",
}
#: The capped link of the last cold-fault row (bytes per second, shared by all GETs).
_CAP = 40 * MiB


class _Servers:
    def __init__(self, work: str, proxy: S3ProxyProcess) -> None:
        self.work = work
        self.proxy = proxy
        self.n = 0

    def path(self, what: str) -> str:
        self.n += 1
        return os.path.join(self.work, f"{what}{self.n}")

    def server(self, mem: str, cache: str | None = None, warm: bool = True) -> PageServer:
        sockets = self.path("s")
        os.mkdir(sockets)
        store = None
        if cache is not None:
            store = StoreOptions(
                cache=ChunkCache(cache, 1 << 40), endpoint_url=self.proxy.url, warm_view=warm
            )
        config = ServerConfig(mem_file_path=mem, socket_dir=sockets, store=store)
        server = PageServer(config)
        server.wait_ready()
        return server

    def walk(
        self,
        server: PageServer,
        mem: str,
        guest: int,
        touches: list[list[Any]],
        settle: bool = False,
    ) -> float:
        """One fork: each of ``touches`` in turn; the median seconds of one. With ``settle``,
        each touch's chunks are waited for in full before the next (the rest of a chunk
        fetched in the background must not queue the next fault behind it: moto serves one
        GET at a time, where a real store serves many)."""
        self.n += 1
        fork_id = f"f{self.n}"
        path = server.register_fork(fork_id)
        # Every VMM on the first CPU, so every fork is served by that CPU's worker (a fault
        # served across cores costs several times one served on the VMM's own).
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(mine)})
        try:
            vm = VmmProcess(path, mem, [f"{guest // MiB}M"])
        finally:
            os.sched_setaffinity(0, mine)
        seconds: list[float] = []
        try:
            server.wait_connected(fork_id)
            for pages in touches:
                reply = vm.send(cmd="touch", pages=pages)
                if reply["bad"]:
                    raise RuntimeError(f"fork {fork_id}: {reply['bad']} pages differ")
                seconds.append(reply["seconds"])
                lazy = server.memfile
                if settle and isinstance(lazy, LazyTemplate):
                    lazy.ensure([o // lazy.chunk_size for _, o in pages], 60)
        finally:
            vm.close()
        stats = server.wait_ended(fork_id, timeout=60)
        server.unregister_fork(fork_id)
        if stats.errors:
            raise RuntimeError(f"fork {fork_id} failed: {stats.error}")
        return median(seconds) if len(seconds) > 1 else seconds[0]


def _cold_faults(
    s: _Servers, mem: str, guest: int, urls: dict[str, str], rounds: int
) -> dict[str, list[float]]:
    """(a): per template, the median ms of a cold chunk's first fault, per round."""
    chunk = 2 * MiB
    # One non-zero page in the middle of each of 6 chunks (the mem-file's zero pages are random:
    # the VMM checks every byte, a zero page would be served without a fetch).
    touches = [[[0, c * chunk + chunk // 2 + PAGE]] for c in range(1, guest // chunk, 5)][:6]
    out: dict[str, list[float]] = {}
    for _, name in alternating(rounds, list(urls)):
        server = s.server(urls[name], s.path("cache"))
        try:
            ms = s.walk(server, mem, guest, touches, settle=True) * 1000
            out.setdefault(name, []).append(ms)
        finally:
            server.close()
    return out


def main(quick: bool = False) -> dict[str, Any]:
    """Run the comparisons; return the figures."""
    if importlib.util.find_spec("moto") is None:
        return {"skipped": "needs moto[server] for a local S3 server: pip install '.[dev]'"}
    guest = (32 if quick else 64) * MiB
    rounds = 3 if quick else 5
    header(
        "Cold-chunk faults and warm host caches",
        f"{guest // MiB} MiB template, 2 MiB chunks, {rounds} rounds per comparison; "
        "moto_server behind a latency proxy.",
    )
    figures: dict[str, Any] = {}
    with scratch_dir() as work, s3_store() as (endpoint, proxy):
        client = make_client(endpoint)
        client.create_bucket(Bucket="bench")
        s = _Servers(work, proxy)
        mem = os.path.join(work, "mem")
        make_mem_file(mem, guest, 0.0, seed=1)
        urls: dict[str, str] = {}
        sizes = (("whole", 0), ("16K", 16 << 10), ("block", 64 << 10), ("256K", 256 << 10))
        for name, block in sizes:
            if quick and name in ("16K", "256K"):
                continue
            urls[name] = f"s3://bench/t-{name}"
            push(parse_s3_url(urls[name]), mem, client, block_size=block)

        # a. a cold chunk's first fault
        rows = []
        for delay, cap in ((0, 0), (20, 0), (20, _CAP)):
            proxy.set_delay(delay / 1000)
            proxy.set_bandwidth(cap)
            got = _cold_faults(s, mem, guest, urls, rounds)
            ms = f"{delay}ms_cap" if cap else f"{delay}ms"
            for name, values in got.items():
                figures[f"cold_fault_ms_{name}_{ms}"] = median(values)
            ratio = paired_ratio(got["whole"], got["block"])
            figures[f"cold_fault_speedup_{ms}"] = ratio
            for name, values in got.items():
                label = {"whole": "whole chunk", "block": "64K block"}.get(name, f"{name} block")
                rows.append([str(ms), label, fmt(median(values), 1)])
        proxy.set_bandwidth(0)
        table("a. a cold chunk's first fault", ["store", "fault waits for", "ms (median)"], rows)

        # b. a new server's first fork on a warm host cache
        proxy.set_delay(0.020)  # a store that would be far away: warm forks must not reach it
        cache = s.path("cache")
        filler = s.server(urls["block"], cache)
        try:
            everything = [[0, o] for o in range(0, guest, PAGE)]
            s.walk(filler, mem, guest, [everything])
        finally:
            filler.close()
        runs = scattered_runs(guest // PAGE, guest // PAGE // 10, seed=5)
        hot = [[[0, p * PAGE] for run in runs for p in run]]
        local = s.server(mem)
        res: dict[str, list[float]] = {}
        try:
            for _, mode in alternating(rounds, ["local", "local_new", "warm", "fault"]):
                if mode == "local":
                    res.setdefault(mode, []).append(s.walk(local, mem, guest, hot) * 1000)
                    continue
                t0 = time.perf_counter()
                if mode == "local_new":
                    fresh = s.server(mem)
                else:
                    fresh = s.server(urls["block"], cache, warm=mode == "warm")
                res.setdefault(f"{mode}_open", []).append((time.perf_counter() - t0) * 1000)
                try:
                    res.setdefault(mode, []).append(s.walk(fresh, mem, guest, hot) * 1000)
                    lazy = fresh.memfile
                    if not isinstance(lazy, LazyTemplate):
                        continue
                    if lazy.gets or lazy.cache.hashed:
                        raise RuntimeError("a warm fork reached the store or hashed")
                    res.setdefault(f"{mode}_installed", []).append(lazy.warm_chunks)
                finally:
                    fresh.close()
        finally:
            local.close()
        figures["warm_local_ms"] = median(res["local"])
        figures["warm_cache_ms"] = median(res["warm"])
        figures["warm_fault_ms"] = median(res["fault"])
        figures["warm_local_new_ms"] = median(res["local_new"])
        figures["warm_cache_ratio"] = paired_ratio(res["warm"], res["local"])
        figures["warm_fault_ratio"] = paired_ratio(res["fault"], res["local"])
        figures["warm_cache_new_ratio"] = paired_ratio(res["warm"], res["local_new"])
        figures["warm_fault_new_ratio"] = paired_ratio(res["fault"], res["local_new"])
        figures["warm_installed_chunks"] = median(res["warm_installed"])
        figures["local_new_open_ms"] = median(res["local_new_open"])
        figures["warm_open_ms"] = median(res["warm_open"])
        figures["fault_open_ms"] = median(res["fault_open"])
        table(
            "b. a new server's first fork, on demand",
            ["template", "walk ms", "vs local (open)", "vs local (new)", "server open ms"],
            [
                ["local mem-file, server open", fmt(figures["warm_local_ms"], 1), "1.00", "", "-"],
                [
                    "local mem-file, new server",
                    fmt(figures["warm_local_new_ms"], 1),
                    "",
                    "1.00",
                    fmt(figures["local_new_open_ms"], 0),
                ],
                [
                    "warm cache, installed at open",
                    fmt(figures["warm_cache_ms"], 1),
                    fmt(figures["warm_cache_ratio"]),
                    fmt(figures["warm_cache_new_ratio"]),
                    fmt(figures["warm_open_ms"], 0),
                ],
                [
                    "warm cache, read on fault",
                    fmt(figures["warm_fault_ms"], 1),
                    fmt(figures["warm_fault_ratio"]),
                    fmt(figures["warm_fault_new_ratio"]),
                    fmt(figures["fault_open_ms"], 0),
                ],
            ],
        )
        console.print(
            f"chunks installed from the cache at open: {figures['warm_installed_chunks']:g} "
            f"of {guest // (2 * MiB)}"
        )
        console.print(f"hot set {len(hot[0])} pages; every byte checked by the guest")
    return figures


if __name__ == "__main__":
    standalone(main)
