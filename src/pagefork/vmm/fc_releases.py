"""Firecracker releases: what differs between 1.7 and 1.16 (and main) that pagefork relies on.

Pure data, shared by the driver (:mod:`pagefork.vmm.firecracker`) and the test double
(:mod:`pagefork.testing.fcdouble`), so both agree on every difference. Checked against
Firecracker's sources from v1.7.0 to v1.16 and main: the snapshot-load serde structs, the uffd
handshake, and the code that restores a snapshot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pagefork.errors import VmmError

_VERSION_RE = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?(-[0-9A-Za-z.-]+)?$")

#: The first release whose ``PUT /snapshot/load`` accepts each optional field (Firecracker's
#: ``LoadSnapshotConfig`` denies unknown fields, so an older release refuses a newer one).
#: ``clock_realtime`` and ``huge_pages`` follow other rules (see :meth:`accepts_load_field`).
LOAD_FIELD_SINCE: dict[str, tuple[int, int, int]] = {
    "snapshot_path": (1, 0, 0),
    "mem_file_path": (1, 0, 0),
    "mem_backend": (1, 0, 0),
    "enable_diff_snapshots": (1, 0, 0),
    "resume_vm": (1, 0, 0),
    "network_overrides": (1, 12, 0),
    "track_dirty_pages": (1, 13, 0),
    "vsock_override": (1, 16, 0),
}
#: The oldest release pagefork supports: the first whose handshake carries ``page_size_kib``.
OLDEST_SUPPORTED = (1, 7, 0)


@dataclass(frozen=True)
class FirecrackerVersion:
    """A Firecracker release (``1.10``, ``v1.14.4``, ``1.12.0-dev``) or ``main``.

    The differences pagefork depends on are properties here, so the driver and the test double
    agree on them: which load fields a release accepts, whether it keeps the uffd handler
    socket open, whether it writes guest memory while it loads a snapshot.
    """

    major: int
    minor: int
    patch: int = 0
    main: bool = False  # the unreleased main branch (a ``-dev`` build)

    @classmethod
    def parse(cls, text: str) -> FirecrackerVersion:
        """Parse a version as ``--fc-version`` or ``GET /``'s ``vmm_version`` gives it."""
        if text == "main":
            return cls(1, 99, 0, main=True)  # newer than every release
        m = _VERSION_RE.match(text.strip())
        if m is None:
            raise VmmError(f"{text!r} is not a Firecracker version (like 1.10 or 1.14.4)")
        major, minor, patch = int(m[1]), int(m[2]), int(m[3] or 0)
        return cls(major, minor, patch, main=(m[4] or "").startswith("-dev"))

    @property
    def key(self) -> tuple[int, int, int]:
        """``(major, minor, patch)``, for comparisons."""
        return (self.major, self.minor, self.patch)

    def __str__(self) -> str:
        return "main" if self.main and self.minor == 99 else ".".join(map(str, self.key))

    @property
    def supported(self) -> bool:
        """Whether pagefork supports this release (1.7 and later)."""
        return self.key >= OLDEST_SUPPORTED

    @property
    def keeps_uffd_socket(self) -> bool:
        """1.12+ keep the handler socket open; 1.7-1.11 close it after the handshake."""
        return self.key >= (1, 12, 0)

    @property
    def writes_memory_on_load(self) -> bool:
        """1.8+ (x86) write the new VMGenID into guest memory while loading a snapshot, so
        the page server must serve a fault before the load's answer comes."""
        return self.key >= (1, 8, 0)

    @property
    def handshake_version(self) -> str:
        """The ``major.minor`` whose mapping fields this release sends."""
        return f"{self.major}.{self.minor}"

    def accepts_load_field(self, name: str) -> bool:
        """Whether this release's ``PUT /snapshot/load`` accepts the field ``name``."""
        if name == "clock_realtime":  # 1.14.4+ within 1.14, 1.15.1+ after that
            return self.key >= (1, 15, 1) or (1, 14, 4) <= self.key < (1, 15, 0)
        if name == "huge_pages":
            return self.main  # on main only, not in any release yet
        since = LOAD_FIELD_SINCE.get(name)
        return since is not None and self.key >= since

    def load_fields(self) -> list[str]:
        """Every field this release's ``PUT /snapshot/load`` accepts."""
        names = [*LOAD_FIELD_SINCE, "clock_realtime", "huge_pages"]
        return [n for n in names if self.accepts_load_field(n)]
