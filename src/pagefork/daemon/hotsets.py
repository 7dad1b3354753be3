"""The hot-page loop of each template, as the fork manager runs it.

- *warm-up*: the first fork while the template has no hot set records the pages it faults, in
  a bounded window (``record_max_seconds``, ``record_max_share`` of guest memory: a hot set that
  grows into all of memory makes restores slower). When the window closes, or the fork ends or
  is released, the hot set is saved to the template's hot-pages file (the producer).
- *prefetch*: every later fork gets that hot set installed before its vCPUs resume (the
  consumer), or, with the template's ``stream`` policy, the head of it before and the rest
  while the guest runs. A hot set that does not fit the fork's memory (the snapshot was
  taken again with another layout) is not an error: the fork is served on demand, its
  prefetch result says why, and the template's next fork records a new hot set.
- *demand*: a fork that arrives while the warm-up still records, before any hot set exists, is
  served on demand only (two recordings would race for one file).

Who records and who is prefetched is decided by the template's
:class:`~pagefork.hotloop.HotSetLoop`, the same policy ``pagefork serve`` follows; this module
saves what it records into the template.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

from pagefork.daemon.config import ManagerConfig
from pagefork.daemon.fork import Fork, TemplateKey
from pagefork.daemon.holdings import Holdings, TemplateState
from pagefork.errors import ForkError, HotPageFileError, PageforkError, PrefetchError
from pagefork.hotloop import HotSetLoop
from pagefork.hotpages import HotPageList
from pagefork.hotpages import load as load_hot_pages
from pagefork.layers.hotset import InheritedHotSet, inherited_hot_set
from pagefork.prefetch import PrefetchResult
from pagefork.regions import Region
from pagefork.store.lazy import LazyTemplate
from pagefork.templates import TemplateRecord, TemplateRegistry

log = logging.getLogger("pagefork")

#: How much longer than the prefetch's own timeout its streamed rest may take to report.
_STREAM_GRACE = 60.0


def _counts(result: PrefetchResult) -> dict[str, Any]:
    """A prefetch result's counters, as a fork's prefetch report shows them."""
    return {
        "installed": result.installed,
        "already_present": result.already_present,
        "skipped_removed": result.skipped_removed,
        "runs": result.runs,
        "ioctls": result.ioctls,
        "bytes": result.bytes,
        "seconds": result.seconds,
        # Until the head was in: what the VMM's resume waited for.
        "head_seconds": result.head_seconds,
        # A template in object storage: what its hot chunks cost to fetch first.
        "fetched_bytes": result.fetched_bytes,
        "fetch_seconds": result.fetch_seconds,
        # Gaps between hot runs installed with them (one copy cheaper than two ioctls).
        "bridged_bytes": result.bridged_bytes,
    }


def _misfit(hot: HotPageList, regions: Sequence[Region]) -> str | None:
    """Why ``hot`` cannot be installed into a fork with ``regions`` (its first bad entry), or
    None if every entry fits."""
    for index, (region, offset) in enumerate(hot.in_order()):
        if not 0 <= region < len(regions):
            return f"entry {index} is in region {region}; the fork has {len(regions)}"
        r = regions[region]
        if offset % r.page_size or offset >= r.size:
            return f"entry {index} (offset {offset:#x}) lies outside region {region}"
    return None


class HotSets:
    """Each template's hot-page loop: who records, what is prefetched, what is saved."""

    def __init__(
        self, holdings: Holdings, registry: TemplateRegistry, config: ManagerConfig
    ) -> None:
        self.holdings = holdings
        self.registry = registry
        self.config = config
        # A child template's inherited hot set, by template identity (see inherited_of).
        self._inherited: dict[TemplateKey, InheritedHotSet | None] = {}
        # Each template's guest memory layout, as its forks' handshakes gave it (one snapshot:
        # one layout): where a recorded hot set's pages lie in the mem-file.
        self._layouts: dict[TemplateKey, list[Region]] = {}

    def hot_set_of(self, record: TemplateRecord) -> HotPageList | None:
        """The template's hot set (loaded from its file once), or None if it has none."""
        return self.loop_of(record).hot

    def loop_of(self, record: TemplateRecord) -> HotSetLoop:
        """The template's hot-page loop, its hot set loaded from the template's file."""
        h = self.holdings
        key: TemplateKey = (record.id, record.created)
        with h.lock:
            loop = h.loops.get(key)
            if loop is not None:
                return loop
        try:
            hot: HotPageList | None = load_hot_pages(record.hot_pages_path)
        except HotPageFileError as exc:
            log.warning(
                "template %s: ignoring its hot set, it will be re-recorded: %s", record.id, exc
            )
            hot = None
        with h.lock:
            # Loaded meanwhile, or made by a warm-up: that one wins.
            return h.loops.setdefault(key, HotSetLoop.for_file(hot, record.hot_pages_path))

    def forget(self, template_id: str) -> None:
        """Drop the template's loops: its cached hot set and a pending re-record (lock held)."""
        h = self.holdings
        h.loops = {k: v for k, v in h.loops.items() if k[0] != template_id}
        self._layouts = {k: v for k, v in self._layouts.items() if k[0] != template_id}

    # --- prefetch ----------------------------------------------------------------------------
    def arm(self, fork: Fork, state: TemplateState) -> None:
        """Have ``fork``'s worker start installing its hot set the moment the VMM's handshake
        arrives, overlapping the snapshot load (a caller woken by the handshake would start a
        thread switch and a round trip later); :meth:`prefetch` then waits for that install.
        Nothing to arm for a fork without a hot set of its own."""
        if fork.role != "prefetch" or fork.hot is None:
            return
        try:
            state.server.prefetch_at_handshake(
                fork.fork_id, fork.hot, timeout=self.config.prefetch_timeout, head=_head(fork)
            )
        except PrefetchError as exc:  # e.g. its session ended: prefetch() says so in its turn
            log.debug("fork %s: prefetch not armed: %s", fork.fork_id, exc)

    def prefetch(self, fork: Fork, state: TemplateState, timeout: float | None) -> dict[str, Any]:
        """Install the template's hot set into ``fork`` (waits for its handshake); see
        :meth:`~pagefork.daemon.manager.ForkManager.prefetch`."""
        fork_id = fork.fork_id
        wait = timeout if timeout is not None else self.config.prefetch_timeout
        if fork.role != "prefetch" or fork.hot is None:
            regions = state.server.wait_connected(fork_id, timeout=wait)
            with self.holdings.lock:
                self._layouts[state.key] = regions
            inherited = self._inherited_of(state.record) if fork.role == "demand" else None
            if inherited is not None:  # a child that has no hot set of its own yet
                hot = inherited.for_regions(regions)
                result = state.server.prefetch(fork_id, hot, timeout=wait)
                fork.prefetch = {
                    "role": fork.role,
                    "inherited": True,
                    "hot_pages": len(hot),
                    "installed": result.installed,
                    "already_present": result.already_present,
                    "seconds": result.seconds,
                }
                return fork.prefetch
            fork.prefetch = {"role": fork.role, "hot_pages": 0, "installed": 0}
            return fork.prefetch
        policy = fork.policy
        head = _head(fork)
        try:
            result = state.server.prefetch(fork_id, fork.hot, timeout=wait, head=head)
        except PrefetchError as exc:
            problem = None
            if not exc.installed:
                with contextlib.suppress(ForkError):
                    problem = _misfit(fork.hot, state.server.wait_connected(fork_id, wait))
            if problem is None:
                raise
            return self._fall_back_to_demand(fork, problem)
        report: dict[str, Any] = {
            "role": fork.role,
            "hot_pages": len(fork.hot),
            "policy": policy.policy,
            "head": policy.head,
            **_counts(result),
            # Installed before the call returned (the VMM resumes then), after it (while the
            # guest ran), and the pages the guest faulted in before the stream reached them.
            "before_resume": result.installed,
            "after_resume": 0,
            "raced": 0,
            # Until the rest of a streamed hot set is in (then its counts above are final).
            "streaming": head is not None,
        }
        with self.holdings.lock:
            fork.prefetch = report
        if head is not None:
            threading.Thread(
                target=self._settle_stream,
                args=(fork, state, report, wait + _STREAM_GRACE),
                name=f"pagefork-stream-{fork_id}",
                daemon=True,
            ).start()
        return report

    def _settle_stream(
        self, fork: Fork, state: TemplateState, report: dict[str, Any], timeout: float
    ) -> None:
        """Wait for the rest of ``fork``'s streamed hot set, then give its report the final
        counts (or the error that ended the stream)."""
        try:
            whole = state.server.stream_result(fork.fork_id, timeout)
        except PageforkError as exc:  # the session ended first, or the fork was released
            settled = {**report, "streaming": False, "stream_error": str(exc)}
        else:
            settled = {**report, "streaming": False}
            if whole is not None:
                settled.update(_counts(whole))
                settled["before_resume"] = whole.installed - whole.streamed
                settled["after_resume"] = whole.streamed
                settled["raced"] = whole.raced
        with self.holdings.lock:
            if fork.prefetch is report:  # not replaced by a later prefetch meanwhile
                fork.prefetch = settled
            self.holdings.final.notify_all()
        log.debug("fork %s: hot set streamed: %s", fork.fork_id, settled)

    def wait_streamed(self, fork: Fork, timeout: float) -> dict[str, Any] | None:
        """``fork``'s prefetch report once no hot set streams into it (or after ``timeout``
        seconds, still streaming)."""
        h = self.holdings
        with h.final:
            h.final.wait_for(lambda: not (fork.prefetch or {}).get("streaming"), timeout)
            return fork.prefetch

    def _inherited_of(self, record: TemplateRecord) -> InheritedHotSet | None:
        """What a child template's forks are prefetched from while its first fork records
        its own hot set (:mod:`pagefork.layers.hotset`), made once per template; None for a
        template without layers."""
        h = self.holdings
        key: TemplateKey = (record.id, record.created)
        with h.lock:
            if key in self._inherited:
                return self._inherited[key]
        found = inherited_hot_set(self.registry, record) if record.layers else None
        with h.lock:
            return self._inherited.setdefault(key, found)

    def _fall_back_to_demand(self, fork: Fork, problem: str) -> dict[str, Any]:
        note = (
            f"the template's hot set does not fit this fork's memory ({problem}): served on "
            "demand; the template's next fork records a new hot set"
        )
        log.warning("fork %s of %s: %s", fork.fork_id, fork.template_id, note)
        with self.holdings.lock:
            loop = self.holdings.loops.get(fork.template_key)
            if loop is not None:
                loop.misfit()  # later forks are served on demand until the next one records
            fork.role = "demand"
            fork.hot = None
            fork.prefetch = {"role": "demand", "hot_pages": 0, "installed": 0, "note": note}
            return fork.prefetch

    # --- saving ------------------------------------------------------------------------------
    def adopt_hot_set(self, key: TemplateKey, fork_id: str, pages: HotPageList) -> None:
        """Save the warm-up fork's hot set as the template's (first call per warm-up wins).

        Holds ``hot_lock`` throughout: deleting a template takes it too, so the set is never
        written into a template deleted (or deleted and created again) meanwhile.
        """
        h = self.holdings
        template_id = key[0]
        with h.hot_lock:
            with h.lock:
                loop = h.loops.get(key)
                if loop is None or not loop.claim(fork_id):
                    return  # not this template's warm-up, or its set was saved already
                state = h.templates.get(key)
            hot: HotPageList | None = None
            try:
                if state is not None and len(pages):
                    pages.save(state.record.hot_pages_path)
                    hot = load_hot_pages(state.record.hot_pages_path)  # as later forks read it
                    state.server.prepare_prefetch()  # numpy, copy costs: no fork waits
                    log.info("template %s: hot set of %d pages saved", template_id, len(hot))
                    self._publish(state, fork_id, hot)
                elif state is not None:
                    log.warning(
                        "template %s: warm-up fork %s faulted no page", template_id, fork_id
                    )
            except PageforkError as exc:
                log.error("template %s: cannot save the hot set: %s", template_id, exc)
            finally:
                loop.adopt(fork_id, hot)

    def _publish(self, state: TemplateState, fork_id: str, hot: HotPageList) -> None:
        """A template in object storage: push the hot set with its hot pack, so that other
        hosts' cold forks fetch just those pages. On a thread of its own (it uploads), and
        never the template's failure: a push that fails is logged."""
        memfile = state.server.memfile
        if not isinstance(memfile, LazyTemplate):
            return
        template_id = state.key[0]
        with self.holdings.lock:
            regions = self._layouts.get(state.key)
        if regions is None:
            try:
                regions = state.server.wait_connected(fork_id, timeout=0)
            except ForkError:
                log.warning(
                    "template %s: hot set not pushed to the store: the warm-up fork's memory "
                    "layout is unknown (no prefetch was asked for it before it ended)",
                    template_id,
                )
                return

        def publish() -> None:
            try:
                url = memfile.publish_hot_set(hot, regions)
            except Exception as exc:  # the store, or a template closed meanwhile
                log.error("template %s: cannot push its hot set to the store: %s", template_id, exc)
            else:
                log.info("template %s: hot set and hot pack pushed: %s", template_id, url)

        threading.Thread(
            target=publish, name=f"pagefork-publish-{template_id}", daemon=True
        ).start()

    def learn_from(self, state: TemplateState, fork_id: str) -> None:
        """A prefetched fork ends: a learning hot set takes its misses (and is saved if it
        changed). Under ``hot_lock``, as every write of a template's hot set."""
        h = self.holdings
        with h.lock:
            loop = h.loops.get(state.key)
        if loop is None or not loop.records("prefetch"):
            return
        with h.hot_lock, contextlib.suppress(ForkError):
            try:
                loop.learn_and_save(
                    fork_id, state.server.hot_pages(fork_id), state.record.hot_pages_path
                )
            except PageforkError as exc:
                log.error("template %s: cannot save the learned hot set: %s", state.key[0], exc)


def _head(fork: Fork) -> int | None:
    """How many of ``fork``'s hot pages go in before its VMM resumes (None: all of them). A
    head as large as the hot set streams nothing."""
    head, hot = fork.policy.head, fork.hot
    return head if head is not None and hot is not None and head < len(hot) else None
