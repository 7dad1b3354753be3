"""The daemon's main loop: how ``pagefork daemon`` runs, started fresh or by a takeover, and
handing over in turn (the handover itself is :mod:`pagefork.takeover.daemon`).

Every daemon listens for a successor on ``STATE_DIR/takeover.sock``. With ``--on-sighup
takeover``, SIGHUP starts one itself (``python -m pagefork daemon SAME-OPTIONS --takeover``,
the code installed now), which is what the systemd unit's reload does. A daemon that took over
tells systemd ``MAINPID=<pid>`` and ``READY=1`` when ``$NOTIFY_SOCKET`` is set.

Events on stdout, one JSON line each: ``took_over`` {from_pid, forks} (a takeover), then
``listening`` {control}; at the end ``handed_over`` {to_pid, forks} or ``stopped``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from pagefork.daemon.manager import ManagerConfig
from pagefork.daemon.service import Daemon
from pagefork.signals import POSTED, SignalInbox
from pagefork.store.lazy import StoreOptions
from pagefork.takeover.daemon import DaemonHandover, DaemonTarget, takeover_path
from pagefork.takeover.daemon_recover import adopt_orphans_into, keep_forks_if_killed
from pagefork.takeover.new import take_over
from pagefork.takeover.orphan import orphan_deadline
from pagefork.takeover.protocol import NoPeerError, TakeoverError, TakeoverRefused
from pagefork.takeover.recover import supervisor_alive
from pagefork.takeover.systemd import notify

log = logging.getLogger("pagefork")


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def successor_command(args: argparse.Namespace) -> list[str]:
    """The command that takes over from a daemon started with ``args``."""
    cmd = [sys.executable, "-m", "pagefork", "daemon", "--state-dir", str(args.state_dir)]
    cmd += ["--control", str(args.control), "--workers", str(args.workers)]
    cmd += ["--record-max-seconds", repr(args.record_max_seconds)]
    cmd += ["--record-max-share", repr(args.record_max_share)]
    cmd += ["--on-sighup", args.on_sighup, "--takeover"]
    if args.socket_dir:
        cmd += ["--socket-dir", str(args.socket_dir)]
    if args.max_layer_depth is not None:
        cmd += ["--max-layer-depth", str(args.max_layer_depth)]
    cmd += ["--cache-size", str(args.cache_size)]
    if args.cache_dir:
        cmd += ["--cache-dir", str(args.cache_dir)]
    if args.endpoint_url:
        cmd += ["--endpoint-url", str(args.endpoint_url)]
    if args.verbose:
        cmd.append("--verbose")
    return cmd


def _start_successor(args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    """Start a successor; log its failure (this daemon then serves on)."""
    cmd = successor_command(args)
    log.warning("SIGHUP: handing over to a new daemon: %s", " ".join(cmd))
    try:
        # In this daemon's process group: whatever bounds this daemon (a group kill,
        # ``timeout``, a terminal's Ctrl-C, systemd's cgroup) bounds its successor too.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    except OSError as exc:
        log.error("SIGHUP: cannot start a new daemon: %s; serving on", exc.strerror or exc)
        return None

    def reap() -> None:
        code = proc.wait()
        if code != 0:
            log.error("SIGHUP: the new daemon exited with status %d; serving on", code)

    threading.Thread(target=reap, name="pagefork-successor", daemon=True).start()
    return proc


def _pass_on_terminate(pid: int) -> None:
    """SIGTERM the successor ``pid`` (it is alive: it just said ``done``)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    finally:
        os.close(pidfd)


def _is_stop(code: int, args: argparse.Namespace) -> bool:
    """Whether ``code`` from the inbox asks the daemon to stop."""
    if code == POSTED:
        return False
    return not (code == signal.SIGHUP and args.on_sighup == "takeover")


