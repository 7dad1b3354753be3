"""What a live takeover moves between two daemons' fork managers, through these methods only
(:mod:`pagefork.takeover.daemon`): the templates' page servers, where each template's hot-page
loop stands, and every fork."""

from __future__ import annotations

from typing import Any

from pagefork.daemon.fork import Fork, TemplateKey
from pagefork.daemon.holdings import Holdings, TemplateState
from pagefork.daemon.releasing import ForkReleaser
from pagefork.hotloop import HotSetLoop
from pagefork.server import PageServer
from pagefork.templates import TemplateRecord

#: The ``stream_error`` of a fork handed over while its hot set streamed into it.
_HANDED_OVER = (
    "the daemon was handed over while this fork's hot set streamed: the rest of it is served "
    "on demand, and the counts are those at the handover"
)


class ManagerHandover:
    """Exports a fork manager's holdings to a takeover, and adopts another daemon's."""

    def __init__(self, holdings: Holdings, releaser: ForkReleaser) -> None:
        self.holdings = holdings
        self.releaser = releaser

    def template_servers(self) -> list[tuple[TemplateRecord, PageServer]]:
        """Every template whose page server runs, with that server."""
        with self.holdings.lock:
            return [(s.record, s.server) for s in self.holdings.templates.values()]

    def export_state(
        self,
    ) -> tuple[list[Fork], list[tuple[TemplateKey, dict[str, Any]]], dict[str, int]]:
        """For a takeover's old side, once quiesced: every fork, where each template's
        hot-page loop stands, and how many of each fork's fault latencies the metrics have
        counted already."""
        h = self.holdings
        with h.lock:
            forks = list(h.forks.values())
            loops = [(key, loop.snapshot()) for key, loop in h.loops.items()]
        with h.feed_lock:
            fed = {f.fork_id: h.fed.get(f.fork_id, 0) for f in forks}
        return forks, loops, fed

    def adopt_template(self, record: TemplateRecord, server: PageServer) -> None:
        """Serve ``record``'s forks from ``server``, which a takeover handed them to."""
        with self.holdings.lock:
            self.holdings.templates[(record.id, record.created)] = TemplateState(record, server)

    def adopt_loop(self, key: TemplateKey, snapshot: dict[str, Any]) -> None:
        """Continue a template's hot-page loop from another daemon's :meth:`export_state`."""
        loop = HotSetLoop()
        loop.restore(snapshot)
        with self.holdings.lock:
            self.holdings.loops[key] = loop

    def adopt_fork(self, fork: Fork, latencies_fed: int) -> None:
        """Hold ``fork``, which another daemon handed over (its template adopted first): a
        prefetch fork gets its template's hot set, and its VMM's exit is watched."""
        h = self.holdings
        with h.feed_lock:
            h.fed[fork.fork_id] = latencies_fed
        report = fork.prefetch
        if report is not None and report.get("streaming"):
            # The stream's waiter was the old daemon's; this one's page server never saw the
            # stream (the old side's workers cut it short when they let the fork go), so the
            # report is final now, saying why its counts stop at the handover.
            fork.prefetch = {**report, "streaming": False, "stream_error": _HANDED_OVER}
        with h.lock:
            loop = h.loops.get(fork.template_key)
            if fork.role == "prefetch" and loop is not None:
                fork.hot = loop.hot
            h.forks[fork.fork_id] = fork
            state = h.templates.get(fork.template_key)
            if state is not None:
                state.forks.add(fork.fork_id)
        if fork.handle is not None and not fork.vmm_exited:
            self.releaser.watch_exit(fork)

    def abandon(self) -> list[PageServer]:
        """Let go of every template and fork without releasing one or stopping a VMM (a
        takeover moved them, or a failed one's new side built them for nothing) and stop
        watching VMM exits; the page servers, which the caller abandons."""
        h = self.holdings
        with h.lock:
            servers = [s.server for s in h.templates.values()]
            h.templates.clear()
            h.forks.clear()
        self.releaser.exits.close()
        return servers
