"""``pagefork serve``: a standalone page server on one socket, as Firecracker's handler runs.

Every connection on the socket is one fork session. Events go to stdout as JSON lines
(``listening``, ``prefetch_done``, ``hot_pages_saved``, ``fork_end``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from typing import Any

from pagefork.errors import PageforkError
from pagefork.hotpages import HotPageList, load
from pagefork.server import PageServer, ServerConfig
from pagefork.stats import ForkStats

log = logging.getLogger("pagefork")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve``."""
    p = sub.add_parser(
        "serve",
        help="serve forks of one mem-file on a Unix socket (Firecracker's uffd handler)",
        description=(
            "Serve guest memory of microVM forks from a template mem-file over userfaultfd. "
            "Point Firecracker's PUT /snapshot/load at the socket with mem_backend "
            '{"backend_type": "Uffd", "backend_path": SOCKET}. Every connection is one fork; '
            "a JSON line per event is printed on stdout. Stops on SIGINT/SIGTERM."
        ),
    )
    p.add_argument("--mem-file", required=True, help="the template's guest memory file")
    p.add_argument("--socket", required=True, help="Unix socket path to listen on (mode 0600)")
    p.add_argument(
        "--page-size",
        type=int,
        default=0,
        help="page size for mappings that carry none (Firecracker < 1.7); default 4096",
    )
    p.add_argument(
        "--on-failure",
        choices=("kill", "close"),
        default="kill",
        help="on a fork-fatal error: SIGKILL the VMM (default; its guest would hang) or close",
    )
    p.add_argument("--handshake-timeout", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument(
        "--record",
        metavar="OUT",
        help="record hot pages and save them to OUT (HPL1) when the fork ends or its window "
        "closes; OUT may contain {fork} to record every fork to its own file, otherwise only "
        "the first fork (the warm-up) is recorded",
    )
    p.add_argument("--record-max-pages", type=int, help="recording window: stop after N pages")
    p.add_argument("--record-max-seconds", type=float, help="recording window: stop after T s")
    p.add_argument(
        "--hot-pages",
        metavar="FILE",
        help="prefetch this hot-page file into every fork right after its handshake",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each fork's lifecycle")
    p.set_defaults(func=run)


class _Printer:
    """Writes one JSON object per line on stdout, whole lines only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        with self._lock:
            sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
            sys.stdout.flush()


def _fork_end_fields(stats: ForkStats) -> dict[str, Any]:
    return {
        "fork": stats.fork,
        "pid": stats.pid,
        "faults": stats.faults,
        "pages_copied": stats.pages_copied,
        "zero_pages": stats.zero_pages,
        "removed_bytes": stats.removed_bytes,
        "errors": stats.errors,
        "prefetched_pages": stats.prefetched_pages,
        "misses": stats.misses,
        "eagain_retries": stats.eagain_retries,
        "already_present": stats.already_present,
        "latency_us": stats.latency_us,
        "state": stats.state,
        **({"error": stats.error} if stats.error else {}),
    }


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="pagefork: %(message)s",
        stream=sys.stderr,
    )
    emit = _Printer()
    hot: HotPageList | None = None
    if args.hot_pages:
        hot = load(args.hot_pages)
        if not len(hot):
            log.warning(
                "hot-page file %s is empty or missing: forks are served on demand", args.hot_pages
            )
    record_path: str | None = args.record
    per_fork = record_path is not None and "{fork}" in record_path
    recorded: set[str] = set()
    lock = threading.Lock()
    server: PageServer | None = None

    def should_record(fork_id: str) -> bool:
        if record_path is None:
            return False
        with lock:
            if not per_fork and recorded:
                return False
            recorded.add(fork_id)
            return True

    def window_closed(fork_id: str, pages: HotPageList) -> None:
        assert record_path is not None
        path = record_path.replace("{fork}", fork_id)
        try:
            pages.save(path)
        except (OSError, PageforkError) as exc:
            log.error("fork %s: cannot save hot pages to %s: %s", fork_id, path, exc)
            return
        emit("hot_pages_saved", fork=fork_id, path=path, pages=len(pages))

    def connected(fork_id: str) -> None:
        log.info("fork %s: connected", fork_id)
        if hot is None or not len(hot) or server is None:
            return
        try:
            result = server.prefetch(fork_id, hot)
        except PageforkError as exc:
            log.error("fork %s: prefetch failed, serving on demand: %s", fork_id, exc)
            return
        emit(
            "prefetch_done",
            fork=fork_id,
            pages=result.installed,
            already_present=result.already_present,
            runs=result.runs,
            seconds=round(result.seconds, 6),
        )

    def ended(fork_id: str, stats: ForkStats) -> None:
        emit("fork_end", **_fork_end_fields(stats))

    config = ServerConfig(
        mem_file_path=args.mem_file,
        page_size=args.page_size,
        on_failure=args.on_failure,
        handshake_timeout=args.handshake_timeout,
        record_max_pages=args.record_max_pages,
        record_max_seconds=args.record_max_seconds,
        on_connect=connected,
        on_fork_end=ended,
        on_window_closed=window_closed,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = PageServer(config)
    try:
        server.listen(args.socket, record=should_record)
        emit("listening", socket=args.socket, mem_file=args.mem_file)
        while not stop.wait(3600):
            pass
    finally:
        server.close()
    return 0
