"""The page server's settings (:class:`ServerConfig`) and the checks made when it starts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pagefork.errors import PageforkError
from pagefork.handshake import PAGE_SIZES
from pagefork.hotpages import HotPageList
from pagefork.serving.pool import max_workers
from pagefork.stats import ForkStats
from pagefork.store.lazy import StoreOptions

FailurePolicy = Literal["kill", "close"]

#: The longest handshake_timeout accepted: a VMM that takes longer than an hour is hung.
MAX_HANDSHAKE_TIMEOUT = 3600.0


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one :class:`~pagefork.server.PageServer`.

    ``page_size`` 0 takes each region's page size from the handshake (4 KiB when absent).
    ``on_failure`` is what a fork-fatal error does to the VMM: ``kill`` (SIGKILL its pid, as
    Firecracker's docs advise: a guest whose handler is gone hangs forever) or ``close``.
    ``record_hot_pages`` records every fork; ``record_max_pages`` / ``record_max_seconds``
    bound the recording window. At most ``max_pending_handshakes`` connections may wait for
    their handshake at once; more are refused. ``workers`` is the number of worker processes
    (``"auto"``: one per usable CPU); ``spare_worker`` keeps one more started, so a dead
    worker is replaced at once. With one worker per CPU, a fork whose VMM is pinned to one CPU
    goes to that CPU's worker, and ``pin_workers`` pins each worker to its CPU (measured no
    worse, and better for a lone fork: see :meth:`~pagefork.serving.pool.WorkerPool.place`).
    ``follow_vmms`` (on by default) moves a fork whose VMM the scheduler has settled on another
    worker's CPU to that worker, so its faults are served on the VMM's core
    (:mod:`pagefork.serving.following`); it needs a worker per CPU.
    ``on_connect`` / ``on_fork_end`` / ``on_window_closed`` are called with the fork's id;
    ``on_worker_restarted`` with (old pid, new pid, forks adopted). ``layers`` are layer
    files over the mem-file, bottom first: forks then read the layered template
    (:mod:`pagefork.layers`). ``mem_file_path`` may be an ``s3://BUCKET/PREFIX`` URL: the
    template is then served lazily from object storage (:mod:`pagefork.store.lazy`), reached
    as ``store`` says.
    """

    mem_file_path: str
    socket_dir: str | None = None
    page_size: int = 0
    on_failure: FailurePolicy = "kill"
    handshake_timeout: float = 10.0
    record_hot_pages: bool = False
    record_max_pages: int | None = None
    record_max_seconds: float | None = None
    max_pending_handshakes: int = 64
    workers: int | Literal["auto"] = "auto"
    spare_worker: bool = True
    pin_workers: bool = True
    follow_vmms: bool = True
    on_connect: Callable[[str], None] | None = None
    on_fork_end: Callable[[str, ForkStats], None] | None = None
    on_window_closed: Callable[[str, HotPageList], None] | None = None
    on_worker_restarted: Callable[[int, int, int], None] | None = None
    layers: tuple[str, ...] = ()
    store: StoreOptions | None = None


def check_config(config: ServerConfig) -> None:
    """Refuse settings that would only fail later, on some fork's thread."""

    def positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
        if value is None and allow_none:
            return
        if value is None or not math.isfinite(value) or value <= 0:
            raise PageforkError(f"{name} must be a positive number, not {value!r}")

    page_size = config.page_size
    if page_size and page_size not in PAGE_SIZES:
        raise PageforkError(f"page size {page_size} is neither 4 KiB nor 2 MiB")
    if config.on_failure not in ("kill", "close"):
        raise PageforkError(f"on_failure must be 'kill' or 'close', not {config.on_failure!r}")
    positive("handshake_timeout", config.handshake_timeout, allow_none=False)
    if config.handshake_timeout > MAX_HANDSHAKE_TIMEOUT:
        # A timer past about 24 days overflows; a VMM that takes over an hour is hung anyway.
        raise PageforkError(
            f"handshake_timeout must be at most {MAX_HANDSHAKE_TIMEOUT:g} seconds, "
            f"not {config.handshake_timeout!r}"
        )
    positive("record_max_pages", config.record_max_pages)
    positive("record_max_seconds", config.record_max_seconds)
    positive("max_pending_handshakes", config.max_pending_handshakes, allow_none=False)
    workers = config.workers
    if workers != "auto" and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise PageforkError(f"workers must be 'auto' or a whole number >= 1, not {workers!r}")
    most = max_workers()
    if workers != "auto" and workers > most:
        # More workers than cores only adds interpreters (about 30 MiB each) and wake-ups.
        raise PageforkError(
            f"workers must be at most {most} here (4 per usable CPU), not {workers}"
        )
