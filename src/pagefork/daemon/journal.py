"""Which fork sockets the daemon created, so that a restart removes exactly those."""

from __future__ import annotations

import contextlib
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


__all__ = ["SocketJournal"]
