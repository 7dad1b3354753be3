"""A small Python client for the daemon's control socket.

Every method is one HTTP request; a non-2xx answer raises :class:`DaemonError` carrying the
status and the daemon's message, and so does a daemon that cannot be reached. Ids are
percent-encoded into their path segment (``a?b`` is the id ``a?b``, never a query), and an
empty id is refused before anything is sent.

When a burst of clients fills the control socket's listen backlog, ``connect`` waits in the
kernel (``SO_SNDTIMEO``) until the daemon accepts, within the request's timeout, instead of
failing with EAGAIN; an early EAGAIN is retried with a short backoff. A client may be shared
by threads: each request has a connection of its own.

A daemon that is starting has no control socket yet, or one that is bound but not yet
listening. A request then waits for it, up to ``start_wait`` seconds (5 by default), so
``pagefork daemon &`` followed at once by a verb works; after that it fails naming the socket
and how long it waited. Nothing has been sent before the connect succeeds, so this wait never
repeats a request. ::

    client = DaemonClient("/run/pagefork.sock")
    fork = client.create_fork("web", vmm="firecracker", options={"api_socket": "..."})
    client.release_fork(fork["fork"])
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import socket
import stat
import struct
import time
from typing import Any
from urllib.parse import quote

from pagefork.errors import DaemonError

#: Longest request timeout (a day): SO_SNDTIMEO takes a finite time.
_MAX_TIMEOUT = 86400.0
# Backoff between connects that the kernel ended early with EAGAIN (normally it waits).
_RETRY_FIRST = 0.001
_RETRY_MAX = 0.05
#: How long a request waits by default for a daemon that is starting (see the module's doc).
START_WAIT = 5.0
# Polling interval bounds while that socket is absent or refuses (no event tells us it appears).
_START_POLL_FIRST = 0.01
_START_POLL_MAX = 0.1

log = logging.getLogger(__name__)


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A stream socket connected to ``path`` (the socket then times out after ``timeout``).

    A full listen backlog does not fail the connect: the kernel makes a blocking connect wait
    for room up to ``SO_SNDTIMEO``, which is set to what is left of ``timeout``.
    """
    deadline = time.monotonic() + min(timeout, _MAX_TIMEOUT)
    delay = _RETRY_FIRST
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "its listen backlog stayed full (timed out)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            seconds = int(left)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                struct.pack("ll", seconds, max(1, int((left - seconds) * 1e6))),
            )
            sock.connect(path)  # blocking: waits while the backlog is full
        except BlockingIOError:
            sock.close()
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, _RETRY_MAX)
            continue
        except BaseException:
            sock.close()
            raise
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        return sock


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True  # gone meanwhile: a daemon replacing it, keep waiting


