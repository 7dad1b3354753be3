"""The fork manager's settings, and a template's prefetch policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, cast

from pagefork.errors import PageforkError
from pagefork.store.lazy import StoreOptions

PrefetchPolicyName = Literal["before-resume", "stream"]
PREFETCH_POLICIES: tuple[PrefetchPolicyName, ...] = ("before-resume", "stream")
#: The largest head a stream policy takes, in pages (256 GiB of 4 KiB pages): beyond it a
#: number is a mistake, not a guest.
MAX_PREFETCH_HEAD = 1 << 26


class PrefetchPolicyError(PageforkError):
    """A prefetch policy is invalid; the message names the field (the API answers 400)."""


@dataclass(frozen=True)
class PrefetchPolicy:
    """How a fork's hot set is installed around its VMM's resume.

    ``before-resume`` installs the whole hot set, then the VMM resumes. ``stream`` installs
    the first ``head`` hot pages (in first-touch order), resumes the VMM at once, and streams
    the rest while the guest runs; the guest's own faults are served ahead of the stream. A
    head as large as the hot set is a ``before-resume``.

    ``before-resume`` is the default: measured on the built-in microVM (fork_ready benchmark,
    256 MiB), a fork prefetched before resume is ready in 1.05x (first fork) and 1.09x (later
    forks) the time of a fork with every page present, and one that streams in 1.22x: the
    guest's first steps then race the stream for the pages it needs.
    """

    policy: PrefetchPolicyName = "before-resume"
    #: With ``stream``: hot pages installed before resume (None with ``before-resume``).
    head: int | None = None

    def __post_init__(self) -> None:
        if self.policy not in PREFETCH_POLICIES:
            raise PrefetchPolicyError(
                f"field 'prefetch_policy': unknown policy {self.policy!r} "
                f"(known: {', '.join(PREFETCH_POLICIES)})"
            )
        if self.policy == "stream" and self.head is None:
            raise PrefetchPolicyError(
                "field 'prefetch_head' is required with prefetch_policy 'stream' "
                "(the hot pages installed before resume)"
            )
        if self.policy != "stream" and self.head is not None:
            raise PrefetchPolicyError(
                f"field 'prefetch_head': only prefetch_policy 'stream' takes a head, "
                f"not {self.policy!r}"
            )
        if self.head is not None and (
            isinstance(self.head, bool)
            or not isinstance(self.head, int)
            or not 0 <= self.head <= MAX_PREFETCH_HEAD
        ):
            raise PrefetchPolicyError(
                f"field 'prefetch_head' must be a whole number of pages within "
                f"[0, {MAX_PREFETCH_HEAD}], not {self.head!r}"
            )

    @classmethod
    def parse(cls, policy: object, head: object) -> PrefetchPolicy:
        """The policy that the fields ``prefetch_policy`` and ``prefetch_head`` name (None:
        absent); :class:`PrefetchPolicyError` naming the field if they are invalid."""
        if policy is None and head is not None:
            raise PrefetchPolicyError(
                "field 'prefetch_head' needs prefetch_policy 'stream' beside it"
            )
        if policy is not None and not isinstance(policy, str):
            raise PrefetchPolicyError(
                f"field 'prefetch_policy' must be a string, not {type(policy).__name__}"
            )
        name = "before-resume" if policy is None else policy
        return cls(cast(PrefetchPolicyName, name), cast(int | None, head))


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
    #: The prefetch policy of a template that names none (see :class:`PrefetchPolicy`).
    prefetch_policy: PrefetchPolicy = field(default_factory=PrefetchPolicy)
