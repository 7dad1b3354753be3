"""Serving forks on every core: the page server, split by what each part is responsible for.

Supervisor side (one process, :class:`pagefork.server.PageServer`):

- :mod:`~pagefork.serving.pageserver`: the public API, which wires the parts below together;
- :mod:`~pagefork.serving.supervisor`: the thin epoll loop and the worker side of forks;
- :mod:`~pagefork.serving.forks`: the fork table, moved only by the lifecycle tables of
  :mod:`~pagefork.serving.state`, answering each event with commands;
- :mod:`~pagefork.serving.handshakes`: listening sockets and the Firecracker handshake reader;
- :mod:`~pagefork.serving.prefetching`: prefetch plans and requests, lazy chunk fetches;
- :mod:`~pagefork.serving.pool`: the worker processes, their heartbeat and replacement;
- :mod:`~pagefork.serving.handover`: a live takeover's export and adopt.

Between the two: :mod:`~pagefork.serving.messages` (every message, typed and versioned) over
:mod:`~pagefork.serving.ipc`, and each fork's shared :mod:`~pagefork.serving.ledger`.

Worker side (one process per core): :mod:`~pagefork.serving.worker` (the fault loop),
:mod:`~pagefork.serving.workerforks` (its fork table) and :mod:`~pagefork.serving.policy`
(the pure decision per fault).
"""
