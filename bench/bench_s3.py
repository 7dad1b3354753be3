"""Templates in object storage: cold and warm forks against a local mem-file, and pushes.

A local S3-compatible server (``moto_server``) runs on this host, behind the latency proxy of
:mod:`pagefork.testing.s3proxy` (a process of its own, as a store is), which adds a fixed delay
before every request is forwarded: 0 ms (this host's own HTTP round trip), 20 ms (a store in
another zone) or 50 ms (another region); and, in one row, caps the bandwidth of all GET
answers together at 40 MiB/s (a modest or busy link), on top of 20 ms. Every fork is a
test VMM (its own process) that touches the template's hot set (scattered runs of 1-3 pages,
in first-touch order) and checks every byte. Variants alternate round by round; figures are
medians, ratios medians of per-round ratios.

a. **Cold-cache fork.** A fresh page server and an empty host cache each round: nothing of the
   template is on this host. *on demand*: every missing chunk is fetched when the guest first
   faults in it (one GET at a time, as the guest walks). *prefetched*: the hot set's chunks are
   fetched in parallel first (``server.prefetch``), then installed. *hot pack*: the same
   template pushed with its hot set, so its hot pages are one object (the hot pack), which the
   prefetch fetches in a few parallel ranged GETs; the rest stays lazy. Fork-ready = prefetch
   (if any) + the guest's walk of its hot set. Per fork: the bytes fetched before the guest
   resumes against the hot set's bytes, and the GETs made (chunks and pack; the manifest, read
   when the server opens, is not counted). Done at 0, 20 and 50 ms and capped, side by side,
   and at 20 ms for chunk sizes of 1, 2 and 4 MiB (the full run), which is how the default
   chunk size was chosen. A quick run does the 50 ms and capped rows in 2 rounds, on demand
   and from the hot pack only.
b. **Warm-cache fork vs a local mem-file.** b1: the walk on demand, by a later fork of a
   template whose chunks are in the server's view (every fork after the first on that server:
   only the presence check remains) against a local mem-file. b2: the first fork of a new page
   server on a host whose cache holds the template (chunks are read from the cache, verified
   and copied into the view as they are needed), on demand and prefetched, against a new fork
   of a local mem-file served the same way.
c. **Push.** Upload throughput of a template to the store (0 ms). Then a snapshot pushed as a
   layer: a fork of a built-in microVM template (KVM) runs its guest, whose write phase changes
   what it changes (nothing here sets it), is snapshotted through the daemon, and the child is
   pushed after its parent twice: as chunks of its whole memory (``push --layer``: chunks
   equal to the parent's are not uploaded, but one changed page costs its chunk) and as a
   layer (``push --layer --parent``: its own pages, packed). The bytes uploaded, counted at
   the store (the proxy), against the bytes the guest changed. Skipped without ``/dev/kvm``.

Reading it: ``moto_server`` serves one GET at a time, so prefetching in parallel hides the
store's latency but not moto's own serial service time; a store that serves GETs in parallel
gains more. The hot set here is scattered over all of memory, so every chunk is fetched
unless the template has a hot pack.

Run: ``python bench/bench_s3.py [--quick]``. Prints figures and ratios; no assertions.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import tempfile
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
    verdict,
)

from pagefork.hotpages import HotPageList, encode
from pagefork.server import PageServer, ServerConfig
from pagefork.store.cache import ChunkCache
from pagefork.store.client import make_client
from pagefork.store.layerpush import push_layer
from pagefork.store.layout import parse_s3_url
from pagefork.store.lazy import LazyTemplate, StoreOptions
from pagefork.store.push import push
from pagefork.testing.s3proxy import S3ProxyProcess
from pagefork.testing.vmm import VmmProcess

TARGETS = {
    "warm_view_ratio": ("<=", 1.1),
    "cold_pack_fetch_ratio": ("<=", 1.25),
    "cold_pack_speedup_0ms": (">=", 3.0),
    "cold_pack_speedup_20ms": (">=", 5.0),
    "layer_push_amplification": ("<=", 1.2),
}
SUMMARY = {
    "cold_speedup_0ms": "(a) cold-cache fork, on demand / prefetched, store at 0 ms",
    "cold_speedup_20ms": "(a) the same, store at 20 ms",
    "cold_pack_speedup_0ms": "(a) cold-cache fork, on demand / prefetched from a hot pack, 0 ms",
    "cold_pack_speedup_20ms": "(a) the same, store at 20 ms",
    "cold_pack_speedup_50ms": "(a) the same, store at 50 ms",
    "cold_pack_speedup_20ms_cap": "(a) the same, store at 20 ms over a link capped at 40 MiB/s",
    "cold_demand_gets_0ms": "(a) GETs an on-demand cold fork makes (chunks)",
    "cold_demand_fetched_0ms": "(a) bytes an on-demand cold fork fetches before resume (none)",
    "cold_demand_total_bytes_0ms": "(a) bytes an on-demand cold fork fetches in all, 0 ms",
    "cold_pack_fetch_ratio": "(a) bytes a hot-pack prefetch fetches before resume / hot set bytes",
    "cold_pack_gets": "(a) GETs a hot-pack prefetched fork makes (pack and chunks)",
    "warm_view_ratio": "(b1) a later fork, chunks in the server's view / a local mem-file",
    "warm_cache_ratio": "(b2) a new server's first fork from a warm host cache / a local mem-file, "
    "on demand",
    "warm_cache_prefetch_ratio": "(b2) the same, prefetched",
    "push_mib_s": "(c) push throughput to the local store (MiB/s)",
    "snapshot_uploaded_share": "(c) a snapshot pushed as whole-memory chunks: uploaded / "
    "template bytes",
    "snapshot_amplification": "(c) the same: bytes uploaded / bytes the guest changed",
    "layer_push_amplification": "(c) a snapshot pushed as a layer (push --layer --parent): page "
    "bytes uploaded / bytes the guest changed",
    "layer_push_ratio_with_index": "(c) the same, with its manifest (index, zero map) counted",
}

#: The bandwidth cap of the capped-store row (bytes per second, shared by all GETs): a
#: store reached over a busy or modest link.
_CAP = 40 << 20


def _hot_pages(guest_pages: int, share: float, seed: int) -> list[tuple[int, int]]:
    runs = scattered_runs(guest_pages, int(guest_pages * share), seed)
    random.Random(seed).shuffle(runs)
    return [(0, p * PAGE) for run in runs for p in run]


class _Bench:
    def __init__(self, work: str, endpoint: str, proxy: S3ProxyProcess) -> None:
        self.work = work
        self.endpoint = endpoint
        self.proxy = proxy
        self.client = make_client(endpoint)
        self.client.create_bucket(Bucket="bench")
        self._n = 0

    def server(self, mem: str, cache_dir: str | None = None) -> PageServer:
        self._n += 1
        sockets = os.path.join(self.work, f"s{self._n}")
        os.mkdir(sockets)
        store = None
        if cache_dir is not None:
            cache = ChunkCache(cache_dir, 1 << 40)
            store = StoreOptions(cache=cache, endpoint_url=self.proxy.url)
        server = PageServer(ServerConfig(mem_file_path=mem, socket_dir=sockets, store=store))
        server.wait_ready()  # the workers' start-up is not what is measured
        return server

    def fresh_cache(self) -> str:
        self._n += 1
        return os.path.join(self.work, f"cache{self._n}")

    def fork(
        self,
        server: PageServer,
        mem_file: str,
        guest: int,
        pages: list[tuple[int, int]],
        prefetch: bool,
    ) -> dict[str, float]:
        """One fork: (prefetch +) the guest's walk of ``pages``; times in ms."""
        self._n += 1
        fork_id = f"f{self._n}"
        path = server.register_fork(fork_id)
        # Every VMM pinned to the first CPU, so every fork is served by that CPU's worker: a
        # fault served across cores costs 3-4x one served on the VMM's own (bench_workers), and
        # placement luck must not decide a comparison.
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(mine)})
        try:
            vm = VmmProcess(path, mem_file, [f"{guest // MiB}M"])
        finally:
            os.sched_setaffinity(0, mine)
        try:
            server.wait_connected(fork_id)
            lazy = server.memfile if isinstance(server.memfile, LazyTemplate) else None
            gets0 = lazy.gets if lazy is not None else 0
            bytes0 = lazy.fetched_bytes if lazy is not None else 0
            t0 = time.perf_counter()
            fetched = 0
            if prefetch:
                result = server.prefetch(fork_id, HotPageList.from_pages(pages), timeout=120)
                fetched = result.fetched_bytes
            prefetch_ms = (time.perf_counter() - t0) * 1000
            reply = vm.send(cmd="touch", pages=[list(p) for p in pages])
            if reply["bad"]:
                raise RuntimeError(f"fork {fork_id}: {reply['bad']} pages differ")
        finally:
            vm.close()
        stats = server.wait_ended(fork_id, timeout=60)
        server.unregister_fork(fork_id)
        if stats.errors:
            raise RuntimeError(f"fork {fork_id} failed: {stats.error}")
        walk_ms = reply["seconds"] * 1000
        return {
            "ready": prefetch_ms + walk_ms,
            "prefetch": prefetch_ms,
            "fetched": fetched,
            # The whole fork's (the walk's faults too), counted by the lazy template.
            "gets": lazy.gets - gets0 if lazy is not None else 0,
            "total_bytes": lazy.fetched_bytes - bytes0 if lazy is not None else 0,
        }


