"""Learn that VMM processes exited, without polling: one thread, one epoll, one pidfd each.

A pidfd becomes readable once its process has exited. :class:`ExitWatcher` waits on every
watched pidfd at once and calls back on its own thread; the daemon's fork manager uses it to
mark a fork ``exited`` and reap its VMM as soon as it ends.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from pagefork.errors import PageforkError

log = logging.getLogger("pagefork")


class ExitWatcher:
    """Calls back when a watched process exits, through its pidfd (readable once it has
    exited): one thread and one epoll for every VMM, no polling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, Callable[[], None]] = {}
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll = select.epoll()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="pagefork-vmm-exits", daemon=True)
        self._thread.start()

    def watch(self, pidfd: int, on_exit: Callable[[], None]) -> int:
        """Call ``on_exit`` (on the watcher's thread) once the process exits; a token for
        :meth:`unwatch`. The watcher keeps its own duplicate of ``pidfd``."""
        fd = os.dup(pidfd)  # ours to close, whatever the driver does with its own
        with self._lock:
            if self._closed:
                os.close(fd)
                raise PageforkError("the exit watcher is closed")
            self._watched[fd] = on_exit
            self._epoll.register(fd, select.EPOLLIN)
        return fd

    def unwatch(self, token: int) -> None:
        """Stop watching (idempotent; a callback already running still finishes)."""
        with self._lock:
            if self._watched.pop(token, None) is not None:
                self._epoll.unregister(token)
                os.close(token)

    def _run(self) -> None:
        while True:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _ in events:
                if fd == self._wake:
                    return
                with self._lock:
                    # The fd may have been unwatched, and its number reused, since the poll.
                    if fd not in self._watched or not _readable_now(fd):
                        continue
                    on_exit = self._watched.pop(fd)
                    self._epoll.unregister(fd)
                    os.close(fd)
                try:
                    on_exit()
                except Exception:  # the watcher must outlive any one callback
                    log.exception("handling a VMM's exit failed")

    def close(self) -> None:
        """Stop the thread and close every fd; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.eventfd_write(self._wake, 1)
        self._thread.join()
        with self._lock:
            for fd in self._watched:
                os.close(fd)
            self._watched.clear()
        self._epoll.close()
        os.close(self._wake)


def _readable_now(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


__all__ = ["ExitWatcher"]
