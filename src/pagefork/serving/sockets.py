"""The page server's Unix sockets: fork ids as file names, private listening sockets, the
peer's pidfd, the lock that makes one process the owner of a socket path, removing only the
socket files this process made, and room in the fd table for the fds sockets bring."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import select
import socket
import stat

from pagefork.errors import ForkError

_FORK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


#: The fd slots a page server makes room for at start (:func:`reserve_fd_slots`): a fork holds
#: four (uffd, VMM connection, pidfd, ledger), so about 250 forks' worth; 8 KiB of table.
FD_SLOTS_AT_START = 1024


def reserve_fd_slots(count: int) -> None:
    """Grow this process's fd table now, so that ``count`` more fds fit without growing it.

    Linux grows a process's fd table when an fd lands past its end, and in a process of more
    than one thread each growth first waits for an RCU grace period (``expand_files``): tens of
    ms on a busy host, and the thread that receives the fds waits it out. A takeover's state
    (four fds per fork, in one ``recvmsg``) or a burst of handshakes would pay that while forks
    wait for their pages; grown ahead, the table never shrinks. Bounded by ``RLIMIT_NOFILE``;
    a failure only leaves the growth for later.
    """
    with contextlib.suppress(OSError, ValueError):
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            top = max(int(name) for name in os.listdir(probe)) + count
            if soft != resource.RLIM_INFINITY:
                top = min(top, soft - 1)
            # The lowest free fd from ``top`` on: never one in use, and the table holds it.
            os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, top))
        finally:
            os.close(probe)


def validate_fork_id(fork_id: str) -> str:
    """Return ``fork_id`` if it is safe as a file name (no separators, no traversal)."""
    if not isinstance(fork_id, str) or not _FORK_ID.fullmatch(fork_id):
        raise ForkError(
            f"invalid fork id {fork_id!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return fork_id


def has_pending(listener: socket.socket | None) -> bool:
    """True when a connection waits in ``listener``'s backlog."""
    if listener is None:
        return False
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def peer_pidfd(conn: socket.socket, pid: int | None) -> int:
    """A pidfd of the process at the other end of ``conn``, or -1.

    The VMM's exit ends its fork (not its socket's EOF), and the failure policy kills it only
    through this pidfd, so it must name the very process that connected: SO_PEERPIDFD (Linux
    6.5+) takes it from the socket; older kernels open it from the SO_PEERCRED pid at once.
    A peer in this very process is never watched that way: its socket's EOF ends the fork.
    """
    if pid is None or pid == os.getpid():
        return -1
    try:
        return int(conn.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD))
    except OSError:
        pass
    try:
        return os.pidfd_open(pid)
    except OSError:
        return -1  # gone already, or not visible here: the socket's EOF ends the fork


def bind_private_socket(path: str) -> socket.socket:
    """Create a listening Unix socket at ``path`` with mode 0600, without a umask race.

    The socket is bound in a fresh 0700 directory, chmod-ed, then renamed into place, so it is
    never reachable by others with looser permissions. A stale socket at ``path`` is replaced;
    one a live server still listens on is refused.
    """
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ForkError(f"socket path too long ({len(path)} > {_MAX_SOCKET_PATH} bytes): {path}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ForkError(f"socket directory {parent} does not exist")
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise ForkError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise ForkError(f"{path} is in use by a live server")
        finally:
            probe.close()
    # Made here, not with tempfile: every worker binds one of these (see takeover.orphan), and
    # tempfile's imports would add to each worker's start-up.
    tmpdir = os.path.join(parent, f".pagefork-{os.getpid()}-{os.urandom(8).hex()}")
    try:
        os.mkdir(tmpdir, 0o700)
    except OSError as exc:
        raise ForkError(f"cannot create a socket in {parent}: {exc.strerror}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    dirfd = -1
    try:
        tmp = os.path.join(tmpdir, "s")
        # Bound through the directory's fd: the temporary path may be longer than sun_path
        # allows even when the final one fits.
        dirfd = os.open(tmpdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        sock.bind(f"/proc/self/fd/{dirfd}/s")
        os.chmod(tmp, 0o600)
        os.rename(tmp, path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ForkError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        if dirfd >= 0:
            os.close(dirfd)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(tmpdir, "s"))  # bound but not renamed: a failed step
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock


class SocketFiles:
    """The socket files this server made (by inode), so it removes only its own: another
    server may have put its socket at the same path since ours was removed by hand."""

    def __init__(self) -> None:
        self._bound: dict[str, tuple[int, int]] = {}

    def note(self, path: str) -> None:
        """Remember which file the socket we bound at ``path`` is."""
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            self._bound[path] = (st.st_dev, st.st_ino)

    def unlink(self, path: str) -> None:
        """Remove ``path`` only if it is still the socket we bound there."""
        ident = self._bound.pop(path, None)
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            if ident == (st.st_dev, st.st_ino) and stat.S_ISSOCK(st.st_mode):
                os.unlink(path)

    def forget_all(self) -> None:
        """Another process owns every socket file now (a takeover): remove none of them."""
        self._bound.clear()


def lock_path(socket_path: str) -> str:
    """The lock file beside ``socket_path`` whose holder owns it (``SOCKET.lock``)."""
    return socket_path + ".lock"


class SocketLock:
    """An exclusive ``flock`` on ``SOCKET.lock``: only its holder binds ``SOCKET`` or adopts the
    forks a supervisor killed there left behind.

    Two supervisors started at once on one socket would otherwise both take the other's
    workers for orphans, or both try to bind. The lock belongs to the open file, so it dies
    with its holder (a SIGKILLed supervisor never blocks its restart), and it can be handed to
    a successor as an fd. The file is created 0600 by this class, never through a symbolic
    link, and holds the holder's pid for the error a second one prints. A holder that stops
    removes it while it still holds it; one that locked a file removed meanwhile tries again.
    """

    def __init__(self, socket_path: str, fd: int = -1) -> None:
        self.socket_path = socket_path
        self.path = lock_path(socket_path)
        #: The locked file (-1 once released); ``fd`` is one a predecessor handed over.
        self.fd = fd if fd >= 0 else self._take()
        if fd >= 0:
            self._note_pid()

    def _take(self) -> int:
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise ForkError(f"socket directory {parent} does not exist")
        while True:
            try:
                fd = os.open(
                    self.path,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise ForkError(
                        f"{self.path} is a symbolic link: refusing to lock {self.socket_path} "
                        "through it"
                    ) from None
                raise ForkError(f"cannot open {self.path}: {exc.strerror or exc}") from None
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                os.close(fd)
                raise ForkError(
                    f"{self.path} is not a regular file of this user: refusing to lock "
                    f"{self.socket_path} with it"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ForkError(
                        f"{self.socket_path} is in use by pid {holder or '?'} (it holds "
                        f"{self.path})"
                    ) from None
                raise ForkError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                now = os.lstat(self.path)
            except OSError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                self.fd = fd
                self._note_pid()
                return fd
            os.close(fd)  # its holder removed it as it stopped: lock the one there now

    def _note_pid(self) -> None:
        with contextlib.suppress(OSError):  # only for the message a second one prints
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self, *, remove: bool = True) -> None:
        """Let go of the lock; ``remove`` (an orderly stop): remove the file too, while it is
        still locked and still the one locked. A handed-over lock is released without."""
        if self.fd < 0:
            return
        if remove:
            with contextlib.suppress(OSError):
                st, now = os.fstat(self.fd), os.lstat(self.path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
