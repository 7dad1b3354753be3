"""A fork's end: its VMM's exit, watched through its pidfd, and its release.

A VMM whose handle gives a pidfd (the built-in microVM, Firecracker) is watched through it on
one thread, with no polling: when it exits, its fork says so (phase ``exited`` with the
``exit_status``, when the daemon is its parent) and the process is reaped at once. The fork
stays until it is released. Nothing a release does writes to the state directory but a
warm-up's hot set, so a full disk cannot keep a fork (and its template) held.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from pagefork.daemon.config import ManagerConfig
from pagefork.daemon.exits import ExitWatcher
from pagefork.daemon.fork import Fork, UnknownForkError
from pagefork.daemon.holdings import Holdings, Hooks
from pagefork.daemon.hotsets import HotSets
from pagefork.daemon.lifecycle import CLAIMED, STARTING, DaemonEvent
from pagefork.errors import ForkError
from pagefork.server import PageServer
from pagefork.stats import LATENCY_WINDOW, ForkStats

log = logging.getLogger("pagefork")


def new_latency_samples(
    values: Sequence[int], seen: int, written: int, window: int = LATENCY_WINDOW
) -> tuple[list[int], int]:
    """The samples of a fork's latency ring that came after the first ``seen``, and how many
    it has had in all; ``written`` is how many are surely in it (a lower bound).

    The ring keeps the last ``window`` samples, sample ``n`` at index ``n % window``. Until
    it wraps, ``values`` holds exactly the samples written so far, in order.
    """
    if len(values) < window:
        return list(values[seen:]), len(values)
    total = max(seen, written)
    first = max(seen, total - window)  # older ones have been overwritten
    return [values[n % window] for n in range(first, total)], total


class ForkReleaser:
    """Watches the forks' VMMs exit, and releases forks."""

    def __init__(
        self, holdings: Holdings, hooks: Hooks, hot_sets: HotSets, config: ManagerConfig
    ) -> None:
        self.holdings = holdings
        self.hooks = hooks
        self.hot_sets = hot_sets
        self.config = config
        #: The thread that watches the VMMs' pidfds.
        self.exits = ExitWatcher()

    # --- VMM exits -----------------------------------------------------------------------------
    def watch_exit(self, fork: Fork) -> None:
        """Note the fork's VMM's exit when it comes (if its driver gives a pidfd)."""
        pidfd = fork.handle.pidfd if fork.handle is not None else None
        if pidfd is None:
            return  # this driver cannot tell: the fork stays live until released
        fork.exit_watch = self.exits.watch(pidfd, lambda: self.vmm_exited(fork))

    def vmm_exited(self, fork: Fork) -> None:
        """On the watcher's thread: the fork's VMM has exited. Reap it, and say so."""
        status = fork.handle.exit_status() if fork.handle is not None else None
        with self.holdings.lock:
            fork.exit_watch = None
            fork.exit_status = status
            fork.move(DaemonEvent.VMM_EXITED)
        log.info("fork %s: its VMM exited (status %s)", fork.fork_id, fork.exit_status)

    # --- releasing ---------------------------------------------------------------------------
    def release(self, fork_id: str) -> ForkStats:
        """Release the fork; see :meth:`~pagefork.daemon.manager.ForkManager.release`."""
        h = self.holdings
        with h.lock:
            fork = h.forks.get(fork_id)
            if fork is None or fork.stage in CLAIMED:
                raise UnknownForkError(f"unknown fork {fork_id!r}")
            # While starting, the creator carries the release out once the start ends.
            deferred = fork.stage in STARTING
            fork.move(DaemonEvent.RELEASE)
        if not deferred:
            return self.teardown(fork)
        bound = self.config.restore_timeout + self.config.prefetch_timeout + 5.0
        if not fork.released.wait(bound):
            raise ForkError(
                f"fork {fork_id} is still starting after {bound:g}s; it is released as soon "
                "as its start ends"
            )
        return fork.released_stats or ForkStats(fork=fork_id, state="released")

    def teardown(self, fork: Fork) -> ForkStats:
        """Release ``fork``, claimed by exactly one caller (phase ``releasing``)."""
        h, hooks = self.holdings, self.hooks
        fork_id = fork.fork_id
        try:
            if fork.exit_watch is not None:
                self.exits.unwatch(fork.exit_watch)
            if fork.handle is not None:
                try:
                    fork.handle.stop()
                except Exception as exc:  # stop what else we can: the page server, the count
                    log.warning("fork %s: stopping its VMM: %s", fork_id, exc)
            with h.lock:
                state = h.templates.get(fork.template_key)
            stats = ForkStats(fork=fork_id, state="released")
            if state is not None:
                with contextlib.suppress(ForkError):
                    stats = state.server.stats(fork_id)
                    self.feed_latencies(state.server, fork, stats)
                hot = None
                if fork.role == "warmup":
                    with contextlib.suppress(ForkError):
                        hot = state.server.hot_pages(fork_id)
                elif fork.role == "prefetch":
                    self.hot_sets.learn_from(state, fork_id)
                with contextlib.suppress(ForkError):
                    state.server.unregister_fork(fork_id)  # stops the session: recording ends
                if hot is not None:
                    self.hot_sets.adopt_hot_set(fork.template_key, fork_id, hot)
            if hooks.socket_journal is not None:
                hooks.socket_journal.remove(fork_id)
            if hooks.fork_journal is not None:
                hooks.fork_journal.remove(fork_id)
            with h.feed_lock:
                h.fed.pop(fork_id, None)
            stop_server: PageServer | None = None
            with h.lock:
                if h.forks.get(fork_id) is fork:
                    del h.forks[fork_id]
                loop = h.loops.get(fork.template_key)
                if loop is not None:
                    loop.fork_gone(fork_id)  # a warm-up that never recorded: the next one does
                if state is not None:
                    state.forks.discard(fork_id)
                    stop_server = h.drop_if_idle(state)
            if stop_server is not None:
                stop_server.close()  # joins its callbacks: the hot set is on disk by now
                log.info("template %s: page server stopped", fork.template_id)
            fork.released_stats = fork.final_stats or stats
            return fork.released_stats
        finally:
            with h.lock:
                fork.move(DaemonEvent.TORN_DOWN)
            fork.released.set()

    def feed_latencies(self, server: PageServer, fork: Fork, stats: ForkStats) -> None:
        """Hand ``on_fault_latencies`` the fork's fault latencies recorded since the last call
        (they feed the histogram). ``stats`` were read just before: their ``faults`` bound the
        samples that are surely written."""
        h, hooks = self.holdings, self.hooks
        if hooks.on_fault_latencies is None:
            return
        # The fault loop notes a fault's latency just after counting it: while the session
        # serves, the last counted fault may not have its sample yet.
        over = stats.state in ("ended", "failed")
        written = stats.faults if over else stats.faults - 1
        with h.feed_lock:
            seen = h.fed.get(fork.fork_id, 0)
            if written <= seen:
                return  # nothing new: skip copying the window
            try:
                values = server.fault_latencies_ns(fork.fork_id)
            except ForkError:
                return
            new, total = new_latency_samples(values, seen, written)
            h.fed[fork.fork_id] = total
        if new:
            hooks.on_fault_latencies(fork.template_id, new)
