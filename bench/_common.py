"""Helpers shared by the benchmarks: scratch space, template mem-files, pairing, printing.

Absolute times drift on a shared machine, and more so in a VM, where every syscall and fault
costs more than on bare metal and where a fault served on another core than the faulting
thread's costs several times one served on its own. So no figure is compared with one from
another run: each benchmark measures every side of a comparison in one run, the variants
alternating round by round in an order that reverses every round (A B, B A, A B, ...), so
drift hits them alike. A figure is the median of its per-round values, and a ratio the median
of the per-round ratios of paired rounds, which can differ from the quotient of the two medians
shown beside it. Every benchmark also checks what it served (the bytes a guest read, the faults
a server counted), so a fast wrong answer never counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console
from rich.table import Table

from pagefork.hotpages import HotPageList
from pagefork.server import PageServer, ServerConfig
from pagefork.stats import ForkStats
from pagefork.testing.s3proxy import MotoServer, S3ProxyProcess, environment
from pagefork.testing.vmm import VmmProcess

BENCH_DIR = Path(__file__).resolve().parent
BUILD_DIR = BENCH_DIR / "build"
PAGE = 4096
MiB = 1 << 20

#: One console for every benchmark, so output interleaves in order.
console = Console(highlight=False)

T = TypeVar("T")


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    """A private temporary directory for mem-files and sockets, removed afterwards.

    Under /tmp so that socket paths stay far below the 107-byte ``sun_path`` limit.
    """
    path = tempfile.mkdtemp(prefix="pagefork-bench-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_mem_file(path: str, size: int, zero_fraction: float, seed: int) -> int:
    """Write a template mem-file of ``size`` bytes: random pages, ``zero_fraction`` of them all
    zero (chosen by ``seed``), like a guest's memory. Returns how many pages are zero."""
    rng = random.Random(seed)
    zero_page = bytes(PAGE)
    zeros = 0
    chunk_pages = MiB // PAGE
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            data = bytearray(os.urandom(MiB))
            for i in range(chunk_pages):
                if rng.random() < zero_fraction:
                    data[i * PAGE : (i + 1) * PAGE] = zero_page
                    zeros += 1
            f.write(data)
    return zeros


def scattered_runs(
    guest_pages: int, hot_pages: int, seed: int, run_lengths: tuple[int, int] = (1, 3)
) -> list[list[int]]:
    """Runs of page indices in a guest of ``guest_pages`` pages, REAP's shape: ``hot_pages``
    pages in runs of ``run_lengths`` pages, separated by random gaps of at least one page.

    The runs come back in ascending order; callers shuffle them to get a first-touch order.
    """
    rng = random.Random(seed)
    lengths: list[int] = []
    total = 0
    while total < hot_pages:
        n = min(rng.randint(*run_lengths), hot_pages - total)
        lengths.append(n)
        total += n
    free = guest_pages - hot_pages
    if free < len(lengths):
        raise ValueError(
            f"{hot_pages} pages in {len(lengths)} runs cannot be scattered in {guest_pages} pages"
        )
    # Gaps uniform in 1..2*mean-1 (mean = free pages per run), trimmed if they overshoot.
    mean = free // len(lengths)
    runs: list[list[int]] = []
    page = rng.randint(0, max(0, mean - 1))
    budget = free - page
    for i, n in enumerate(lengths):
        runs.append(list(range(page, page + n)))
        page += n
        gaps_left = len(lengths) - i - 1
        if gaps_left:
            gap = min(rng.randint(1, max(1, 2 * mean - 1)), budget - (gaps_left - 1))
            gap = max(1, gap)
            budget -= gap
            page += gap
    assert page <= guest_pages, "scattered runs overflow the guest"
    return runs


@dataclass
class ForkRun:
    """One fork in a benchmark round: its id and VMM while it runs; once the ``with`` block of
    :meth:`Forks.fork` is left, its final ``stats`` (and ``hot`` pages when it recorded)."""

    fork_id: str
    vm: VmmProcess
    stats: ForkStats | None = None
    hot: HotPageList | None = None


