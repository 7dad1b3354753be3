"""Stop and reload signals, delivered to the main thread through a pipe.

Why a pipe: the kernel may deliver a process-directed signal to any thread. CPython then only
sets a flag and runs the Python handler on the main thread the next time it executes bytecode.
A main thread blocked in a lock or ``poll`` that the signal did not interrupt (it landed on a
worker-watching thread) would sleep on with the signal pending: a stop that never stops. With
``signal.set_wakeup_fd`` the C-level handler writes the signal's number into a pipe from
whichever thread took it, and the main thread waits on that pipe, so it always wakes. The
handlers themselves do nothing: no lock is ever taken inside a handler (``Event.set`` from a
handler can deadlock against the interrupted thread holding the same lock).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterable
from types import FrameType, TracebackType

#: The code :meth:`SignalInbox.post` writes: not a signal number.
POSTED = 0


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """The handler: the pipe carries the signal; nothing to do here."""


class SignalInbox:
    """Collects ``signals`` (and wake-ups posted by other threads) for the main thread.

    Use as a context manager on the main thread. A signal that is ignored on entry stays
    ignored when ``keep_ignored`` holds it (``nohup`` asked the process to outlive its terminal).
    """

    def __init__(
        self, signals: Iterable[signal.Signals], keep_ignored: Iterable[signal.Signals] = ()
    ) -> None:
        kept = set(keep_ignored)
        self.signals = [
            s for s in signals if not (s in kept and signal.getsignal(s) == signal.SIG_IGN)
        ]
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._previous: dict[signal.Signals, object] = {}
        self._previous_wakeup = -1

    def __enter__(self) -> SignalInbox:
        self._previous_wakeup = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, _ignore)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        signal.set_wakeup_fd(self._previous_wakeup)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def fileno(self) -> int:
        """The pipe's read end, readable when a signal or a post is waiting."""
        return self._read_fd

    def post(self) -> None:
        """Wake the main thread (from any thread): :meth:`wait` returns ``POSTED``."""
        with contextlib.suppress(BlockingIOError):  # full: a wake-up is already waiting
            os.write(self._write_fd, bytes([POSTED]))

    def drain(self) -> list[int]:
        """What has arrived so far, in order (signal numbers and ``POSTED``); never blocks."""
        codes: list[int] = []
        while True:
            try:
                chunk = os.read(self._read_fd, 512)
            except BlockingIOError:
                return codes
            if not chunk:
                return codes
            codes.extend(chunk)

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until something arrives (or ``timeout``), then return all that has."""
        select.select([self._read_fd], [], [], timeout)
        return self.drain()


__all__ = ["POSTED", "SignalInbox"]
