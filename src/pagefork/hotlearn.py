"""Hot sets that learn: what prefetched forks still faulted feeds back into the hot set.

A prefetched fork faults only on the pages its hot set lacks (its *misses*). When several
recent forks missed the same page, later forks will likely want it too, so it joins the set;
a page that no recent recording fork touched may leave it. The rules, all in
:class:`HotSetLearner` (pure data: pages in, a new set and a history entry out):

- **join**: a page joins when at least ``join`` of the last ``window`` prefetched forks missed
  it (k of n). One fork alone never adds a page (``join`` >= 2).
- **growth is bounded**: the set never grows beyond ``(1 + max_growth)`` times its size when
  it was recorded, and one fork's misses count only up to ``per_fork`` times that size (its
  first ones, in first-touch order): a long-lived or unusual fork that faults on half of
  memory cannot inflate the set, however many of its pages other forks share.
- **leave**: a fork that records everything it touches (a warm-up or re-record) shows what is
  not used any more; a page none of the last ``window`` such forks touched leaves.

Every change is a :class:`Generation` in the set's history, kept beside its hot-page file
(``<file>.history.json``, see :func:`save_history`) and shown by ``pagefork hotpages history``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from pagefork.errors import HotPageFileError
from pagefork.files import atomic_save, read_regular
from pagefork.hotpages import HotPageList

#: How many generations a history keeps (the newest).
HISTORY_LIMIT = 200
_HISTORY_MAX_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class LearnPolicy:
    """How a hot set learns; see the module's rules."""

    window: int = 8
    join: int = 3
    max_growth: float = 0.10
    per_fork: float = 0.05

    def __post_init__(self) -> None:
        if not 2 <= self.join <= self.window:
            raise ValueError(f"join must be between 2 and window ({self.window}), not {self.join}")
        for name in ("max_growth", "per_fork"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite share >= 0, not {value}")


@dataclass(frozen=True, slots=True)
class Generation:
    """One change of a learning hot set: after ``forks`` observed forks it holds ``size``
    pages, ``joined`` and ``left`` of them changed now; ``at`` is Unix time."""

    generation: int
    forks: int
    size: int
    joined: int
    left: int
    at: float


@dataclass
class _Counts:
    missed: collections.deque[frozenset[tuple[int, int]]] = field(default_factory=collections.deque)
    touched: collections.deque[frozenset[tuple[int, int]]] = field(
        default_factory=collections.deque
    )


class HotSetLearner:
    """One template's learning hot set; safe from any thread.

    ``hot`` is the set to start from; ``base`` the size it had when it was recorded (the
    growth bound is taken from it; default: ``hot``'s size), so that a set that already
    learned, reloaded, does not grow its bound too.
    """

    def __init__(
        self,
        hot: HotPageList,
        policy: LearnPolicy | None = None,
        history: Iterable[Generation] = (),
        *,
        base: int | None = None,
    ) -> None:
        self.policy = policy or LearnPolicy()
        self._lock = threading.Lock()
        self._hot = hot
        self._base = len(hot) if base is None else base
        self._counts = _Counts()
        self._forks = 0
        self._history: list[Generation] = list(history)[-HISTORY_LIMIT:]

    @property
    def hot(self) -> HotPageList:
        """The current hot set (a new object after each change: forks in flight keep theirs)."""
        return self._hot

    @property
    def base(self) -> int:
        """The size of the set when it was recorded."""
        return self._base

    @property
    def limit(self) -> int:
        """The most pages the set may hold."""
        return math.floor(self._base * (1 + self.policy.max_growth))

    def history(self) -> list[Generation]:
        """The set's changes, oldest first."""
        with self._lock:
            return list(self._history)

    def observe(
        self,
        missed: Iterable[tuple[int, int]] = (),
        touched: Iterable[tuple[int, int]] | None = None,
    ) -> Generation | None:
        """Feed one ended fork: the pages it ``missed`` (faulted although prefetched), or
        when it recorded everything, the pages it ``touched``. Returns the new generation when
        the set changed, else None."""
        p = self.policy
        per_fork = max(1, math.floor(self._base * p.per_fork))
        with self._lock:
            self._forks += 1
            hot = self._hot
            joined: list[tuple[int, int]] = []
            gone: set[tuple[int, int]] = set()
            if touched is not None:
                seen = frozenset((r, o) for r, o in touched)
                self._counts.touched.append(seen)
                while len(self._counts.touched) > p.window:
                    self._counts.touched.popleft()
                if len(self._counts.touched) == p.window:
                    used = frozenset().union(*self._counts.touched)
                    gone = {page for page in hot.in_order() if page not in used}
            else:
                mine: list[tuple[int, int]] = []
                for r, o in missed:
                    if (r, o) not in hot:
                        mine.append((r, o))
                        if len(mine) >= per_fork:
                            break  # an unusual fork counts only this far
                this = frozenset(mine)
                self._counts.missed.append(this)
                while len(self._counts.missed) > p.window:
                    self._counts.missed.popleft()
                room = self.limit - len(hot)
                for page in mine:
                    if room <= 0:
                        break
                    if sum(page in s for s in self._counts.missed) >= p.join:
                        joined.append(page)
                        room -= 1
            if not joined and not gone:
                return None
            kept = [page for page in hot.in_order() if page not in gone]
            self._hot = HotPageList.from_pages([*kept, *joined])
            gen = Generation(
                generation=(self._history[-1].generation + 1) if self._history else 1,
                forks=self._forks,
                size=len(self._hot),
                joined=len(joined),
                left=len(gone),
                at=time.time(),
            )
            self._history.append(gen)
            del self._history[:-HISTORY_LIMIT]
            return gen


# --- the history file ------------------------------------------------------------------------


def history_path(hot_path: str | os.PathLike[str]) -> str:
    """Where the history of the hot set in ``hot_path`` is kept."""
    return os.fspath(hot_path) + ".history.json"


@dataclass(frozen=True, slots=True)
class History:
    """What is kept beside a learning hot set: its policy, its recorded size, its changes."""

    policy: LearnPolicy
    base: int | None
    generations: list[Generation]


def save_history(
    hot_path: str | os.PathLike[str],
    policy: LearnPolicy,
    generations: Iterable[Generation],
    base: int | None = None,
) -> None:
    """Write the policy, the recorded size and the generations beside ``hot_path``
    (atomically); the set then learns wherever it is loaded with :func:`load_history`."""
    doc = {
        "policy": asdict(policy),
        "base": base,
        "generations": [asdict(g) for g in list(generations)[-HISTORY_LIMIT:]],
    }
    data = (json.dumps(doc, indent=1) + "\n").encode()
    atomic_save(history_path(hot_path), data, "hot-set history", error=HotPageFileError)


def load_history(hot_path: str | os.PathLike[str]) -> History | None:
    """The :class:`History` kept beside ``hot_path``; None when it has none (the set does not
    learn). A malformed file raises :class:`HotPageFileError` naming it."""
    path = history_path(hot_path)
    data = read_regular(
        path, "hot-set history", limit=_HISTORY_MAX_BYTES, error=HotPageFileError, missing_ok=True
    )
    if data is None:
        return None
    try:
        doc: Any = json.loads(data)
        policy = LearnPolicy(**doc["policy"])
        generations = [Generation(**g) for g in doc["generations"]]
        base = doc.get("base")
        if base is not None and (not isinstance(base, int) or base < 0):
            raise ValueError(f"base {base!r} is not a page count")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise HotPageFileError(f"{path}: not a hot-set history ({exc})") from None
    return History(policy, base, generations)


__all__ = [
    "HISTORY_LIMIT",
    "Generation",
    "History",
    "HotSetLearner",
    "LearnPolicy",
    "history_path",
    "load_history",
    "save_history",
]
