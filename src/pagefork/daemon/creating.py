"""A fork's creation: its id and socket path, its driver's options, and the start of its VMM
(restore, prefetch, resume), which a release may cut short."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pagefork.daemon.config import ManagerConfig, PrefetchPolicy, PrefetchPolicyError
from pagefork.daemon.fork import DriverOptionsError, Fork, journal_record
from pagefork.daemon.holdings import Holdings, Hooks
from pagefork.daemon.hotsets import HotSets
from pagefork.daemon.lifecycle import CANCELLED, DaemonEvent, ForkPhase
from pagefork.daemon.releasing import ForkReleaser
from pagefork.daemon.servers import TemplateServers
from pagefork.errors import ForkError, PageforkError, VmmError
from pagefork.memstats import try_measure
from pagefork.server import validate_fork_id
from pagefork.templates import TemplateRecord, TemplateRegistry
from pagefork.vmm.base import RestoreRequest, VmmDriver

log = logging.getLogger("pagefork")

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: The longest fork id :func:`~pagefork.server.validate_fork_id` accepts.
MAX_FORK_ID = 64
#: A generated fork id is ``<template id, cut>-<8 hex digits>``.
_GENERATED_SUFFIX = 9
_GENERATED_TEMPLATE_PART = 40


def fork_id_room(socket_dir: str) -> int:
    """The longest fork id whose socket ``<socket_dir>/<id>.sock`` fits :data:`MAX_SOCKET_PATH`."""
    return MAX_SOCKET_PATH - len(os.fsencode(os.path.join(socket_dir, ""))) - len(".sock")


def _check_mergeable(fork_id: str, pid: int | None) -> None:
    """Warn when a fork of a sharing template runs in a VMM that is not mergeable: one the
    caller started (``api_socket``) must be started with ``PR_SET_MEMORY_MERGE`` set."""
    memory = try_measure(pid, guest=False)
    if memory is not None and memory.merge_any is False:
        log.warning(
            "fork %s: its template shares memory, but VMM pid %d is not mergeable (a VMM "
            "pagefork did not start must be started with prctl(PR_SET_MEMORY_MERGE, 1))",
            fork_id,
            pid,
        )


def template_policy(record: TemplateRecord, default: PrefetchPolicy) -> PrefetchPolicy:
    """The prefetch policy ``record`` names, or ``default`` when it names none;
    :class:`PrefetchPolicyError` naming the template and the field if its record's is bad."""
    if record.prefetch_policy is None and record.prefetch_head is None:
        return default
    try:
        return PrefetchPolicy.parse(record.prefetch_policy, record.prefetch_head)
    except PrefetchPolicyError as exc:
        raise PrefetchPolicyError(f"template {record.id!r}: {exc}") from None


def check_socket_dir(socket_dir: str) -> int:
    """Refuse a socket dir that leaves no room for a generated fork id; warn (one line) when
    it leaves less than the longest id allowed. Returns the room."""
    room = fork_id_room(socket_dir)
    if room < 1 + _GENERATED_SUFFIX:
        raise PageforkError(
            f"socket dir {socket_dir} is too long: a fork socket in it would exceed "
            f"{MAX_SOCKET_PATH} bytes (use a shorter --socket-dir)"
        )
    if room < MAX_FORK_ID:
        log.warning(
            "socket dir %s leaves room for fork ids of at most %d characters (%d are "
            "allowed): longer ids will be refused; a shorter --socket-dir avoids this",
            socket_dir,
            room,
            MAX_FORK_ID,
        )
    return room


