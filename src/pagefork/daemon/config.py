"""The fork manager's settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pagefork.store.lazy import StoreOptions


@dataclass(frozen=True)
class ManagerConfig:
    """Settings of a :class:`~pagefork.daemon.manager.ForkManager`.

    ``socket_dir`` holds every fork's uffd socket (keep it short: a socket path has at most
    107 bytes; the manager refuses a directory that leaves no room for a generated fork id,
    and warns when it leaves less than the longest one allowed). The recording window of a
    warm-up fork closes after ``record_max_seconds`` or ``record_max_share`` of the template's
    pages, whichever comes first.
    """

    socket_dir: str
    record_max_seconds: float = 30.0
    record_max_share: float = 0.25
    handshake_timeout: float = 10.0
    prefetch_timeout: float = 30.0
    restore_timeout: float = 30.0
    #: How long a fork waits for its template's page server, which another fork is starting
    #: (it scans the whole mem-file: about 1.2 s per GiB here).
    server_start_timeout: float = 120.0
    #: Worker processes of each template's page server (``"auto"``: one per usable CPU).
    workers: int | Literal["auto"] = "auto"
    #: A snapshot whose chain would be deeper than this many layers is flattened at once
    #: (None: only the chain's hard limit applies).
    max_layer_depth: int | None = None
    #: How long a snapshot may take, the VMM's pause and write included.
    snapshot_timeout: float = 60.0
    #: How templates in object storage are reached; one chunk cache for all of them (None:
    #: STATE_DIR/chunk-cache, bounded at 10 GiB).
    store: StoreOptions | None = None
