"""``pagefork serve``: a standalone page server on one socket, as Firecracker's handler runs.

Every connection on the socket is one fork session. Events go to stdout as JSON lines
(``listening``, ``prefetch_done``, ``hot_pages_saved``, ``fork_end``); logs go to stderr.
``fork_end`` carries the VMM's ``memory`` as last sampled while it lived (every
``--memory-interval`` seconds, from ``/proc/PID/smaps_rollup``; null if never read).

Every option is checked before the mem-file is loaded, so a bad one is a one-line error at
start, never a failure on some fork later. The server stops cleanly (every fork stopped, the
socket removed, exit 0) on SIGINT, SIGTERM or SIGHUP (SIGHUP stays ignored when it was ignored
at start, as under ``nohup``), and when the reader of its stdout goes away
(``serve | head -1``): its events would have nowhere to go, so it stops as a pipeline member
does, without a traceback.

A template served from object storage (``--mem-file s3://...``) brings its vmstate along when
it was pushed with one: serve writes it beside the socket (``SOCKET.vmstate``, mode 0600), names
it in ``listening`` (``vmstate``: null for a local mem-file, whose vmstate the user has), and
removes it when it stops (unless it handed over to a successor, which writes its own), so
Firecracker's ``snapshot_path`` can point at it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from pagefork.cli.options import parse_workers
from pagefork.cli.store_options import add_cache_arguments, store_options
from pagefork.errors import PageforkError
from pagefork.files import atomic_save, check_writable
from pagefork.hotloop import HotSetLoop
from pagefork.hotpages import HotPageList, decode, load
from pagefork.memstats import MemorySampler
from pagefork.server import MAX_HANDSHAKE_TIMEOUT, PageServer, ServerConfig
from pagefork.serving.sockets import SocketLock
from pagefork.signals import SignalInbox
from pagefork.stats import ForkStats
from pagefork.store.layout import is_s3_url, parse_s3_url
from pagefork.store.lazy import StoreOptions
from pagefork.store.template import fetch_pushed
from pagefork.takeover.new import take_over
from pagefork.takeover.orphan import orphan_deadline
from pagefork.takeover.orphan import setup as orphan_setup
from pagefork.takeover.pageserver import abandon
from pagefork.takeover.protocol import NoPeerError, TakeoverError, TakeoverRefused
from pagefork.takeover.recover import adopt_orphans, supervisor_alive
from pagefork.takeover.serve import ServeHandover, ServeSource, ServeTarget, takeover_path

log = logging.getLogger("pagefork")

#: The signals that stop the server cleanly (SIGHUP: the terminal or the supervisor went away).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve``."""
    p = sub.add_parser(
        "serve",
        help="serve forks of one mem-file on a Unix socket (Firecracker's uffd handler)",
        description=(
            "Serve guest memory of microVM forks from a template mem-file over userfaultfd. "
            "Point Firecracker's PUT /snapshot/load at the socket with mem_backend "
            '{"backend_type": "Uffd", "backend_path": SOCKET}. Every connection is one fork; '
            "a JSON line per event is printed on stdout. Stops cleanly (forks stopped, socket "
            "removed, exit 0) on SIGINT, SIGTERM or SIGHUP (unless started with SIGHUP ignored, "
            "as by nohup), and when the reader of stdout goes away (serve | head -1)."
        ),
    )
    p.add_argument(
        "--mem-file",
        required=True,
        help="the template's guest memory file, or s3://BUCKET/PREFIX for a template pushed "
        "with 'pagefork push' (served lazily, chunk by chunk, through --cache-dir)",
    )
    p.add_argument(
        "--layer",
        action="append",
        default=[],
        metavar="PATH",
        help="a layer file over the mem-file (repeat, bottom first): serve a layered template",
    )
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
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help=f"seconds a VMM has to send its mappings (default 10, at most "
        f"{MAX_HANDSHAKE_TIMEOUT:g})",
    )
    p.add_argument(
        "--record",
        metavar="OUT",
        help="record hot pages and save them to OUT (HPL1) when the fork ends or its window "
        "closes; OUT may contain {fork} in its file name to record every fork to its own file, "
        "otherwise only the first fork (the warm-up) is recorded and every later fork is "
        "prefetched from its hot set. OUT is checked at start: its "
        "directory must be writable, and an existing OUT must be a regular file (a symbolic "
        "link, FIFO or device is refused, never replaced)",
    )
    p.add_argument("--record-max-pages", type=int, help="recording window: stop after N pages")
    p.add_argument("--record-max-seconds", type=float, help="recording window: stop after T s")
    p.add_argument(
        "--hot-pages",
        metavar="FILE",
        help="the hot set to start from: every fork that does not record is prefetched from "
        "it right after its handshake",
    )
    p.add_argument(
        "--workers",
        type=parse_workers,
        default="auto",
        metavar="N|auto",
        help="worker processes that serve faults (default auto: one per usable CPU); a worker "
        "that dies is replaced and its forks are served on without loss",
    )
    add_cache_arguments(p)
    p.add_argument(
        "--takeover",
        action="store_true",
        help="take the socket and every live fork over from the serve running on --socket "
        "(same --mem-file), through SOCKET.takeover: no fork notices, and the old server exits "
        "0; if the takeover fails the old one serves on and this exits 2 with the reason",
    )
    p.add_argument(
        "--memory-interval",
        type=float,
        default=2.0,
        metavar="T",
        help="sample each fork's VMM memory every T seconds while it lives, for fork_end "
        "(default 2; 0: off)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log each fork's lifecycle")
    p.set_defaults(func=run)