def _chunk_gets(proxy: S3ProxyProcess) -> int:
    return sum(n for path, n in proxy.gets().items() if "/chunks/" in path)


def _cold(
    b: _Bench,
    mem: str,
    url: str,
    guest: int,
    pages: list[tuple[int, int]],
    rounds: int,
    packed_url: str | None = None,
    chunk_prefetch: bool = True,
) -> dict[str, list[float]]:
    """Cold forks, on demand and prefetched (and, with ``packed_url``, prefetched from the
    template pushed with its hot pack): ready ms, and per mode the prefetch's ms, the bytes
    fetched before resume and in all, and the GETs made."""
    modes = ["demand"] + (["prefetch"] if chunk_prefetch else []) + (["pack"] if packed_url else [])
    out: dict[str, list[float]] = {}
    for _, mode in alternating(rounds, modes):
        server = b.server(packed_url if mode == "pack" else url, b.fresh_cache())
        try:
            got = b.fork(server, mem, guest, pages, prefetch=mode != "demand")
        finally:
            server.close()
        out.setdefault(mode, []).append(got["ready"])
        for name in ("prefetch", "fetched", "gets", "total_bytes"):
            out.setdefault(f"{mode}_{name}", []).append(got[name])
    return out


def _snapshot_push(client: Any, proxy: S3ProxyProcess, guest: int) -> dict[str, Any]:
    """c2: a microVM fork's snapshot pushed over its pushed template, as fixed chunks of the
    whole memory and as a layer (its own pages), the bytes uploaded counted at the store."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        console.print("c2. snapshot push: skipped (needs /dev/kvm)")
        return {}
    from pagefork.daemon.client import DaemonClient
    from pagefork.daemon.service import Daemon

    short = tempfile.mkdtemp(prefix="pf-bench-", dir="/tmp")  # a Unix socket path is short
    daemon = Daemon(
        os.path.join(short, "state"), os.path.join(short, "c.sock"), socket_dir=short + "/f"
    )
    daemon.start()
    counted = make_client(proxy.url)  # the pushes measured go through the proxy, which counts

    def uploaded() -> int:
        put = proxy.stats()["put_bytes"]
        assert isinstance(put, dict)
        return sum(int(n) for n in put.values())

    try:
        dc = DaemonClient(os.path.join(short, "c.sock"), timeout=300)
        record = dc.create_template("vm", "kvm", mem_size_mib=guest // MiB)
        fork = dc.create_fork("vm", vmm="kvm", options={"fork_index": 0, "snapshots": True})
        dc.wait_fork(fork["fork"], timeout=300)
        snap = dc.snapshot_fork(fork["fork"], "vm-b", release=True)
        layers = snap["template"]["layers"]
        mem = record["mem_file"]
        base = push(parse_s3_url("s3://bench/vm"), mem, client, layers=layers[:-1])
        before = uploaded()
        chunked = push(parse_s3_url("s3://bench/vm-b-chunks"), mem, counted, layers=layers)
        chunked_up = uploaded() - before
        before = uploaded()
        layered = push_layer(
            parse_s3_url("s3://bench/vm-b"), mem, layers, parse_s3_url("s3://bench/vm"), counted
        )
        layer_up = uploaded() - before
    finally:
        daemon.close()
        shutil.rmtree(short, ignore_errors=True)
    changed = snap["changed_pages"] * PAGE
    stored = base.manifest.stored_bytes
    figures: dict[str, Any] = {
        "snapshot_changed_bytes": changed,
        "snapshot_chunks_uploaded_bytes": chunked_up,
        "snapshot_uploaded_share": chunked.uploaded_bytes / stored,
        "snapshot_amplification": chunked_up / changed if changed else 0.0,
        "layer_push_uploaded_bytes": layer_up,
        "layer_push_pack_bytes": layered.layer_bytes,
        "layer_push_amplification": layered.layer_bytes / changed if changed else 0.0,
        "layer_push_ratio_with_index": layer_up / changed if changed else 0.0,
    }
    table(
        f"c2. a microVM fork's snapshot pushed over its template: the guest changed "
        f"{fmt(changed / MiB, 2)} MiB ({snap['changed_pages']} pages); bytes counted at the store",
        ["push", "MiB uploaded", "of which pages", "x changed", "with index/manifest"],
        [
            (
                f"whole memory, {chunked.manifest.chunk_size >> 20} MiB chunks "
                f"({chunked.uploaded_chunks} of {chunked.chunks})",
                fmt(chunked_up / MiB, 2),
                fmt(chunked.uploaded_bytes / MiB, 2),
                fmt(figures["snapshot_amplification"], 1),
                "-",
            ),
            (
                f"layer ({layered.layer_pages} pages packed)",
                fmt(layer_up / MiB, 2),
                fmt(layered.layer_bytes / MiB, 2),
                fmt(figures["layer_push_amplification"], 2),
                fmt(figures["layer_push_ratio_with_index"], 2),
            ),
        ],
    )
    console.print(
        verdict(
            "layer push: bytes uploaded / changed", figures["layer_push_amplification"], "<=", 1.2
        )
    )
    return figures


def main(quick: bool = False) -> dict[str, Any]:
    """Run the comparisons; return the figures."""
    if importlib.util.find_spec("moto") is None:
        return {"skipped": "needs moto[server] for a local S3 server: pip install '.[dev]'"}
    guest = (32 if quick else 64) * MiB
    rounds = 3 if quick else 5
    guest_pages = guest // PAGE
    pages = _hot_pages(guest_pages, 0.10, seed=5)
    header(
        "Templates in object storage",
        f"{guest // MiB} MiB template (25% zero pages), hot set {len(pages)} pages in runs of "
        f"1-3, {rounds} rounds per comparison; moto_server behind a latency proxy.",
    )
    figures: dict[str, Any] = {}
    with scratch_dir() as work, s3_store() as (endpoint, proxy):
        b = _Bench(work, endpoint, proxy)
        mem = os.path.join(work, "mem")
        make_mem_file(mem, guest, 0.25, seed=1)

        # c. push (first: the template is needed by the rest)
        t0 = time.perf_counter()
        pushed = push(parse_s3_url("s3://bench/base"), mem, b.client)
        push_s = time.perf_counter() - t0
        figures["push_mib_s"] = guest / MiB / push_s
        table(
            "c. push (0 ms)",
            ["template", "chunks", "uploaded", "already there", "zero", "MiB up", "seconds"],
            [
                (
                    "base",
                    pushed.chunks,
                    pushed.uploaded_chunks,
                    pushed.present_chunks,
                    pushed.zero_chunks,
                    fmt(pushed.uploaded_bytes / MiB, 1),
                    fmt(pushed.seconds, 2),
                )
            ],
        )
        console.print(f"push throughput {fmt(figures['push_mib_s'], 0)} MiB/s")
        # The same template pushed with its hot set: its chunks are in the bucket already, so
        # this uploads the hot-page list and the hot pack alone.
        hpl = os.path.join(work, "hot.hpl")
        with open(hpl, "wb") as f:
            f.write(encode(HotPageList.from_pages(pages), "hpl2"))  # first-touch order
        with_pack = push(parse_s3_url("s3://bench/packed"), mem, b.client, hot_pages=hpl)
        console.print(
            f"pushed with its hot set: {with_pack.uploaded_chunks} chunks and a hot pack of "
            f"{fmt(with_pack.pack_bytes / MiB, 2)} MiB uploaded"
        )
        hot_bytes = len(pages) * PAGE
        figures.update(_snapshot_push(b.client, proxy, guest))

        # a. cold-cache forks, on demand vs prefetched (chunks, hot pack), at 0, 20, 50 ms
        # and capped
        rows = []
        fetch_rows = []
        # (figure suffix, row label, added latency, bandwidth cap, rounds, chunk prefetch):
        # a quick run does the farther store and the capped link in 2 rounds, without the
        # chunk-prefetch mode (the hot pack is what a prefetch uses when there is one).
        extra = 2 if quick else rounds
        stores = [
            ("0ms", "0 ms", 0.0, 0.0, rounds, True),
            ("20ms", "20 ms", 0.020, 0.0, rounds, True),
            ("50ms", "50 ms", 0.050, 0.0, extra, not quick),
            ("20ms_cap", f"20 ms, {_CAP >> 20} MiB/s", 0.020, _CAP, extra, not quick),
        ]
        for ms, label, delay, cap, n, by_chunks in stores:
            proxy.set_delay(delay)
            proxy.set_bandwidth(cap)
            got = _cold(b, mem, "s3://bench/base", guest, pages, n, "s3://bench/packed", by_chunks)
            figures[f"cold_demand_ms_{ms}"] = median(got["demand"])
            figures[f"cold_pack_ms_{ms}"] = median(got["pack"])
            figures[f"cold_pack_speedup_{ms}"] = paired_ratio(got["demand"], got["pack"])
            if by_chunks:
                figures[f"cold_prefetch_ms_{ms}"] = median(got["prefetch"])
                figures[f"cold_speedup_{ms}"] = paired_ratio(got["demand"], got["prefetch"])
            rows.append(
                (
                    f"{label}, {pushed.manifest.chunk_size // MiB} MiB",
                    fmt(median(got["demand"]), 1),
                    fmt(median(got["prefetch"]), 1) if by_chunks else "-",
                    fmt(median(got["prefetch_prefetch"]), 1) if by_chunks else "-",
                    fmt(figures[f"cold_speedup_{ms}"]) if by_chunks else "-",
                    fmt(median(got["pack"]), 1),
                    fmt(median(got["pack_prefetch"]), 1),
                    fmt(figures[f"cold_pack_speedup_{ms}"]),
                )
            )
            for mode, name in (
                ("demand", "on demand"),
                ("prefetch", "prefetched, chunks"),
                ("pack", "prefetched, hot pack"),
            ):
                if mode not in got:
                    continue
                before = median(got[f"{mode}_fetched"])
                fetch_rows.append(
                    (
                        f"{label}, {name}",
                        fmt(before / MiB, 2),
                        fmt(before / hot_bytes, 2),
                        fmt(median(got[f"{mode}_total_bytes"]) / MiB, 2),
                        fmt(median(got[f"{mode}_gets"]), 0),
                    )
                )
                figures[f"cold_{mode}_fetched_{ms}"] = before
                figures[f"cold_{mode}_gets_{ms}"] = median(got[f"{mode}_gets"])
                figures[f"cold_{mode}_total_bytes_{ms}"] = median(got[f"{mode}_total_bytes"])
        proxy.set_bandwidth(0)
        figures["cold_pack_fetch_ratio"] = figures["cold_pack_fetched_0ms"] / hot_bytes
        figures["cold_pack_gets"] = figures["cold_pack_gets_0ms"]
        if not quick:
            proxy.set_delay(0.020)
            for size in (1, 4):
                url = f"s3://bench/chunk{size}"
                push(parse_s3_url(url), mem, b.client, chunk_size=size * MiB)
                got = _cold(b, mem, url, guest, pages, rounds)
                figures[f"cold_demand_ms_20ms_{size}mib"] = median(got["demand"])
                figures[f"cold_prefetch_ms_20ms_{size}mib"] = median(got["prefetch"])
                rows.append(
                    (
                        f"20 ms, {size} MiB",
                        fmt(median(got["demand"]), 1),
                        fmt(median(got["prefetch"]), 1),
                        fmt(median(got["prefetch_prefetch"]), 1),
                        fmt(paired_ratio(got["demand"], got["prefetch"])),
                        "-",
                        "-",
                        "-",
                    )
                )
        table(
            "a. cold-cache fork: ready ms (median), on demand and prefetched by chunks or from "
            "the hot pack (fetch: the prefetch's share; x: speed-up over on demand)",
            ["store", "on demand", "chunks", "fetch", "x", "hot pack", "fetch", "x"],
            rows,
        )
        table(
            f"a. bytes fetched and GETs per cold fork (median; hot set "
            f"{fmt(hot_bytes / MiB, 2)} MiB, {fmt(with_pack.pack_bytes / MiB, 2)} MiB of it "
            "not zero)",
            ["fork", "MiB before resume", "x hot set", "MiB in all", "GETs"],
            fetch_rows,
        )
        console.print(
            verdict(
                "hot-pack prefetch: fetched / hot set", figures["cold_pack_fetch_ratio"], "<=", 1.25
            )
        )
        for ms, goal in ((0, 3.0), (20, 5.0)):
            console.print(
                verdict(
                    f"hot-pack prefetched fork speed-up at {ms} ms",
                    figures[f"cold_pack_speedup_{ms}ms"],
                    ">=",
                    goal,
                )
            )

        # b. warm forks: local mem-file vs warm cache (new server) vs chunks in the view
        proxy.set_delay(0.020)  # a store that would be far away: warm forks must not reach it
        warm_cache = b.fresh_cache()
        filler = b.server("s3://bench/base", warm_cache)
        try:
            b.fork(filler, mem, guest, [(0, o) for o in range(0, guest, PAGE)], prefetch=False)
        finally:
            filler.close()
        local = b.server(mem)
        view = b.server("s3://bench/base", warm_cache)
        b.fork(view, mem, guest, pages, prefetch=False)  # fills the view with the hot chunks
        gets_before = _chunk_gets(proxy)
        res: dict[str, list[float]] = {}
        try:
            # b1. later forks, on demand: cheap, so many rounds (each walk is short).
            for _, mode in alternating(3 * rounds, ["local", "view"]):
                server = local if mode == "local" else view
                res.setdefault(mode, []).append(b.fork(server, mem, guest, pages, False)["ready"])
            # b2. a new server on a host whose cache holds the template, on demand and
            # prefetched, against the local mem-file the same way.
            kinds = ["local-demand", "cache-demand", "local-prefetch", "cache-prefetch"]
            for _, mode in alternating(rounds, kinds):
                prefetch = mode.endswith("prefetch")
                if mode.startswith("local"):
                    got = b.fork(local, mem, guest, pages, prefetch)
                else:
                    fresh = b.server("s3://bench/base", warm_cache)
                    try:
                        got = b.fork(fresh, mem, guest, pages, prefetch)
                    finally:
                        fresh.close()
                res.setdefault(mode, []).append(got["ready"])
        finally:
            local.close()
            view.close()
        gets_warm = _chunk_gets(proxy) - gets_before
        figures["warm_local_ms"] = median(res["local"])
        figures["warm_view_ms"] = median(res["view"])
        figures["warm_view_ratio"] = paired_ratio(res["view"], res["local"])
        figures["warm_cache_ratio"] = paired_ratio(res["cache-demand"], res["local-demand"])
        figures["warm_cache_prefetch_ratio"] = paired_ratio(
            res["cache-prefetch"], res["local-prefetch"]
        )
        figures["warm_gets"] = gets_warm
        rows = [
            ("b1. later fork, on demand: local mem-file", res["local"], None),
            ("b1. later fork, on demand: chunks in the view", res["view"], "warm_view_ratio"),
            ("b2. new server, on demand: local mem-file", res["local-demand"], None),
            (
                "b2. new server, on demand: warm host cache",
                res["cache-demand"],
                "warm_cache_ratio",
            ),
            ("b2. new server, prefetched: local mem-file", res["local-prefetch"], None),
            (
                "b2. new server, prefetched: warm host cache",
                res["cache-prefetch"],
                "warm_cache_prefetch_ratio",
            ),
        ]
        table(
            "b. warm fork: ready ms (median)",
            ["fork", "ready ms", "vs local mem-file"],
            [
                (name, fmt(median(v), 1), fmt(figures[key]) if key else "1.00")
                for name, v, key in rows
            ],
        )
        console.print(
            f"chunk GETs to the store during the warm forks: {gets_warm} (0: every chunk came "
            "from the host cache or the view)"
        )
        console.print(verdict("warm fork (view) / local", figures["warm_view_ratio"], "<=", 1.1))
    return figures


if __name__ == "__main__":
    standalone(main)
