"""The page server's public names, where callers have always imported them from.

The page server itself lives in :mod:`pagefork.serving`: :class:`PageServer` in
:mod:`pagefork.serving.pageserver`, its settings in :mod:`pagefork.serving.config`, its
sockets in :mod:`pagefork.serving.sockets`.
"""

from __future__ import annotations

from pagefork.serving.config import MAX_HANDSHAKE_TIMEOUT, FailurePolicy, ServerConfig
from pagefork.serving.pageserver import PageServer
from pagefork.serving.sockets import bind_private_socket, validate_fork_id

__all__ = [
    "MAX_HANDSHAKE_TIMEOUT",
    "FailurePolicy",
    "PageServer",
    "ServerConfig",
    "bind_private_socket",
    "validate_fork_id",
]
