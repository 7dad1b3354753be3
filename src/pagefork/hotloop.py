"""The warm-up-then-prefetch policy of one template, written once for every caller.

``pagefork serve``, the daemon's fork manager and the library all decide the same things for
each new fork of a template, and :class:`HotSetLoop` is where that decision lives:

- the first fork while the template has no hot set, or after a re-record was asked for, is the
  *warm-up*: it records the pages it faults, in a bounded window;
- a fork that arrives while the warm-up still records, before any hot set exists, is served on
  *demand* (two recordings would race for one hot set);
- every other fork is *prefetched* from the hot set (during a re-record, the old one).

When the warm-up's window closes, its pages become the hot set (an empty recording changes
nothing). With a :class:`~pagefork.hotlearn.LearnPolicy` the set also learns: prefetched forks
record what they still fault, and :meth:`HotSetLoop.fork_missed` feeds it to the template's
:class:`~pagefork.hotlearn.HotSetLearner`. A warm-up that ends without a window (its VMM never
connected) lets the next fork record instead. Saving the set is the caller's:
:meth:`HotSetLoop.claim` says whether a closed window is the one to save,
:meth:`HotSetLoop.adopt` installs what was saved.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

from pagefork.errors import HotPageFileError
from pagefork.hotlearn import Generation, HotSetLearner, LearnPolicy, load_history, save_history
from pagefork.hotpages import HotPageList

log = logging.getLogger(__name__)

#: A fork's part in the loop.
Role = Literal["warmup", "prefetch", "demand"]


class HotSetLoop:
    """One template's hot-page loop; safe from any thread.

    ``hot`` is the hot set to start from (None: none yet). With ``record`` False no fork ever
    records (prefetch from ``hot`` only). With ``record_every`` every fork records, for lists
    that are combined later, and none is prefetched: a prefetched page would never fault, so
    it would be missing from its fork's recording.
    """

    def __init__(
        self,
        hot: HotPageList | None = None,
        *,
        record: bool = True,
        record_every: bool = False,
        learn: LearnPolicy | None = None,
        history: list[Generation] | None = None,
        base: int | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._hot = hot if hot is not None and len(hot) else None
        self._learn = learn
        self._learner: HotSetLearner | None = None
        if learn is not None and self._hot is not None:
            self._learner = HotSetLearner(self._hot, learn, history or (), base=base)
        self._record = record
        self._record_every = record_every
        self._rerecord = False
        self._warmup: str | None = None
        self._roles: dict[str, Role] = {}

    @property
    def hot(self) -> HotPageList | None:
        """The hot set forks are prefetched from, or None."""
        return self._hot

    @classmethod
    def for_file(cls, hot: HotPageList | None, hot_path: str) -> HotSetLoop:
        """The loop of a template whose hot set is kept in ``hot_path``: it learns when a
        history beside the file says so (``pagefork hotpages learn``). An unreadable history
        is logged and the set does not learn."""
        try:
            history = load_history(hot_path)
        except HotPageFileError as exc:
            log.warning("%s; the hot set will not learn", exc)
            history = None
        if history is None:
            return cls(hot)
        return cls(hot, learn=history.policy, history=history.generations, base=history.base)

    def learn_and_save(self, fork_id: str, missed: HotPageList, hot_path: str) -> bool:
        """:meth:`fork_missed`, then save a changed set to ``hot_path`` (HPL2: first-touch
        order) and its history beside it. True when the set changed."""
        gen = self.fork_missed(fork_id, missed)
        learner = self._learner
        if gen is None or learner is None:
            return False
        learner.hot.save(hot_path, "hpl2")
        save_history(hot_path, learner.policy, learner.history(), learner.base)
        log.info(
            "%s: hot set generation %d: %d pages (+%d -%d)",
            hot_path,
            gen.generation,
            gen.size,
            gen.joined,
            gen.left,
        )
        return True

    @property
    def learner(self) -> HotSetLearner | None:
        """The learner of the current hot set, when the loop learns and has a set."""
        return self._learner

    def records(self, role: Role) -> bool:
        """Whether a fork of ``role`` records the pages it faults: a warm-up always, a
        prefetched fork when the set learns (its faults are its misses)."""
        return role == "warmup" or (role == "prefetch" and self._learn is not None)

    def fork_missed(self, fork_id: str, missed: HotPageList) -> Generation | None:
        """A prefetched fork ended having faulted ``missed``: learn from it. Returns the new
        generation when the hot set changed (the caller saves :attr:`hot`)."""
        with self._lock:
            learner = self._learner
            if learner is None or self._roles.get(fork_id) != "prefetch":
                return None
        gen = learner.observe(missed=missed.in_order())
        if gen is not None:
            with self._lock:
                if self._learner is learner:  # not replaced by a new recording meanwhile
                    self._hot = learner.hot
        return gen

    def role(self, fork_id: str) -> Role:
        """Decide (once) the part of a new fork; later calls return the same answer."""
        with self._lock:
            known = self._roles.get(fork_id)
            if known is not None:
                return known
            role: Role
            if self._record and self._record_every:
                role = "warmup"
            elif self._record and (self._hot is None or self._rerecord) and self._warmup is None:
                role = "warmup"
                self._warmup = fork_id
            else:
                role = "prefetch" if self._hot is not None else "demand"
            self._roles[fork_id] = role
            return role

    def claim(self, fork_id: str) -> bool:
        """True when ``fork_id``'s closed window is the one whose pages become the hot set
        (its own warm-up, not yet adopted). The caller then saves them and calls :meth:`adopt`.
        """
        with self._lock:
            if self._record_every:
                return self._roles.get(fork_id) == "warmup"
            return self._warmup == fork_id

    def adopt(self, fork_id: str, hot: HotPageList | None) -> None:
        """The warm-up ``fork_id`` is over: ``hot`` (None or empty: nothing usable, e.g. the
        save failed) becomes the hot set, and the next warm-up may start."""
        with self._lock:
            if hot is not None and len(hot) and not self._record_every:
                self._hot = hot
                self._rerecord = False
                if self._learn is not None:  # a new recording: a new base, counts from zero
                    history = self._learner.history() if self._learner is not None else []
                    self._learner = HotSetLearner(hot, self._learn, history)
            if self._warmup == fork_id:
                self._warmup = None

    def fork_gone(self, fork_id: str) -> None:
        """The fork ended. A warm-up that never recorded a window lets the next fork record."""
        with self._lock:
            self._roles.pop(fork_id, None)
            if self._warmup == fork_id:
                self._warmup = None

    def rerecord(self) -> None:
        """Make the next fork a warm-up again; the current hot set serves until it is done."""
        with self._lock:
            self._rerecord = True

    def misfit(self) -> None:
        """The hot set does not fit the template's forks any more: stop using it, record anew."""
        with self._lock:
            self._hot = None
            self._learner = None
            self._rerecord = True

    def snapshot(self) -> dict[str, Any]:
        """Where the loop stands, as JSON (a takeover hands it to the new process)."""
        with self._lock:
            hot = self._hot.in_order() if self._hot is not None else None
            return {
                "hot": [[p[0], p[1]] for p in hot] if hot is not None else None,
                "rerecord": self._rerecord,
                "warmup": self._warmup,
                "roles": dict(self._roles),
            }

    def restore(self, snap: dict[str, Any]) -> None:
        """Continue from :meth:`snapshot` of another process's loop."""
        hot = snap.get("hot")
        with self._lock:
            if hot is not None:
                pages = HotPageList.from_pages([(int(r), int(o)) for r, o in hot])
                self._hot = pages if len(pages) else None
                if self._learn is not None and self._hot is not None:
                    history = self._learner.history() if self._learner is not None else []
                    self._learner = HotSetLearner(self._hot, self._learn, history)
            self._rerecord = bool(snap.get("rerecord"))
            self._warmup = snap.get("warmup")
            self._roles = {str(k): v for k, v in dict(snap.get("roles") or {}).items()}
