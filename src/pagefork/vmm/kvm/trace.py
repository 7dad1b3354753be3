"""Access traces shaped like measured boots, and the zero/non-zero layout of data pages.

Pure functions of a seed, no I/O. The shape follows what published snapshot-restore studies
report (REAP, vHive, ASPLOS '21: working sets of 3-39% of guest memory, faulted pages in runs
of 2-3; E2B's sandboxes: forks of one snapshot share most of their working set). Each *variant*
(one per fork index, modulo the template's variant count) touches the common hot set in the
same first-touch order plus fork-specific runs spliced in at random places, so a prefetch is
judged on pages it never recorded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagefork.regions import PAGE_SIZE

#: Run lengths of a boot's faults and their weights: mean 2 pages, as REAP measured (2-3).
RUN_LENGTHS = (1, 2, 3)
RUN_WEIGHTS = (0.35, 0.30, 0.35)


@dataclass(frozen=True)
class TraceSpec:
    """What traces to generate.

    ``working_set`` is the common hot set's share of guest memory; ``fork_share`` the
    fork-specific pages as a share of the hot set; ``write_first_share`` the share of touched
    pages whose first touch is a write; ``rewrite_share`` the share of read pages written after.
    """

    working_set: float = 0.10
    fork_share: float = 0.05
    write_first_share: float = 0.10
    rewrite_share: float = 0.10
    seed: int = 1

    def __post_init__(self) -> None:
        for name in ("working_set", "fork_share", "write_first_share", "rewrite_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")


@dataclass(frozen=True)
class VariantTrace:
    """The pages one variant touches: ``reads`` then ``writes`` (guest-physical page
    addresses, first-touch order), and which of them are not in the common hot set."""

    reads: tuple[int, ...]
    writes: tuple[int, ...]
    specific: frozenset[int] = field(default_factory=frozenset)

    def pages(self) -> set[int]:
        """Every data page this variant touches."""
        return set(self.reads) | set(self.writes)


def _pick_runs(
    rng: random.Random, candidates: Sequence[int], taken: set[int], count: int
) -> list[list[int]]:
    """Runs of contiguous candidate pages, not in ``taken``, ``count`` pages in all."""
    runs: list[list[int]] = []
    got = 0
    attempts = 0
    limit = 50 * count + 1000
    while got < count:
        attempts += 1
        if attempts > limit:
            raise ValueError(f"cannot place {count} trace pages in {len(candidates)} data pages")
        length = min(rng.choices(RUN_LENGTHS, RUN_WEIGHTS)[0], count - got)
        i = rng.randrange(len(candidates))
        run = [candidates[i]]
        while len(run) < length and i + len(run) < len(candidates):
            nxt = candidates[i + len(run)]
            if nxt != run[-1] + PAGE_SIZE:
                break
            run.append(nxt)
        if any(p in taken for p in run):
            continue
        taken.update(run)
        runs.append(run)
        got += len(run)
    return runs


def generate_variants(
    data_pages: Sequence[int], total_pages: int, spec: TraceSpec, variants: int
) -> list[VariantTrace]:
    """``variants`` traces over ``data_pages`` (sorted guest-physical page addresses) of a
    guest with ``total_pages`` pages of RAM."""
    if variants < 1:
        raise ValueError("need at least one variant")
    rng = random.Random(spec.seed)
    n_common = max(1, round(spec.working_set * total_pages))
    n_specific = round(spec.fork_share * n_common)
    taken: set[int] = set()
    common = _pick_runs(rng, data_pages, taken, n_common)
    # Runs whose first touch is a write are chosen among the common ones by index.
    common_write_first = {i for i in range(len(common)) if rng.random() < spec.write_first_share}
    rewrite_seed = rng.getrandbits(64)
    out: list[VariantTrace] = []
    for v in range(variants):
        vrng = random.Random((spec.seed << 20) ^ (v + 1) * 0x9E3779B1)
        vtaken = set(taken)
        extra = _pick_runs(vrng, data_pages, vtaken, n_specific) if n_specific else []
        runs: list[tuple[list[int], bool]] = [
            (run, i in common_write_first) for i, run in enumerate(common)
        ]
        for run in extra:
            runs.insert(
                vrng.randrange(len(runs) + 1), (run, vrng.random() < spec.write_first_share)
            )
        reads = [p for run, wf in runs if not wf for p in run]
        write_first = [p for run, wf in runs if wf for p in run]
        # A page is rewritten or not by a hash of its address, so common pages agree in
        # every variant.
        cut = int(spec.rewrite_share * 0x10000)
        rewrites = [p for p in reads if _page_hash(p, rewrite_seed) < cut]
        specific = frozenset(p for run in extra for p in run)
        out.append(VariantTrace(tuple(reads), tuple(write_first + rewrites), specific))
    return out


def _page_hash(page: int, seed: int) -> int:
    """A 16-bit hash of a page address (Fibonacci hashing), stable across variants."""
    return (((page >> 12) ^ seed) * 0x9E3779B97F4A7C15 >> 40) & 0xFFFF


def zero_page_layout(rng: random.Random, npages: int, zero_share: float) -> bytearray:
    """One byte per data page, 1 where the page stays all zero: zero and non-zero pages come
    in runs (mean 8 zero pages), as free memory and bss do in a real guest."""
    zeros = bytearray(npages)
    if zero_share <= 0:
        return zeros
    mean_zero = 8.0
    mean_data = mean_zero * (1 - zero_share) / zero_share if zero_share < 1 else 0.0
    i = 0
    is_zero = rng.random() < zero_share
    while i < npages:
        mean = mean_zero if is_zero else mean_data
        length = max(1, round(rng.expovariate(1 / mean))) if mean > 0 else npages
        if is_zero:
            zeros[i : i + length] = b"\x01" * len(zeros[i : i + length])
        i += length
        is_zero = not is_zero
    return zeros


def split_slices(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``[lo, hi)`` slices covering ``range(count)`` (one per vCPU)."""
    return [(count * k // parts, count * (k + 1) // parts) for k in range(parts)]
