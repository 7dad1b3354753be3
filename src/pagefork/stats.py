"""Per-fork counters and fault-service latency, cheap enough to update on the fault path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

#: How many recent fault latencies a fork keeps (a ring: sample n sits at n % LATENCY_WINDOW).
LATENCY_WINDOW = 1 << 16


def percentiles_us(
    latencies_ns: Sequence[int], points: tuple[float, ...] = (50, 90, 99)
) -> dict[str, float]:
    """Percentiles (nearest rank) and max of fault latencies given in ns, in microseconds."""
    n = len(latencies_ns)
    if n == 0:
        return {}
    values = sorted(latencies_ns)
    # Nearest rank: the smallest value with at least p% of the samples at or below it.
    out = {f"p{p:g}": values[max(0, math.ceil(p / 100 * n) - 1)] / 1000 for p in points}
    out["max"] = values[-1] / 1000
    return out


@dataclass
class ForkStats:
    """A snapshot of one fork's counters.

    ``faults`` counts page-fault events served on demand; ``pages_copied`` and ``zero_pages``
    count pages installed by the fault loop; ``prefetched_pages`` those installed by prefetch;
    ``misses`` demand faults after a prefetch ran (the pages the hot set did not have).
    ``worker_pid`` is the worker process serving the fork now; ``moves`` how many times the
    fork moved to the worker on the CPU its VMM runs on (``ServerConfig.follow_vmms``).
    """

    fork: str
    state: str = "waiting"
    pid: int | None = None
    faults: int = 0
    pages_copied: int = 0
    zero_pages: int = 0
    already_present: int = 0
    removed_bytes: int = 0
    eagain_retries: int = 0
    errors: int = 0
    prefetched_pages: int = 0
    misses: int = 0
    latency_us: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker_pid: int | None = None
    moves: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The stats as plain JSON-ready data."""
        return asdict(self)