class ForkCreator:
    """Registers forks with their template's page server and starts their VMMs."""

    def __init__(
        self,
        holdings: Holdings,
        hooks: Hooks,
        parts: tuple[TemplateServers, HotSets, ForkReleaser],
        registry: TemplateRegistry,
        config: ManagerConfig,
        drivers: Mapping[str, VmmDriver],
        prefetch: Callable[[str], object],
        id_room: int,
    ) -> None:
        self.holdings = holdings
        self.hooks = hooks
        self.servers, self.hot_sets, self.releaser = parts
        self.registry = registry
        self.config = config
        self.drivers = drivers
        #: Installs a fork's hot set (the manager's ``prefetch``, looked up at each call).
        self.prefetch = prefetch
        #: The longest fork id whose socket path fits the socket dir (see check_socket_dir).
        self.id_room = id_room

    def check_options(
        self, driver: str, options: Mapping[str, Any], fork_id: str | None = None
    ) -> None:
        """Validate ``options`` for ``driver`` (and what they make of ``fork_id``) without
        side effects; :class:`DriverOptionsError` naming the option if they are invalid."""
        vmm = self.drivers.get(driver)
        if vmm is None:
            known = ", ".join(sorted(self.drivers)) or "none available"
            raise VmmError(f"unknown VMM driver {driver!r} (known: {known})")
        try:
            vmm.check_options(options, fork_id)
        except VmmError as exc:
            raise DriverOptionsError(f"driver {driver}: {exc}") from None

    def new_fork_id(self, template_id: str) -> str:
        """A fresh fork id for ``template_id`` whose socket path fits the socket dir."""
        part = template_id[: min(_GENERATED_TEMPLATE_PART, self.id_room - _GENERATED_SUFFIX)]
        return f"{part}-{secrets.token_hex(4)}"

    def create_fork(
        self,
        template_id: str,
        fork_id: str | None = None,
        driver: str | None = None,
        options: Mapping[str, Any] | None = None,
        policy: PrefetchPolicy | None = None,
    ) -> Fork:
        """Register a fork of ``template_id`` and return it; see
        :meth:`~pagefork.daemon.manager.ForkManager.create_fork`.
        """
        if fork_id is None:
            fork_id = self.new_fork_id(template_id)
        validate_fork_id(fork_id)
        if len(fork_id) > self.id_room:
            raise ForkError(
                f"fork id {fork_id!r} is too long for socket dir {self.config.socket_dir}: "
                f"at most {self.id_room} characters fit a socket path there"
            )
        vmm: VmmDriver | None = None
        opts = dict(options or {})
        if driver is not None:
            self.check_options(driver, opts, fork_id)
            vmm = self.drivers[driver]
        seen = self.registry.get(template_id)
        if policy is None:
            policy = template_policy(seen, self.config.prefetch_policy)
        hot = self.hot_sets.hot_set_of(seen)
        fork, record = self.servers.register(seen, fork_id, hot, driver, starting=vmm is not None)
        # Before this call answers with the fork's socket, and before its VMM starts: nobody
        # has asked for its prefetch yet.
        fork.policy = policy
        self.hot_sets.arm(fork, self.holdings.state_of(fork))
        log.info("fork %s of %s: %s, socket %s", fork_id, template_id, fork.role, fork.socket_path)
        hooks = self.hooks
        if hooks.socket_journal is not None:
            hooks.socket_journal.add(fork_id, fork.socket_path)
        if hooks.fork_journal is not None:
            hooks.fork_journal.write(fork_id, journal_record(fork))
        self.registry.touch(template_id, record.created)
        if vmm is None:
            return fork
        error: BaseException | None = None
        try:
            self._start_vmm(fork, vmm, record, opts)
        except BaseException as exc:
            error = exc
        if error is None and hooks.socket_journal is not None:
            # A driver may have linked the socket into a jail: a new link count is a new
            # change time, by which the journal knows the file.
            hooks.socket_journal.add(fork_id, fork.socket_path)
        with self.holdings.lock:
            # Started: live (or exited, if its VMM went meanwhile). Failed, or released while
            # starting: releasing, and this call releases it.
            fork.move(DaemonEvent.STARTED if error is None else DaemonEvent.START_FAILED)
            if fork.phase is not ForkPhase.RELEASING:
                return fork
        # This call releases it (stopping the handle the driver returned, if any). A failing
        # cleanup is logged; it never hides ``error``.
        try:
            self.releaser.teardown(fork)
        except Exception:
            log.exception("fork %s: releasing it after its start failed", fork_id)
        if error is not None:
            raise error
        raise ForkError(f"fork {fork_id} was released while its VMM was starting")

    def _start_vmm(
        self, fork: Fork, vmm: VmmDriver, record: TemplateRecord, options: dict[str, Any]
    ) -> None:
        """Restore, prefetch, resume; stops early (without error) once a release is pending.

        The prefetch starts with the restore: it waits for the fork's handshake, which the VMM
        sends while it loads its snapshot, and installs the hot set while the load goes on (a
        fault the load itself takes, such as Firecracker's VMGenID write, is served between
        two slices of it). Resume waits for both. With a ``stream`` policy the prefetch
        returns once the head of the hot set is in, so the VMM resumes then, and the rest
        streams while the guest runs (:meth:`HotSets.prefetch` reports it when done).
        """
        prefetched: list[BaseException | None] = []

        def prefetch() -> None:
            try:
                self.prefetch(fork.fork_id)
            except BaseException as exc:  # handed to the creating thread
                prefetched.append(exc)
            else:
                prefetched.append(None)

        early = threading.Thread(
            target=prefetch, name=f"pagefork-prefetch-{fork.fork_id}", daemon=True
        )
        early.start()
        request = RestoreRequest(
            fork_id=fork.fork_id,
            uffd_socket=fork.socket_path,
            snapshot_path=record.snapshot_path,
            mem_file=record.mem_file,
            options=options,
            layers=tuple(record.layers),
            share_memory=record.share_memory,
        )
        # A restore that fails leaves the prefetch waiting for a handshake that never comes:
        # the fork's teardown unregisters it, which ends that wait.
        fork.handle = vmm.restore(request, timeout=self.config.restore_timeout)
        if record.share_memory:
            _check_mergeable(fork.fork_id, fork.handle.pid)
        self.releaser.watch_exit(fork)
        if fork.stage in CANCELLED:
            return
        early.join()
        if fork.stage in CANCELLED:
            return
        if prefetched and prefetched[0] is not None:
            raise prefetched[0]
        fork.handle.resume()