def serve_daemon(args: argparse.Namespace, inbox: SignalInbox, store: StoreOptions) -> None:
    """Run the daemon of ``args`` (the parsed ``pagefork daemon`` options; ``store``: how it
    reaches templates in object storage) until a stop signal from ``inbox`` (SIGHUP with
    ``--on-sighup takeover`` hands over instead). A stop (SIGTERM, SIGINT) wins over a reload
    that came before it; one that comes while a successor takes over is passed on to it, so
    the service still stops."""
    orphan_deadline()  # a bad PAGEFORK_ORPHAN_DEADLINE is refused now, not at a first fork
    settings = ManagerConfig(
        socket_dir="",
        record_max_seconds=args.record_max_seconds,
        record_max_share=args.record_max_share,
        workers=args.workers,
        max_layer_depth=args.max_layer_depth,
        store=store,
    )
    listener = None
    daemon: Daemon | None = None
    if args.takeover:
        daemon = Daemon.for_takeover(
            args.state_dir, args.control, settings, socket_dir=args.socket_dir
        )
        target = DaemonTarget(daemon)
        try:
            took = take_over(takeover_path(args.state_dir), target, cancel_fd=inbox.fileno())
        except TakeoverError as exc:
            target.discard()
            if isinstance(exc, (NoPeerError, TakeoverRefused)) or supervisor_alive(
                takeover_path(args.state_dir)
            ):
                raise
            # The old daemon died mid-takeover: its workers serve its forks on.
            log.warning("takeover: %s; the running daemon is gone: adopting its forks", exc)
            daemon = None
        except BaseException:
            target.discard()
            raise
        else:
            keep_forks_if_killed(daemon)
            daemon.start()
            listener = took.listener
            _emit("took_over", from_pid=took.from_pid, forks=took.forks)
    if daemon is None:
        daemon = Daemon(
            args.state_dir,
            args.control,
            socket_dir=args.socket_dir,
            record_max_seconds=args.record_max_seconds,
            record_max_share=args.record_max_share,
            workers=args.workers,
            max_layer_depth=args.max_layer_depth,
            store=store,
        )
        try:
            # Killed, this daemon leaves its workers serving, for the next one to adopt; and
            # it adopts what a daemon killed before it left, before its first request.
            keep_forks_if_killed(daemon)
            found = adopt_orphans_into(daemon, inbox.fileno())
        except BaseException:
            daemon.close()
            raise
        if found.workers or found.failed or found.lost:
            _emit("adopted", workers=found.workers, forks=found.forks,
                  seconds=round(found.seconds, 6), failed=len(found.failed),
                  lost=found.lost)  # fmt: skip
        daemon.start()
    handed: list[tuple[int, int]] = []

    def done(pid: int, forks: int) -> None:  # the listener's thread
        handed.append((pid, forks))
        inbox.post()

    try:
        handover = DaemonHandover(daemon, done, sock=listener)
    except BaseException:
        daemon.close()
        raise
    terminate = False
    successors: list[subprocess.Popen[bytes]] = []
    try:
        _emit("listening", control=args.control)
        if args.takeover:
            notify(MAINPID=os.getpid(), READY=1)
        else:
            notify(READY=1)
        while not handed and not terminate:
            upgrade = False
            for code in inbox.wait():
                if _is_stop(code, args):
                    terminate = True  # whatever came before it: a stop stops
                elif code == signal.SIGHUP:
                    upgrade = True
            if upgrade and not terminate and not handed:
                started = _start_successor(args)
                if started is not None:
                    successors.append(started)
    finally:
        handover.close()  # waits for a handover in progress to end either way
    terminate = terminate or any(_is_stop(c, args) for c in inbox.drain())
    if handed:
        _emit("handed_over", to_pid=handed[0][0], forks=handed[0][1])
        if terminate:  # asked to stop while handing over: the successor stops
            _pass_on_terminate(handed[0][0])
    else:
        # Stopped before a successor it started took over (one still starting, say): that
        # successor must not become the service this stop ends.
        for proc in successors:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:  # stuck: it holds nothing of ours yet
                    proc.kill()
                    proc.wait()
        _emit("stopped")
