"""Each template's page server: started with its first fork (outside the manager's lock),
stopped after its last; and a fork's registration with it.

A template's page server maps and scans the whole mem-file, so it starts outside the manager's
lock: other templates and other requests go on meanwhile, and a second fork of the same
template waits for that start only.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from pagefork.daemon.config import ManagerConfig
from pagefork.daemon.fork import Fork, ForkRole, TemplateKey
from pagefork.daemon.holdings import Holdings, Hooks, ServerStart, TemplateState
from pagefork.daemon.lifecycle import DaemonEvent, DaemonStage
from pagefork.errors import ForkError, TemplateError
from pagefork.hotloop import HotSetLoop
from pagefork.hotpages import HotPageList
from pagefork.server import PageServer, ServerConfig
from pagefork.stats import ForkStats
from pagefork.store.cache import ChunkCache
from pagefork.store.layout import is_s3_url
from pagefork.store.lazy import StoreOptions
from pagefork.templates import TemplateRecord, TemplateRegistry

log = logging.getLogger("pagefork")

#: Called with (template identity, fork id, hot set) when a warm-up's recording window closes.
WindowClosed = Callable[[TemplateKey, str, HotPageList], None]


class TemplateServers:
    """Starts the templates' page servers and registers forks with them."""

    def __init__(
        self,
        holdings: Holdings,
        hooks: Hooks,
        registry: TemplateRegistry,
        config: ManagerConfig,
        on_window_closed: WindowClosed,
    ) -> None:
        self.holdings = holdings
        self.hooks = hooks
        self.registry = registry
        self.config = config
        self.on_window_closed = on_window_closed
        self._store: StoreOptions | None = None  # made on first use: see store_options
        self._store_lock = threading.Lock()

    def register(
        self,
        seen: TemplateRecord,
        fork_id: str,
        hot: HotPageList | None,
        driver: str | None,
        starting: bool,
    ) -> tuple[Fork, TemplateRecord]:
        """Add the fork to its template's page server, starting that server if needed."""
        h = self.holdings
        template_id = seen.id
        while True:
            with h.lock:
                if h.closed:
                    raise ForkError("the fork manager is shutting down")
                if fork_id in h.forks or fork_id in h.reserved:
                    raise ForkError(f"fork {fork_id} already exists")
                # Read under our lock: a delete holds it, so the template is there right now.
                record = self.registry.get(template_id)
                if record.created != seen.created:
                    raise TemplateError(
                        f"template {template_id!r} was deleted and created again meanwhile; retry"
                    )
                key: TemplateKey = (template_id, record.created)
                state = h.templates.get(key)
                if state is not None:
                    return self._add_fork(state, fork_id, hot, driver, starting), record
                start = h.starting.get(key)
                starter = start is None
                if start is None:
                    start = h.starting[key] = ServerStart()
                h.reserved.add(fork_id)
            if not starter:
                started = start.ready.wait(self.config.server_start_timeout)
                with h.lock:
                    h.reserved.discard(fork_id)
                if not started:
                    raise ForkError(
                        f"template {template_id!r}: its page server is still starting after "
                        f"{self.config.server_start_timeout:g}s; retry later"
                    )
                if start.error is not None:
                    raise ForkError(
                        f"template {template_id!r}: its page server did not start: {start.error}"
                    )
                continue  # the server is up: register with it (or start again if it stopped)
            try:
                server = self.open_server(record)  # maps and scans the mem-file: slow
            except BaseException as exc:
                with h.lock:
                    start.error = exc
                    h.reserved.discard(fork_id)
                    del h.starting[key]
                start.ready.set()
                raise
            stop: PageServer | None = None
            try:
                with h.lock:
                    h.reserved.discard(fork_id)
                    del h.starting[key]
                    state = TemplateState(record, server)
                    h.templates[key] = state
                    try:
                        return self._add_fork(state, fork_id, hot, driver, starting), record
                    except BaseException:
                        stop = h.drop_if_idle(state)
                        raise
            finally:
                start.ready.set()  # the waiters find the server (or start again without it)
                if stop is not None:
                    stop.close()

    def _add_fork(
        self,
        state: TemplateState,
        fork_id: str,
        hot: HotPageList | None,
        driver: str | None,
        starting: bool,
    ) -> Fork:
        """Register the fork with ``state``'s page server (called with the lock held)."""
        h = self.holdings
        if h.closed:
            raise ForkError("the fork manager is shutting down")
        loop = h.loops.get(state.key) or h.loops.setdefault(
            state.key, HotSetLoop.for_file(hot, state.record.hot_pages_path)
        )
        role: ForkRole = loop.role(fork_id)
        try:
            socket_path = state.server.register_fork(fork_id, record=loop.records(role))
        except BaseException:
            loop.fork_gone(fork_id)  # a warm-up that never was: the next fork records
            raise
        fork = Fork(
            fork_id,
            state.record.id,
            socket_path,
            role,
            time.time(),
            driver=driver,
            hot=loop.hot if role == "prefetch" else None,
            stage=DaemonStage.STARTING if starting else DaemonStage.LIVE,
            template_created=state.record.created,
        )
        state.forks.add(fork_id)
        h.forks[fork_id] = fork
        return fork

    def open_server(self, record: TemplateRecord) -> PageServer:
        """Start ``record``'s page server (it maps and scans the mem-file), with no fork."""
        key: TemplateKey = (record.id, record.created)
        max_pages = max(1, int(record.mem_pages * self.config.record_max_share))
        h, hooks = self.holdings, self.hooks

        def window_closed(fork_id: str, pages: HotPageList) -> None:
            self.on_window_closed(key, fork_id, pages)

        def fork_ended(fork_id: str, stats: ForkStats) -> None:
            with h.lock:
                fork = h.forks.get(fork_id)
                if fork is not None and fork.template_key == key:
                    fork.final_stats = stats
                    fork.move(DaemonEvent.SESSION_ENDED)
                    h.final.notify_all()
            if hooks.on_fork_end is not None:
                hooks.on_fork_end(record.id, stats)

        def worker_restarted(old_pid: int, pid: int, forks: int) -> None:
            log.warning(
                "template %s: worker %d died; worker %d took over its %d forks",
                record.id,
                old_pid,
                pid,
                forks,
            )
            if hooks.on_worker_restarted is not None:
                hooks.on_worker_restarted(record.id)

        server = PageServer(
            ServerConfig(
                mem_file_path=record.mem_file,
                layers=tuple(record.layers),
                socket_dir=self.config.socket_dir,
                handshake_timeout=self.config.handshake_timeout,
                record_max_pages=max_pages,
                record_max_seconds=self.config.record_max_seconds,
                on_window_closed=window_closed,
                on_fork_end=fork_ended,
                on_worker_restarted=worker_restarted,
                workers=self.config.workers,
                store=self.store_options() if is_s3_url(record.mem_file) else None,
            )
        )
        if hooks.orphan_setup is not None:
            server.keep_forks_if_killed(hooks.orphan_setup(record))
        log.info("template %s: page server started", record.id)
        return server

    def store_options(self) -> StoreOptions:
        """The object-storage options, with the one chunk cache every template shares."""
        with self._store_lock:
            if self._store is None:
                options = self.config.store or StoreOptions()
                if options.cache is None:
                    cache = ChunkCache(str(self.registry.state_dir / "chunk-cache"))
                    options = dataclasses.replace(options, cache=cache)
                self._store = options
            return self._store
