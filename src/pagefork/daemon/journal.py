"""Which fork sockets the daemon created, so that a restart removes exactly those."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from pathlib import Path

from pagefork.errors import PageforkError

log = logging.getLogger("pagefork")


class SocketJournal:
    """The fork sockets this daemon created, so that a restart removes exactly those.

    A socket directory may be shared with other programs (``daemon --socket-dir``), so "every
    ``*.sock`` in it" is not ours to delete. Each socket the daemon binds gets one small entry
    under ``directory``: the socket's device, inode, change time and path. :meth:`clean` removes
    a socket only if it is still that very file (a freed inode number is soon reused: the change
    time tells the new file apart). Writing an entry is best effort (a full disk): a socket
    without one is merely left behind, and replaced when a fork of the same id binds again.

    Whoever can write the journal could make the daemon remove any socket it can name, so the
    directory must be the daemon's own: a real directory (not a symlink), owned by this user,
    writable by nobody else. Anything else is refused at start.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(self.directory)
        except OSError as exc:
            raise PageforkError(f"cannot create {self.directory}: {exc.strerror}") from None
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_uid != os.geteuid()
            or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        ):
            raise PageforkError(
                f"{self.directory} is not a private directory of this user (a symlink, another "
                "owner, or writable by others): refusing to trust its socket entries"
            )

    def add(self, fork_id: str, socket_path: str) -> None:
        """Note the socket of fork ``fork_id`` (just bound by the daemon)."""
        entry = self.directory / fork_id
        try:
            st = os.lstat(socket_path)
            identity = f"{st.st_dev} {st.st_ino} {st.st_ctime_ns}"
            line = f"{identity} {os.path.abspath(socket_path)}\n".encode()
            fd = os.open(
                entry, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                if os.write(fd, line) != len(line):
                    raise OSError(0, "short write")
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning(
                "fork %s: cannot note its socket for cleanup after a crash: %s",
                fork_id,
                exc.strerror or exc,
            )
            with contextlib.suppress(OSError):
                os.unlink(entry)

    def remove(self, fork_id: str) -> None:
        """Forget fork ``fork_id``'s socket (it has been removed)."""
        with contextlib.suppress(OSError):
            os.unlink(self.directory / fork_id)

    def clean(self) -> list[str]:
        """Remove the sockets a previous run left (still the inodes it bound); forget every
        entry. Only for the daemon that owns the state directory. Returns the paths removed."""
        removed: list[str] = []
        for entry in sorted(self.directory.iterdir()):
            try:
                st = os.lstat(entry)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                    continue  # not an entry we wrote
                dev, ino, ctime, path = entry.read_bytes().decode().rstrip("\n").split(" ", 3)
                st = os.lstat(path)
                identity = (st.st_dev, st.st_ino, st.st_ctime_ns)
                if stat.S_ISSOCK(st.st_mode) and identity == (int(dev), int(ino), int(ctime)):
                    os.unlink(path)
                    removed.append(path)
            except (OSError, ValueError):
                pass  # gone already, replaced by something else, or a torn entry: leave it
            with contextlib.suppress(OSError):
                os.unlink(entry)
        if removed:
            log.info("daemon: removed %d fork sockets of a previous run", len(removed))
        return removed


class ForkJournal:
    """The daemon's record of each fork it created, so that a daemon restarted after a crash
    knows again the forks it adopts from the dead one's workers (pagefork.takeover.orphan).

    One small JSON file per fork under ``directory`` (written to a temporary name, then
    renamed: a reader never sees half of one), removed when the fork is released. Only the
    daemon's own fields are kept (template, socket, role, driver, creation time); the live
    state (uffd, ledger, VMM) comes back from the workers. The directory must be private, as
    for :class:`SocketJournal`.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        SocketJournal(directory)  # the same checks: created 0700, ours, writable by us only
        self.directory = Path(directory)

    def write(self, fork_id: str, record: dict[str, object]) -> None:
        """Note (or update) fork ``fork_id``'s record; best effort (a full disk is logged)."""
        tmp = self.directory / f".{fork_id}.tmp"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                data = json.dumps(record).encode()
                if os.write(fd, data) != len(data):
                    raise OSError(0, "short write")
            finally:
                os.close(fd)
            os.rename(tmp, self.directory / f"{fork_id}.json")
        except OSError as exc:
            log.warning(
                "fork %s: cannot note it for a restart after a crash: %s",
                fork_id,
                exc.strerror or exc,
            )
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def remove(self, fork_id: str) -> None:
        """Forget fork ``fork_id`` (released)."""
        with contextlib.suppress(OSError):
            os.unlink(self.directory / f"{fork_id}.json")

    def load(self) -> dict[str, dict[str, object]]:
        """Every record, by fork id (torn or foreign files are skipped)."""
        found: dict[str, dict[str, object]] = {}
        for entry in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(entry.read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("fork") == entry.name[: -len(".json")]:
                found[entry.name[: -len(".json")]] = record
        return found

    def keep_only(self, fork_ids: set[str]) -> None:
        """Drop every record but those of ``fork_ids`` (the forks a restart adopted)."""
        for entry in self.directory.iterdir():
            name = entry.name
            if name.endswith(".json") and name[: -len(".json")] in fork_ids:
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry)


__all__ = ["ForkJournal", "SocketJournal"]