class _Printer:
    """Writes one JSON object per line on stdout, whole lines only.

    When the reader of stdout has gone (EPIPE), events are dropped from then on and ``on_gone``
    is called once; fd 1 is pointed at /dev/null so that no later flush raises either. Any
    other write error (ENOSPC) drops that one event with a line on stderr.
    """

    def __init__(self, on_gone: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._on_gone = on_gone
        self.gone = sys.stdout is None

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}) + "\n"
        with self._lock:
            if self.gone:
                return
            try:
                sys.stdout.write(line)
                sys.stdout.flush()
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    # A full disk under a redirected stdout: the forks matter more than the
                    # log of them, so keep serving.
                    log.error("cannot print the %s event: %s", event, exc.strerror or exc)
                    return
                self.gone = True
                _silence_stdout()
            else:
                return
        log.info("stdout closed by its reader: shutting down")
        self._on_gone()


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null: what is still buffered is dropped instead of raising at exit."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        os.dup2(devnull, 1)
        os.close(devnull)


def vmstate_path(socket_path: str) -> str:
    """Where serve writes the vmstate of an ``s3://`` template: beside its socket."""
    return socket_path + ".vmstate"


def _check_args(args: argparse.Namespace) -> None:
    """Refuse options that could only fail later, naming the option."""
    t = args.handshake_timeout
    if not (math.isfinite(t) and 0 < t <= MAX_HANDSHAKE_TIMEOUT):
        raise PageforkError(
            f"--handshake-timeout must be more than 0 and at most {MAX_HANDSHAKE_TIMEOUT:g} "
            f"seconds, not {t:g}"
        )
    m = args.memory_interval
    if not (math.isfinite(m) and m >= 0):
        raise PageforkError(f"--memory-interval must be 0 (off) or more seconds, not {m:g}")
    if args.record_max_pages is not None and args.record_max_pages < 1:
        raise PageforkError(f"--record-max-pages must be at least 1, not {args.record_max_pages}")
    seconds = args.record_max_seconds
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise PageforkError(f"--record-max-seconds must be a positive number, not {seconds:g}")
    orphan_deadline()  # a bad PAGEFORK_ORPHAN_DEADLINE is refused now, not once serving
    if is_s3_url(args.mem_file):
        parse_s3_url(args.mem_file)
        check_writable(vmstate_path(args.socket), "vmstate")
    if args.record is not None:
        record: str = args.record
        if "{fork}" in os.path.dirname(record):
            raise PageforkError(f"--record {record}: {{fork}} may only appear in the file name")
        sample = record.replace("{fork}", "fork-1")
        check_writable(sample, "--record")
        # Saving a hot set over the template would destroy it.
        with contextlib.suppress(OSError):
            if os.path.samefile(sample, args.mem_file):
                raise PageforkError(f"--record {record} is the mem-file itself")
        for layer in args.layer:
            with contextlib.suppress(OSError):
                if os.path.samefile(sample, layer):
                    raise PageforkError(f"--record {record} is the layer {layer}")


def _fork_end_fields(stats: ForkStats, memory: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "memory": memory,
        **({"error": stats.error} if stats.error else {}),
    }