class Forks:
    """Fresh forks of one template, all served by one :class:`PageServer` in this process."""

    def __init__(self, workdir: str, name: str, mem_file: str, timeout: float = 30.0) -> None:
        self.name = name
        self.mem_file = mem_file
        self.timeout = timeout
        sockets = os.path.join(workdir, name)
        os.mkdir(sockets)
        self._ended: dict[str, ForkStats] = {}
        self._ended_cond = threading.Condition()
        self.server = PageServer(
            ServerConfig(mem_file_path=mem_file, socket_dir=sockets, on_fork_end=self._on_end)
        )
        self._n = 0

    def _on_end(self, fork_id: str, stats: ForkStats) -> None:
        with self._ended_cond:
            self._ended[fork_id] = stats
            self._ended_cond.notify_all()

    @contextlib.contextmanager
    def fork(self, guest: int, record: bool = False) -> Iterator[ForkRun]:
        """A new fork with a fresh VMM of ``guest`` bytes, connected; torn down afterwards.

        The stats are taken once the fork's session has ended: the fault loop counts (and
        records) a fault after ``UFFDIO_COPY`` has already woken the guest, so figures read
        while the VMM runs may lag its last faults. Raises when the session failed, so a
        broken round never counts.
        """
        self._n += 1
        fork_id = f"{self.name}-{self._n}"
        path = self.server.register_fork(fork_id, record=record)
        try:
            vm = VmmProcess(path, self.mem_file, [f"{guest // MiB}M"])
            run = ForkRun(fork_id, vm)
            try:
                self.server.wait_connected(fork_id)
                yield run
            finally:
                vm.close()
            with self._ended_cond:
                if not self._ended_cond.wait_for(lambda: fork_id in self._ended, self.timeout):
                    raise RuntimeError(f"fork {fork_id}: session did not end after its VMM exited")
                run.stats = self._ended.pop(fork_id)
            if record:
                run.hot = self.server.hot_pages(fork_id)
            if run.stats.errors:
                raise RuntimeError(f"fork {fork_id} failed: {run.stats.error}")
        finally:
            self.server.unregister_fork(fork_id)

    def close(self) -> None:
        """Stop the page server."""
        self.server.close()


class Serve:
    """A ``pagefork serve`` process (2 workers unless told) whose output is read as it comes.

    Each JSON event it prints on stdout is kept by its name, the first of each with ``_at``
    (``time.perf_counter()`` when it was read) added; each stderr line is kept by its text, as
    ``{"_at": ...}``. Its stdin is a pipe, for ``PAGEFORK_TAKEOVER_PAUSE_AT``'s go-on line.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, workers: int = 2) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagefork", "serve", "--workers", str(workers), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.events: dict[str, dict[str, Any]] = {}
        self.cond = threading.Condition()
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()

    def _pump(self, stream: Any, events: bool) -> None:
        for line in stream:
            now = time.perf_counter()
            if events:
                event = json.loads(line)
                key = event["event"]
            else:
                key, event = line.strip(), {}
            with self.cond:
                self.events.setdefault(key, {**event, "_at": now})
                self.cond.notify_all()

    def wait(self, key: str, timeout: float = 120) -> dict[str, Any]:
        """The first event (or stderr line) named ``key``, waiting up to ``timeout`` s for it."""
        with self.cond:
            if not self.cond.wait_for(lambda: key in self.events, timeout):
                raise RuntimeError(f"serve: no {key!r} within {timeout}s")
            return self.events[key]

    def go_on(self) -> None:
        """Send the line a serve held by ``PAGEFORK_TAKEOVER_PAUSE_AT`` waits for."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        """SIGTERM it (if still running) and wait for it to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def alternating(rounds: int, variants: Sequence[T]) -> Iterator[tuple[int, T]]:
    """``(round, variant)`` pairs, the variants' order reversed every other round (ABBA...), so
    slow drift of the machine does not favour whichever variant runs first."""
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for v in order:
            yield r, v


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (nan when empty)."""
    return statistics.median(values) if values else float("nan")


def paired_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """Median over rounds of ``a[i] / b[i]``: a ratio robust to drift between rounds."""
    return median([x / y for x, y in zip(a, b, strict=True) if y > 0])


def fmt(value: float, digits: int = 2) -> str:
    """A number for a report line."""
    return f"{value:,.{digits}f}"


def header(title: str, detail: str) -> None:
    """Print a benchmark's title and what it measures."""
    console.rule(f"[bold]{title}")
    console.print(detail)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a small table of measured figures."""
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(x) for x in row])
    console.print(t)


def verdict(name: str, value: float, op: str, target: float) -> str:
    """``"name 1.18 (target <= 1.3: met)"``, for a report line."""
    met = value <= target if op == "<=" else value >= target
    mark = "[green]met[/]" if met else "[red]NOT met[/]"
    return f"{name} [bold]{fmt(value)}[/] (target {op} {target:g}: {mark})"


def standalone(main: Callable[[bool], dict[str, Any]]) -> None:
    """Run one benchmark module as a script (``--quick`` for the short version)."""
    main("--quick" in sys.argv[1:])


#: Credentials for the benchmarks' own S3 server (moto accepts any).
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "pagefork-bench",
    "AWS_SECRET_ACCESS_KEY": "pagefork-bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.contextmanager
def s3_store() -> Iterator[tuple[str, S3ProxyProcess]]:
    """A local ``moto_server`` behind the latency proxy, with the benchmarks' credentials in
    the environment while it runs: (the server's URL, the proxy process)."""
    with environment(S3_CREDENTIALS), MotoServer() as moto, S3ProxyProcess(moto.url) as proxy:
        yield moto.url, proxy