def connect_starting(path: str, timeout: float, start_wait: float) -> socket.socket:
    """:func:`connect_unix`, waiting up to ``start_wait`` seconds while ``path`` does not exist
    or refuses connections (a daemon that is starting: not yet bound, or bound and not yet
    listening). Other errors, and these after ``start_wait``, are raised as they come."""
    deadline = time.monotonic() + start_wait
    delay = _START_POLL_FIRST
    while True:
        try:
            return connect_unix(path, timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if isinstance(exc, ConnectionRefusedError) and not _is_socket(path):
                # Connecting to a file that is not a socket is refused too; no daemon is
                # starting there.
                raise OSError(errno.ENOTSOCK, "not a socket") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            log.debug("daemon at %s not up yet (%s); waiting", path, exc.strerror)
            time.sleep(min(delay, left))
            delay = min(delay * 2, _START_POLL_MAX)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        sock.settimeout(timeout)
        self.sock = sock

    def connect(self) -> None:
        # The socket is connected before the request (see DaemonClient.request); a second
        # connect would be http.client retrying on its own, which must not happen.
        raise ConnectionError(errno.ENOTCONN, "the connection to the daemon was closed")


def _segment(kind: str, value: str) -> str:
    """``value`` as one percent-encoded path segment; a clear error for an empty id."""
    if not isinstance(value, str) or not value:
        raise DaemonError(f"{kind} id must not be empty")
    return quote(value, safe="")


class DaemonClient:
    """Talks to the daemon listening on ``control_path``.

    ``timeout`` bounds each request; creating a microVM template or a fork with a VMM driver
    may take seconds. ``start_wait`` bounds how long a request waits for a daemon that is
    starting (default :data:`START_WAIT`; 0: fail at once when nothing listens).
    """

    def __init__(
        self, control_path: str, timeout: float = 120.0, start_wait: float | None = None
    ) -> None:
        if not 0 < timeout < _MAX_TIMEOUT:
            raise DaemonError(f"client timeout must be within (0, {_MAX_TIMEOUT:g}) s: {timeout}")
        if start_wait is None:
            start_wait = START_WAIT
        if not 0 <= start_wait < _MAX_TIMEOUT:
            raise DaemonError(
                f"client start_wait must be within [0, {_MAX_TIMEOUT:g}) s: {start_wait}"
            )
        self.control_path = control_path
        self.timeout = timeout
        self.start_wait = start_wait

    def request(
        self, method: str, path: str, body: object = None, timeout: float | None = None
    ) -> Any:
        """Send one request; the decoded JSON answer (or text for non-JSON answers).

        ``timeout`` (default the client's) bounds the connect and each read.
        """
        timeout = timeout or self.timeout
        try:
            sock = connect_starting(self.control_path, timeout, self.start_wait)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            waited = (
                f" (no daemon came up within {self.start_wait:g} s)"
                if self.start_wait and isinstance(exc, (FileNotFoundError, ConnectionRefusedError))
                else ""
            )
            raise DaemonError(
                f"cannot reach the daemon at {self.control_path}: {reason}{waited}"
            ) from None
        conn = _UnixConnection(sock, timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
            content_type = response.getheader("Content-Type", "")
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise DaemonError(f"cannot reach the daemon at {self.control_path}: {reason}") from None
        except http.client.HTTPException as exc:
            raise DaemonError(
                f"daemon at {self.control_path}: malformed HTTP answer ({exc!r})"
            ) from None
        finally:
            conn.close()
        if not content_type.startswith("application/json"):
            if response.status >= 300:
                raise DaemonError(f"daemon: HTTP {response.status}", response.status)
            return data.decode()
        try:
            doc = json.loads(data)
        except ValueError:
            raise DaemonError(
                f"daemon: HTTP {response.status} with a malformed JSON body", response.status
            ) from None
        if response.status >= 300:
            message = doc.get("error") if isinstance(doc, dict) else None
            raise DaemonError(f"daemon: {message or f'HTTP {response.status}'}", response.status)
        return doc

    def _outlast(self, server_wait: float | None) -> float | None:
        """A request timeout that lets the daemon's own wait of ``server_wait`` s run out
        first, so the caller gets the daemon's answer rather than a bare timeout."""
        if server_wait is None or server_wait + 30 <= self.timeout:
            return None
        return min(server_wait + 30, _MAX_TIMEOUT)

    # --- templates ---------------------------------------------------------------------------
    def templates(self) -> dict[str, Any]:
        """``{"templates": [...], "errors": [...]}``."""
        result: dict[str, Any] = self.request("GET", "/templates")
        return result

    def template(self, template_id: str) -> dict[str, Any]:
        """One template's record."""
        result: dict[str, Any] = self.request(
            "GET", f"/templates/{_segment('template', template_id)}"
        )
        return result

    def create_template(self, template_id: str, kind: str, **fields: Any) -> dict[str, Any]:
        """Create a template (see :mod:`pagefork.daemon.api` for the fields of each kind)."""
        body = {"id": template_id, "kind": kind, **fields}
        result: dict[str, Any] = self.request("POST", "/templates", body)
        return result

    def create_template_from(
        self,
        template_id: str,
        source: str,
        name: str | None = None,
        share_memory: bool = False,
        **fields: Any,
    ) -> dict[str, Any]:
        """Create a template from one pushed to object storage (``s3://BUCKET/PREFIX``);
        ``fields`` are further fields of the request (``prefetch_policy``, ...)."""
        body: dict[str, Any] = {"id": template_id, "source": source, **fields}
        if name:
            body["name"] = name
        if share_memory:
            body["share_memory"] = True
        result: dict[str, Any] = self.request("POST", "/templates", body)
        return result

    def delete_template(self, template_id: str) -> None:
        """Delete a template (refused while it has live forks)."""
        self.request("DELETE", f"/templates/{_segment('template', template_id)}")

    def rerecord(self, template_id: str) -> None:
        """Make the template's next fork record a new hot set."""
        self.request("POST", f"/templates/{_segment('template', template_id)}/rerecord", {})

    def flatten(self, template_id: str) -> dict[str, Any]:
        """Merge a child template's layers into one mem-file; the updated template."""
        path = f"/templates/{_segment('template', template_id)}/flatten"
        result: dict[str, Any] = self.request("POST", path, {})
        return result

    # --- forks -------------------------------------------------------------------------------
    def forks(self) -> list[dict[str, Any]]:
        """Every live fork."""
        result: list[dict[str, Any]] = self.request("GET", "/forks")["forks"]
        return result

    def create_fork(
        self,
        template_id: str,
        fork_id: str | None = None,
        vmm: str | None = None,
        options: dict[str, Any] | None = None,
        prefetch_policy: str | None = None,
        prefetch_head: int | None = None,
    ) -> dict[str, Any]:
        """Create a fork; the answer holds its id (``fork``) and uffd ``socket``. A prefetch
        policy given here overrides the template's for this fork."""
        body: dict[str, Any] = {"template": template_id}
        if fork_id is not None:
            body["fork"] = fork_id
        if vmm is not None:
            body["vmm"] = vmm
        if options:
            body["options"] = options
        if prefetch_policy is not None:
            body["prefetch_policy"] = prefetch_policy
        if prefetch_head is not None:
            body["prefetch_head"] = prefetch_head
        result: dict[str, Any] = self.request("POST", "/forks", body)
        return result

    def fork(self, fork_id: str) -> dict[str, Any]:
        """A fork and its counters (``stats``)."""
        result: dict[str, Any] = self.request("GET", f"/forks/{_segment('fork', fork_id)}")
        return result

    def prefetch(self, fork_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Install the template's hot set into the fork (after its VMM's handshake)."""
        body = {"timeout": timeout} if timeout is not None else {}
        result: dict[str, Any] = self.request(
            "POST", f"/forks/{_segment('fork', fork_id)}/prefetch", body, self._outlast(timeout)
        )
        return result

    def wait_fork(self, fork_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the fork's guest to finish; the driver's summary and the final stats."""
        result: dict[str, Any] = self.request(
            "POST",
            f"/forks/{_segment('fork', fork_id)}/wait",
            {"timeout": timeout},
            self._outlast(timeout),
        )
        return result

    def snapshot_fork(
        self, fork_id: str, template_id: str, *, release: bool = False
    ) -> dict[str, Any]:
        """Pause the fork and register its memory as child template ``template_id``; the
        fork then resumes (or is released). The new template and what the snapshot cost."""
        path = f"/forks/{_segment('fork', fork_id)}/snapshot"
        result: dict[str, Any] = self.request(
            "POST", path, {"template": template_id, "release": release}
        )
        return result

    def release_fork(self, fork_id: str) -> dict[str, Any]:
        """Release a fork; its final counters."""
        result: dict[str, Any] = self.request("DELETE", f"/forks/{_segment('fork', fork_id)}")
        return result

    def metrics(self) -> str:
        """The Prometheus text exposition."""
        result: str = self.request("GET", "/metrics")
        return result


__all__ = ["DaemonClient", "DaemonError"]