def run(args: argparse.Namespace) -> int:
    """Serve until a stop signal, or until the reader of stdout goes away."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="pagefork: %(message)s",
        stream=sys.stderr,
    )
    _check_args(args)
    # Signals, a takeover's end and a closed stdout wake the main thread through one pipe.
    # Installed before the mem-file is loaded, so a signal during a long load stops the server
    # once it is up. A SIGHUP ignored on entry (nohup) stays ignored: that caller asked to
    # outlive its terminal.
    with SignalInbox(STOP_SIGNALS, keep_ignored=(signal.SIGHUP,)) as inbox:
        owner = _Owner(args.socket)
        if not args.takeover:
            # Taken before anything is loaded: a second serve started at once on this socket
            # fails in one line at once. A successor is handed the lock with the forks.
            owner.take()
        try:
            return _serve(args, inbox, owner)
        finally:
            owner.release()


class _Owner:
    """This serve's lock on its socket (:class:`SocketLock`), once it has it."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.lock: SocketLock | None = None
        #: Handed to a successor with the forks: released, not removed.
        self.handed = False

    def take(self, handed_fd: int = -1) -> None:
        """Lock the socket (or own the lock a predecessor handed over as ``handed_fd``)."""
        if self.lock is None:
            self.lock = SocketLock(self.socket_path, handed_fd)
        elif handed_fd >= 0:
            os.close(handed_fd)

    @property
    def fd(self) -> int:
        """The lock's fd, for a successor (-1: none held)."""
        return self.lock.fd if self.lock is not None else -1

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release(remove=not self.handed)


