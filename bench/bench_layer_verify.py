"""Layer page checksums: what checking every mapped page of a layer costs when a chain opens.

A layer file holds a CRC-32 per data page; a page server's view of a chain checks every layer
page it maps, once, when it opens the chain (the fault path checks nothing: workers map the
checked file). This measures that cost where it is largest for its size: one 256 MiB layer
whose every page is data, over a 256 MiB base, both in the page cache (a cold disk adds its
own read time to both variants alike). Rounds alternate opening the view with and without the
check, as a page server opens it (the base scanned for zero pages included); each figure is
the median of the rounds, and the ratio the median of per-round ratios.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

from _common import (
    PAGE,
    MiB,
    alternating,
    console,
    fmt,
    header,
    median,
    paired_ratio,
    scratch_dir,
    standalone,
    table,
)

from pagefork.layers.format import write_layer
from pagefork.layers.source import LayeredView

SIZE = 256 * MiB
PAGES = SIZE // PAGE

TARGETS = {"verify_ms_per_mib": ("<=", 2.0)}
SUMMARY = {
    "open_verified_ms": "opening a 256 MiB all-data layer over its base, pages checked (ms)",
    "open_unverified_ms": "the same without the check (ms)",
    "verify_ms_per_mib": "what the check adds per MiB of layer (ms)",
    "ratio_verified_over_not": "open time, checked / not checked",
}


def _open_ms(base: str, layer: str, verify: bool) -> float:
    t0 = time.perf_counter()
    with LayeredView(base, [layer], verify=verify) as view:
        seconds = time.perf_counter() - t0
        assert not view.materialized and len(view.segments) == 1
    return seconds * 1e3


def main(quick: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns its figures."""
    rounds = 3 if quick else 9
    header(
        "layer verification: opening a 256 MiB layer with and without page checksums",
        f"{SIZE // MiB} MiB layer, every page data, over a {SIZE // MiB} MiB base; "
        f"{rounds} rounds, variants interleaved, files in the page cache.",
    )
    figures: dict[str, Any] = {"rounds": rounds}
    with scratch_dir() as workdir:
        base = os.path.join(workdir, "base.mem")
        with open(base, "wb") as f:
            f.truncate(SIZE)  # a hole: read as zeros, no disk
        rng = random.Random(5)
        page = rng.randbytes(PAGE)
        layer = os.path.join(workdir, "all.pfl")
        write_layer(layer, size=SIZE, pages=((p, page) for p in range(PAGES)))
        _open_ms(base, layer, True)  # warm the page cache, untimed
        times: dict[bool, list[float]] = {True: [], False: []}
        for _, verify in alternating(rounds, (True, False)):
            times[verify].append(_open_ms(base, layer, verify))
    checked, unchecked = median(times[True]), median(times[False])
    per_round = [a - b for a, b in zip(times[True], times[False], strict=True)]
    extra = median(per_round)
    figures["open_verified_ms"] = checked
    figures["open_unverified_ms"] = unchecked
    figures["verify_ms"] = extra
    figures["verify_ms_per_mib"] = extra / (SIZE / MiB)
    figures["verify_us_per_page"] = extra * 1e3 / PAGES
    figures["ratio_verified_over_not"] = paired_ratio(times[True], times[False])
    figures["fault_path_checks"] = 0
    table(
        "opening the view (median of rounds)",
        ["variant", "open ms", "ms per MiB of layer"],
        [
            ["checked", fmt(checked, 1), fmt(checked / (SIZE / MiB), 3)],
            ["not checked", fmt(unchecked, 1), fmt(unchecked / (SIZE / MiB), 3)],
        ],
    )
    console.print(
        f"the check costs {fmt(extra, 1)} ms for {SIZE // MiB} MiB: "
        f"{fmt(figures['verify_ms_per_mib'], 3)} ms per MiB, "
        f"{fmt(figures['verify_us_per_page'], 2)} µs per page; "
        f"open time x{fmt(figures['ratio_verified_over_not'])}; nothing on the fault path"
    )
    return figures


if __name__ == "__main__":
    standalone(main)
