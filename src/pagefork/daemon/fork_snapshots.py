"""Snapshots of a live fork, each a child template: one diff chain per fork.

A fork's first snapshot is a layer over its template; each later one a layer over the one
before (the VMM's diff holds only what changed since). The work of one snapshot (pause, write,
register) is :func:`~pagefork.daemon.snapshot.snapshot_fork`; this module keeps each fork's
chain whole, or refuses once it broke.
"""

from __future__ import annotations

import logging

from pagefork.daemon.config import ManagerConfig
from pagefork.daemon.fork import Fork, ForkConflictError
from pagefork.daemon.holdings import Holdings
from pagefork.daemon.lifecycle import ForkPhase
from pagefork.daemon.releasing import ForkReleaser
from pagefork.daemon.snapshot import SnapshotResult, snapshot_fork
from pagefork.errors import TemplateError
from pagefork.stats import ForkStats
from pagefork.templates import (
    TemplateRecord,
    TemplateRegistry,
    UnknownTemplateError,
    validate_template_id,
)

log = logging.getLogger("pagefork")


def no_snapshot_why(fork: Fork) -> str:
    """Why ``fork`` (not live, or with no VMM the daemon drives) cannot be snapshotted."""
    if fork.handle is None:
        return (
            f"fork {fork.fork_id} has no VMM the daemon drives: no snapshot (create the fork "
            "with --vmm to snapshot it)"
        )
    if fork.state == "exited" or fork.phase is ForkPhase.EXITED:
        status = "" if fork.exit_status is None else f" (status {fork.exit_status})"
        why = f"fork {fork.fork_id} is exited: its VMM has exited{status}, and only a live fork "
        why += "can be snapshotted"
        if not fork.handle.stays_after_run:
            why += (
                "; a built-in microVM fork stays after its guest's run only when created with "
                "--option snapshots=true"
            )
        return why
    return f"fork {fork.fork_id} is not live ({fork.phase.value}): no snapshot"


class ForkSnapshots:
    """Takes snapshots of live forks, one at a time per fork, in the order they arrive."""

    def __init__(
        self,
        holdings: Holdings,
        registry: TemplateRegistry,
        releaser: ForkReleaser,
        config: ManagerConfig,
    ) -> None:
        self.holdings = holdings
        self.registry = registry
        self.releaser = releaser
        self.config = config

    def snapshot(
        self, fork_id: str, template_id: str, *, release: bool = False
    ) -> tuple[SnapshotResult, ForkStats | None]:
        """Snapshot the fork; see :meth:`~pagefork.daemon.manager.ForkManager.snapshot`."""
        validate_template_id(template_id)
        h = self.holdings
        fork = h.fork(fork_id)
        # Wait for a snapshot under way: this one is a layer over its child.
        if not fork.snapshot_lock.acquire(timeout=self.config.snapshot_timeout):
            raise ForkConflictError(
                f"fork {fork_id}: a snapshot of it is still under way after "
                f"{self.config.snapshot_timeout:g}s"
            )
        try:
            with h.lock:
                if fork.phase is not ForkPhase.LIVE or fork.handle is None:
                    raise ForkConflictError(no_snapshot_why(fork))
            handle = fork.handle
            if fork.snapshot_lost is not None:
                raise ForkConflictError(fork.snapshot_lost)
            if self.registry.exists(template_id):
                raise TemplateError(f"template {template_id!r} already exists")
            parent = self._parent(fork)
            state = h.state_of(fork)

            def taken() -> None:
                # Cleared again below on success.
                fork.snapshot_lost = (
                    f"fork {fork_id}: snapshot {template_id!r} failed after the VMM had written "
                    "its diff, and a diff holds only what changed since the one before: a later "
                    "snapshot of this fork would miss those writes, so none is taken"
                )

            try:
                result = snapshot_fork(
                    fork_id=fork_id,
                    handle=handle,
                    server=state.server,
                    parent=parent,
                    registry=self.registry,
                    template_id=template_id,
                    timeout=self.config.snapshot_timeout,
                    max_layer_depth=self.config.max_layer_depth,
                    removed_before=fork.removed_at_snapshot,
                    on_taken=taken,
                )
            finally:
                if not release:
                    try:
                        handle.resume()
                    except Exception as exc:  # released meanwhile, say: never hide the cause
                        log.warning("fork %s: cannot resume it after a snapshot: %s", fork_id, exc)
            fork.snapshot_lost = None
            fork.last_snapshot = (result.template.id, result.template.created)
            fork.removed_at_snapshot = result.removed
            log.info("fork %s: snapshot registered as template %s", fork_id, template_id)
            # Inside the lock: a snapshot waiting for this one must find the fork released.
            return result, self.releaser.release(fork_id) if release else None
        finally:
            fork.snapshot_lock.release()

    def _parent(self, fork: Fork) -> TemplateRecord:
        """What the fork's next snapshot is a layer over: its template, or its last snapshot."""
        if fork.last_snapshot is None:
            return self.registry.get(fork.template_id)
        child_id, created = fork.last_snapshot
        try:
            record: TemplateRecord | None = self.registry.get(child_id)
        except UnknownTemplateError:
            record = None
        if record is None or record.created != created:
            raise ForkConflictError(
                f"fork {fork.fork_id}: its previous snapshot, template {child_id!r}, was "
                "deleted, and the VMM's next diff holds only what changed since that one: "
                "no later snapshot of this fork can be whole"
            )
        return record