def _serve(args: argparse.Namespace, inbox: SignalInbox, owner: _Owner) -> int:
    emit = _Printer(on_gone=inbox.post)
    hot: HotPageList | None = None
    store: StoreOptions | None = None
    pushed_vmstate: bytes | None = None
    if is_s3_url(args.mem_file):
        store = store_options(args)
        # Pinned: the memory served, the vmstate and the hot set come from one manifest.
        pushed = fetch_pushed(args.mem_file, store)
        args.mem_file = pushed.url
        pushed_vmstate = pushed.vmstate
        if pushed.hot_pages is not None and not args.hot_pages:
            hot = decode(pushed.hot_pages, f"the hot-page list of {pushed.url}")
    if args.hot_pages:
        hot = load(args.hot_pages)
        if not len(hot):
            log.warning(
                "hot-page file %s is empty or missing: forks are served on demand", args.hot_pages
            )
    record_path: str | None = args.record
    # The first fork records (its window's pages become the hot set of every later fork),
    # or, with {fork} in --record, every fork records to its own file.
    loop = HotSetLoop(
        hot,
        record=record_path is not None,
        record_every=record_path is not None and "{fork}" in record_path,
    )
    server: PageServer | None = None

    def should_record(fork_id: str) -> bool:
        return loop.role(fork_id) == "warmup"

    def window_closed(fork_id: str, pages: HotPageList) -> None:
        assert record_path is not None
        if not loop.claim(fork_id):
            return
        path = record_path.replace("{fork}", fork_id)
        saved: HotPageList | None = None
        try:
            pages.save(path)
            saved = pages
        except (OSError, PageforkError) as exc:
            log.error("fork %s: cannot save hot pages to %s: %s", fork_id, path, exc)
        finally:
            loop.adopt(fork_id, saved)
        if saved is not None:
            emit("hot_pages_saved", fork=fork_id, path=path, pages=len(pages))

    sampler: MemorySampler | None = None  # started with the server, below

    def connected(fork_id: str) -> None:
        log.info("fork %s: connected", fork_id)
        if sampler is not None and server is not None:
            try:
                pid = server.stats(fork_id).pid
            except PageforkError:
                return  # it ended already (the callback runs on a thread of its own)
            if pid is not None:
                sampler.add(fork_id, pid)
        current = loop.hot
        if loop.role(fork_id) != "prefetch" or current is None or server is None:
            return
        try:
            result = server.prefetch(fork_id, current)
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
            **(
                {
                    "fetched_bytes": result.fetched_bytes,
                    "fetch_seconds": round(result.fetch_seconds, 6),
                }
                if store is not None
                else {}
            ),
        )

    def ended(fork_id: str, stats: ForkStats) -> None:
        loop.fork_gone(fork_id)
        memory = sampler.take(fork_id) if sampler is not None else None
        emit("fork_end", **_fork_end_fields(stats, memory))

    def worker_restarted(old_pid: int, pid: int, forks: int) -> None:
        emit("worker_restarted", old_pid=old_pid, pid=pid, forks=forks)

    config = ServerConfig(
        mem_file_path=args.mem_file,
        layers=tuple(args.layer),
        page_size=args.page_size,
        on_failure=args.on_failure,
        handshake_timeout=args.handshake_timeout,
        record_max_pages=args.record_max_pages,
        record_max_seconds=args.record_max_seconds,
        on_connect=connected,
        on_fork_end=ended,
        on_window_closed=window_closed,
        on_worker_restarted=worker_restarted,
        workers=args.workers,
        store=store,
    )
    server = PageServer(config)
    if (hot is not None and len(hot)) or args.record:
        server.prepare_prefetch()  # numpy and the host's copy costs, now: no fork waits
    handover: ServeHandover | None = None
    vmstate: str | None = None
    handed: list[int] = []
    try:
        if args.memory_interval > 0:
            sampler = MemorySampler(args.memory_interval)
        listener = None
        target = ServeTarget(server, loop, args.socket, should_record, args.record)
        # Killed, this process leaves its workers serving, for the next one to adopt (told
        # before any fork is theirs).
        server.keep_forks_if_killed(
            orphan_setup(
                takeover_path(args.socket),
                "serve",
                ServeSource(server, loop, args.socket, args.record).plan(),
            )
        )
        orphans = True  # a server killed before us may have left workers serving its forks
        if args.takeover:
            server.wait_ready()  # built before the old server is asked for anything
            try:
                took = take_over(takeover_path(args.socket), target, cancel_fd=inbox.fileno())
            except TakeoverError as exc:
                if isinstance(exc, (NoPeerError, TakeoverRefused)) or supervisor_alive(
                    takeover_path(args.socket)
                ):
                    abandon(server)  # the forks are the old server's: end none, save nothing
                    raise
                # The old server died mid-takeover: its workers serve its forks on.
                log.warning("takeover: %s; the running server is gone: adopting its forks", exc)
            except BaseException:
                abandon(server)
                raise
            else:
                orphans = False
                listener = took.listener
                if target.lock_fd >= 0:
                    owner.take(target.lock_fd)
                emit("took_over", from_pid=took.from_pid, forks=took.forks)
        if orphans:
            owner.take()  # a successor whose old side died: no one else may adopt now
            if not supervisor_alive(takeover_path(args.socket)):
                if supervisor_alive(args.socket):
                    # Forks adopted now would end when the socket then cannot be bound: the
                    # orphans serve on for whoever holds it.
                    raise PageforkError(f"{args.socket} is in use by a live server")
                server.wait_ready()
                # Not cancelled by a stop signal: a stop in the middle would leave some forks
                # adopted and some orphaned. Every step is bounded (recover.STEP_TIMEOUT); the
                # signal waits in the inbox, and the stop that follows ends every fork alike.
                found = adopt_orphans(takeover_path(args.socket), target)
                if found.failed and not found.workers:
                    # Serving on beside orphans it could not adopt (another mem-file, say)
                    # would leave their forks to die at the deadline, with no later server
                    # able to take them: refuse, and let the operator start the right one.
                    raise PageforkError(
                        f"orphaned workers of an earlier serve on {args.socket} could not be "
                        f"adopted ({found.failed[0]}); they serve their forks on until their "
                        "deadline: start serve with the options they were started with"
                    )
                if found.workers or found.failed:
                    emit("adopted", workers=found.workers, forks=found.forks,
                         seconds=round(found.seconds, 6), failed=len(found.failed))  # fmt: skip
            server.listen(args.socket, record=should_record)

        def handed_over(pid: int, forks: int) -> None:
            handed.append(pid)  # the vmstate beside the socket is the successor's now
            owner.handed = True  # and so is the lock
            emit("handed_over", to_pid=pid, forks=forks)
            inbox.post()

        handover = ServeHandover(
            server, loop, args.socket, handed_over, listener, record=args.record,
            lock_fd=owner.fd, pause=sampler.pause if sampler is not None else None,
        )  # fmt: skip
        server.wait_ready()  # "listening" promises forks are served at once
        if pushed_vmstate is not None:
            # Written once this process owns the socket: a successor replaces its
            # predecessor's file, and one whose takeover failed leaves it alone.
            vmstate = vmstate_path(args.socket)
            atomic_save(vmstate, pushed_vmstate, "vmstate", mode=0o600)
        emit(
            "listening",
            socket=args.socket,
            mem_file=args.mem_file,
            vmstate=vmstate,
            worker_pids=server.worker_pids(),
        )
        _wait_for_stop(inbox)
    finally:
        if handover is not None:
            handover.close()  # after a takeover: drops every fork without ending it
        else:
            server.close()
        if sampler is not None:
            sampler.close()
        if vmstate is not None and not handed:
            with contextlib.suppress(OSError):
                os.unlink(vmstate)
    return 0


def _wait_for_stop(inbox: SignalInbox) -> None:
    """Block until a stop signal or a post arrives in ``inbox``, or the reader of stdout goes
    away."""
    poller = select.poll()
    poller.register(inbox.fileno(), select.POLLIN)
    # No events asked for: poll still reports POLLERR when a pipe's reader has closed, and
    # POLLHUP when a socket's peer has. A regular file or /dev/null never reports either.
    with contextlib.suppress(ValueError, OSError):
        poller.register(1, 0)
    while True:
        for fd, events in poller.poll():
            if fd == inbox.fileno():
                if inbox.drain():
                    return
                continue
            if events & select.POLLNVAL:
                poller.unregister(1)  # stdout was closed before we started: nothing to watch
            elif events & (select.POLLERR | select.POLLHUP):
                log.info("stdout closed by its reader: shutting down")
                _silence_stdout()
                return
