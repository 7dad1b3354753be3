"""A small Python client for the daemon's control socket.

Every method is one HTTP request; a non-2xx answer raises :class:`DaemonError` carrying the
status and the daemon's message. ::

    client = DaemonClient("/run/pagefork.sock")
    fork = client.create_fork("web", vmm="firecracker", options={"api_socket": "..."})
    client.release_fork(fork["fork"])
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from pagefork.errors import DaemonError


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    """Talks to the daemon listening on ``control_path``.

    ``timeout`` bounds each request; creating a microVM template or a fork with a VMM driver
    may take seconds.
    """

    def __init__(self, control_path: str, timeout: float = 120.0) -> None:
        self.control_path = control_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: object = None) -> Any:
        """Send one request; the decoded JSON answer (or text for non-JSON answers)."""
        conn = _UnixConnection(self.control_path, self.timeout)
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

    # --- templates ---------------------------------------------------------------------------
    def templates(self) -> dict[str, Any]:
        """``{"templates": [...], "errors": [...]}``."""
        result: dict[str, Any] = self.request("GET", "/templates")
        return result

    def template(self, template_id: str) -> dict[str, Any]:
        """One template's record."""
        result: dict[str, Any] = self.request("GET", f"/templates/{template_id}")
        return result

    def create_template(self, template_id: str, kind: str, **fields: Any) -> dict[str, Any]:
        """Create a template (see :mod:`pagefork.daemon.api` for the fields of each kind)."""
        body = {"id": template_id, "kind": kind, **fields}
        result: dict[str, Any] = self.request("POST", "/templates", body)
        return result

    def delete_template(self, template_id: str) -> None:
        """Delete a template (refused while it has live forks)."""
        self.request("DELETE", f"/templates/{template_id}")

    def rerecord(self, template_id: str) -> None:
        """Make the template's next fork record a new hot set."""
        self.request("POST", f"/templates/{template_id}/rerecord", {})

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
    ) -> dict[str, Any]:
        """Create a fork; the answer holds its id (``fork``) and uffd ``socket``."""
        body: dict[str, Any] = {"template": template_id}
        if fork_id is not None:
            body["fork"] = fork_id
        if vmm is not None:
            body["vmm"] = vmm
        if options:
            body["options"] = options
        result: dict[str, Any] = self.request("POST", "/forks", body)
        return result

    def fork(self, fork_id: str) -> dict[str, Any]:
        """A fork and its counters (``stats``)."""
        result: dict[str, Any] = self.request("GET", f"/forks/{fork_id}")
        return result

    def prefetch(self, fork_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Install the template's hot set into the fork (after its VMM's handshake)."""
        body = {"timeout": timeout} if timeout is not None else {}
        result: dict[str, Any] = self.request("POST", f"/forks/{fork_id}/prefetch", body)
        return result

    def wait_fork(self, fork_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the fork's guest to finish; the driver's summary and the final stats."""
        result: dict[str, Any] = self.request(
            "POST", f"/forks/{fork_id}/wait", {"timeout": timeout}
        )
        return result

    def release_fork(self, fork_id: str) -> dict[str, Any]:
        """Release a fork; its final counters."""
        result: dict[str, Any] = self.request("DELETE", f"/forks/{fork_id}")
        return result

    def metrics(self) -> str:
        """The Prometheus text exposition."""
        result: str = self.request("GET", "/metrics")
        return result


__all__ = ["DaemonClient", "DaemonError"]
