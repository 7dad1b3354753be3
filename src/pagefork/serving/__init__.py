"""Serving forks on every core: the fork state machine, the pure fault policy, the shared
per-fork ledger, the supervisor-worker channel, and the worker process's event loop.

:class:`pagefork.server.PageServer` is the supervisor that puts these together.
"""
