"""The capped thread pools that answer the HTTP server's requests."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

log = logging.getLogger("pagefork")


class WorkerPool:
    """A capped pool of daemon threads, started as work arrives.

    Not :class:`concurrent.futures.ThreadPoolExecutor`: its threads are joined at interpreter
    exit, so one request stuck in a long manager call would keep a stopping daemon alive.
    """

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` on a thread of the pool; :class:`RuntimeError` once it is closed."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the pool is closed")
            if self._idle == 0 and len(self._threads) < self._size:
                thread = threading.Thread(
                    target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1  # an idle thread takes it
        self._tasks.put(task)

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                task()
            except Exception:  # the server's task handles everything; this keeps the thread
                log.exception("control: a worker task failed")
            with self._lock:
                self._idle += 1

    def close(self, timeout: float) -> bool:
        """Stop every thread once its task is done; True if all stopped within ``timeout``."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)


__all__ = ["WorkerPool"]
