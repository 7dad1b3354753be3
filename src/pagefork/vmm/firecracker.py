"""The Firecracker driver: restore forks through Firecracker's HTTP API on its Unix socket.

Firecracker (v1.1+) must already run with ``--api-sock``; this module only speaks its API:

- restore: ``PUT /snapshot/load`` with ``mem_backend {"backend_type": "Uffd", "backend_path":
  <page server socket>}`` and ``resume_vm: false``, so the page server can prefetch before the
  vCPUs run; then ``PATCH /vm {"state": "Resumed"}``.
- template creation: ``PATCH /vm {"state": "Paused"}`` then ``PUT /snapshot/create``.

Firecracker answers 204 on success and ``{"fault_message": "..."}`` with a 4xx/5xx on failure;
that message is put in the :class:`~pagefork.errors.VmmError`. Every request has a timeout: a
Firecracker that stops answering must not hang the orchestrator.

The request bodies are built by pure functions (:func:`snapshot_load_body`,
:func:`snapshot_create_body`, :func:`vm_state_body`) so their shape is testable alone.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from pagefork.errors import VmmError
from pagefork.vmm.base import RestoreRequest, VmmDriver, VmmHandle

log = logging.getLogger("pagefork.firecracker")

#: Seconds any single API request may take unless the caller says otherwise.
DEFAULT_API_TIMEOUT = 10.0
#: Bytes of a non-JSON error body quoted in an error message.
_MAX_QUOTED_BODY = 200

VmState = Literal["Paused", "Resumed"]
StopMode = Literal["kill", "ctrl-alt-del"]
STOP_MODES: tuple[StopMode, ...] = ("kill", "ctrl-alt-del")
#: The ``PUT /snapshot/load`` fields the driver sets itself (``load_fields`` may not).
_RESERVED_LOAD_FIELDS = frozenset({"snapshot_path", "mem_backend", "resume_vm", "mem_file_path"})
#: The longest timeout option accepted, in seconds.
_MAX_TIMEOUT = 3600.0


class FirecrackerApiError(VmmError):
    """Firecracker answered a request with an error ``status`` (it refused the request)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class FirecrackerOptionError(VmmError):
    """A driver option is invalid; ``option`` names it. Raised before any API request."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"option {option!r} {message}")
        self.option = option


# --- request bodies (pure) -------------------------------------------------------------------
def snapshot_load_body(
    snapshot_path: str,
    uffd_socket: str,
    *,
    resume_vm: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of ``PUT /snapshot/load`` restoring guest memory through a uffd handler.

    ``extra`` adds fields some Firecracker versions accept (e.g. ``network_overrides``,
    ``track_dirty_pages``); it may not replace the memory backend.
    """
    body: dict[str, Any] = {
        "snapshot_path": snapshot_path,
        "mem_backend": {"backend_type": "Uffd", "backend_path": uffd_socket},
        "resume_vm": resume_vm,
    }
    for key, value in (extra or {}).items():
        if key in _RESERVED_LOAD_FIELDS:
            raise VmmError(f"extra snapshot load field {key!r} would override the uffd backend")
        body[key] = value
    return body


def snapshot_create_body(snapshot_path: str, mem_file_path: str) -> dict[str, Any]:
    """The body of ``PUT /snapshot/create`` for a full snapshot (a template needs every page)."""
    return {"snapshot_type": "Full", "snapshot_path": snapshot_path, "mem_file_path": mem_file_path}


def vm_state_body(state: VmState) -> dict[str, Any]:
    """The body of ``PATCH /vm``: pause or resume the vCPUs."""
    return {"state": state}


def fault_message(status: int, body: bytes) -> str:
    """The error text of a Firecracker answer: its ``fault_message``, else the raw body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("fault_message"), str):
        return str(doc["fault_message"])
    if not text:
        return http.client.responses.get(status, "no error message")
    return text[:_MAX_QUOTED_BODY]


# --- the API client --------------------------------------------------------------------------
class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket; the timeout covers connect, send and every read."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class FirecrackerApi:
    """A client of one Firecracker's HTTP API on its Unix socket ``socket_path``."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_API_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; returns the decoded JSON answer (``None`` for 204).

        Raises :class:`VmmError` naming the request and Firecracker's ``fault_message`` on an
        error status, or naming the socket when Firecracker cannot be reached or is silent.
        """
        what = f"firecracker {method} {path}"
        limit = self.timeout if timeout is None else timeout
        conn = _UnixHTTPConnection(self.socket_path, limit)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Accept": "application/json"}
            if payload is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.read()
            status = response.status
        except FileNotFoundError:
            raise VmmError(
                f"{what}: API socket {self.socket_path} does not exist (is Firecracker running?)"
            ) from None
        except ConnectionRefusedError:
            raise VmmError(
                f"{what}: nobody listens on API socket {self.socket_path} (Firecracker exited?)"
            ) from None
        except TimeoutError:
            raise VmmError(
                f"{what}: no answer within {limit:g}s on API socket {self.socket_path}"
            ) from None
        except http.client.HTTPException as exc:
            raise VmmError(
                f"{what}: bad or missing answer on API socket {self.socket_path} ({exc!r})"
            ) from None
        except OSError as exc:
            raise VmmError(
                f"{what}: API socket {self.socket_path}: {exc.strerror or exc}"
            ) from None
        finally:
            conn.close()
        if not 200 <= status < 300:
            raise FirecrackerApiError(f"{what}: {status}: {fault_message(status, data)}", status)
        if not data.strip():
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise VmmError(f"{what}: answer is not JSON: {data[:_MAX_QUOTED_BODY]!r}") from None

    def peer_pid(self) -> int:
        """The pid of the process serving the API socket (``SO_PEERCRED``).

        Firecracker's docs recommend finding the VMM this way, so a handler that cannot serve
        it can kill it instead of leaving its guest hung.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError as exc:
            raise VmmError(
                f"firecracker API socket {self.socket_path}: {exc.strerror or exc}"
            ) from None
        finally:
            sock.close()
        pid, _uid, _gid = struct.unpack("3i", creds)
        return int(pid)


def create_snapshot(
    api_socket: str,
    snapshot_path: str,
    mem_file_path: str,
    *,
    timeout: float = 60.0,
    resume_after: bool = False,
) -> None:
    """Make a template from a running Firecracker: pause it, write a full snapshot.

    ``snapshot_path`` receives the VM state, ``mem_file_path`` the guest memory (the template
    mem-file). The VM stays paused unless ``resume_after``.
    """
    api = FirecrackerApi(api_socket, timeout=timeout)
    api.request("PATCH", "/vm", vm_state_body("Paused"))
    api.request("PUT", "/snapshot/create", snapshot_create_body(snapshot_path, mem_file_path))
    if resume_after:
        api.request("PATCH", "/vm", vm_state_body("Resumed"))


# --- the driver ------------------------------------------------------------------------------
def _pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid``: later signals reach this process even if the pid is reused."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        log.warning("cannot open a pidfd for Firecracker pid %d: %s", pid, exc.strerror)
        return None


def _wait_exit(pidfd: int, timeout: float) -> bool:
    """True once the process behind ``pidfd`` has exited (a pidfd polls readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            if poller.poll(left * 1000):
                return True
        except InterruptedError:
            continue


class FirecrackerHandle(VmmHandle):
    """One Firecracker restored from a snapshot, paused until :meth:`resume`."""

    def __init__(
        self,
        fork_id: str,
        api: FirecrackerApi,
        pid: int | None,
        pidfd: int | None,
        stop_mode: StopMode,
        stop_timeout: float,
    ) -> None:
        self.fork_id = fork_id
        self.api = api
        self._pid = pid
        self._pidfd = pidfd
        self._stop_mode = stop_mode
        self._stop_timeout = stop_timeout
        self._stopped = False

    @property
    def pid(self) -> int | None:
        """Firecracker's pid, from ``SO_PEERCRED`` on its API socket."""
        return self._pid

    def resume(self) -> None:
        """``PATCH /vm {"state": "Resumed"}``: the vCPUs run."""
        self.api.request("PATCH", "/vm", vm_state_body("Resumed"))

    def pause(self) -> None:
        """``PATCH /vm {"state": "Paused"}``."""
        self.api.request("PATCH", "/vm", vm_state_body("Paused"))

    def wait(self, timeout: float) -> dict[str, Any]:
        """Firecracker cannot tell when the guest's work is done: returns its instance info
        (``GET /``: id, state, vmm_version) plus its pid, without waiting."""
        info = self.api.request("GET", "/", timeout=timeout)
        summary: dict[str, Any] = dict(info) if isinstance(info, dict) else {}
        summary["pid"] = self._pid
        return summary

    def stop(self) -> None:
        """End the VMM: SIGKILL through its pidfd (default), or ``SendCtrlAltDel`` first.

        Forks are disposable, so the default does not wait for the guest to shut down.
        ``SendCtrlAltDel`` needs a guest that reacts to it (x86 with an i8042 driver), hence
        the kill after ``stop_timeout``. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        pidfd, self._pidfd = self._pidfd, None
        try:
            if self._stop_mode == "ctrl-alt-del" or pidfd is None:
                try:
                    self.api.request(
                        "PUT", "/actions", {"action_type": "SendCtrlAltDel"}, self._stop_timeout
                    )
                except VmmError as exc:
                    log.info("fork %s: SendCtrlAltDel failed: %s", self.fork_id, exc)
                if pidfd is None or _wait_exit(pidfd, self._stop_timeout):
                    return
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                return  # already gone
            except OSError as exc:
                raise VmmError(
                    f"fork {self.fork_id}: cannot kill Firecracker pid {self._pid}: {exc.strerror}"
                ) from None
            if not _wait_exit(pidfd, self._stop_timeout):
                raise VmmError(
                    f"fork {self.fork_id}: Firecracker pid {self._pid} still alive "
                    f"{self._stop_timeout:g}s after SIGKILL"
                )
        finally:
            if pidfd is not None:
                os.close(pidfd)


@dataclass(frozen=True)
class FirecrackerOptions:
    """The driver's options, validated (see :class:`FirecrackerDriver`)."""

    api_socket: str | None = None
    api_timeout: float | None = None
    stop: StopMode = "kill"
    stop_timeout: float = 5.0
    load_fields: dict[str, Any] = field(default_factory=dict)


def _timeout_option(options: Mapping[str, Any], name: str) -> float | None:
    value = options.get(name)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 < value <= _MAX_TIMEOUT
    ):
        raise FirecrackerOptionError(
            name, f"must be a number of seconds in (0, {_MAX_TIMEOUT:g}], not {value!r}"
        )
    return float(value)


def parse_options(options: Mapping[str, Any]) -> FirecrackerOptions:
    """Validate the driver options of a restore; :class:`FirecrackerOptionError` naming the
    first bad one. ``api_socket`` may be absent here (:meth:`FirecrackerDriver.restore` needs
    it); unknown options are refused (a misspelt ``stop_timeout`` must not pass silently)."""
    if not isinstance(options, Mapping):
        raise FirecrackerOptionError("options", f"must be an object, not {options!r}")
    known = ("api_socket", "api_timeout", "stop", "stop_timeout", "load_fields")
    for key in options:
        if key not in known:
            raise FirecrackerOptionError(str(key), f"is unknown (known: {', '.join(known)})")
    api_socket = options.get("api_socket")
    if api_socket is not None and (not isinstance(api_socket, str) or not api_socket):
        raise FirecrackerOptionError("api_socket", f"must be a non-empty path, not {api_socket!r}")
    stop = options.get("stop", "kill")
    if stop not in STOP_MODES:
        raise FirecrackerOptionError(
            "stop", f"must be one of {', '.join(STOP_MODES)}, not {stop!r}"
        )
    stop_timeout = _timeout_option(options, "stop_timeout")
    load_fields = options.get("load_fields")
    if load_fields is None:
        load_fields = {}
    if not isinstance(load_fields, dict) or not all(isinstance(k, str) for k in load_fields):
        raise FirecrackerOptionError("load_fields", f"must be an object, not {load_fields!r}")
    reserved = sorted(_RESERVED_LOAD_FIELDS & set(load_fields))
    if reserved:
        raise FirecrackerOptionError(
            "load_fields", f"may not set {', '.join(reserved)} (the uffd backend is the driver's)"
        )
    return FirecrackerOptions(
        api_socket=api_socket,
        api_timeout=_timeout_option(options, "api_timeout"),
        stop=cast(StopMode, stop),
        stop_timeout=5.0 if stop_timeout is None else stop_timeout,
        load_fields=dict(load_fields),
    )


def _kill(pidfd: int, timeout: float) -> None:
    """SIGKILL the process behind ``pidfd`` and wait (bounded) for it to exit; logs failures."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return
    except OSError as exc:
        log.warning("cannot kill Firecracker: %s", exc.strerror)
        return
    if not _wait_exit(pidfd, timeout):
        log.warning("Firecracker still alive %gs after SIGKILL", timeout)


class FirecrackerDriver(VmmDriver):
    """Restores forks into already-running Firecracker processes, one API socket per fork.

    Options read from :attr:`RestoreRequest.options` (all validated before any API request;
    an invalid one raises :class:`FirecrackerOptionError` naming it):

    - ``api_socket`` (required): the Firecracker's ``--api-sock`` path;
    - ``api_timeout``: seconds per API request (default: the ``restore`` timeout);
    - ``stop``: ``"kill"`` (default) or ``"ctrl-alt-del"``; ``stop_timeout`` (default 5 s);
    - ``load_fields``: extra ``PUT /snapshot/load`` fields (e.g. ``network_overrides``).

    ``RestoreRequest.mem_file`` is not sent: with the Uffd backend Firecracker never opens the
    mem-file, the page server serves it.
    """

    name = "firecracker"

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Validate restore options without side effects (the daemon calls this before it
        registers a fork); :class:`FirecrackerOptionError` naming the bad option."""
        parse_options(options)

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> FirecrackerHandle:
        """``PUT /snapshot/load`` with the Uffd backend, paused; returns once Firecracker
        accepted it (it has connected to ``request.uffd_socket`` and sent the handshake).

        If Firecracker refuses the load (an error status) it is left as it was. If anything
        else fails once its pidfd is open (no answer, a dropped connection, an error after the
        load), Firecracker is killed: its state is unknown, and a VMM loaded without a page
        server behind it would only hang.
        """
        opts = parse_options(request.options)
        if opts.api_socket is None:
            raise VmmError(f"fork {request.fork_id}: the firecracker driver needs api_socket")
        api = FirecrackerApi(
            opts.api_socket, timeout=timeout if opts.api_timeout is None else opts.api_timeout
        )
        body = snapshot_load_body(
            request.snapshot_path, request.uffd_socket, extra=opts.load_fields
        )
        # Pin the process before loading: if the load or the handler fails we can still kill
        # the right VMM, and a reused pid cannot be hit later.
        pid = api.peer_pid()
        pidfd = _pidfd_open(pid)
        try:
            api.request("PUT", "/snapshot/load", body, timeout=timeout)
            return FirecrackerHandle(request.fork_id, api, pid, pidfd, opts.stop, opts.stop_timeout)
        except BaseException as exc:
            if pidfd is not None:
                try:
                    if not isinstance(exc, FirecrackerApiError):
                        log.warning(
                            "fork %s: killing Firecracker pid %d after a failed restore: %s",
                            request.fork_id,
                            pid,
                            exc,
                        )
                        _kill(pidfd, opts.stop_timeout)
                finally:
                    os.close(pidfd)
            raise


__all__ = [
    "DEFAULT_API_TIMEOUT",
    "FirecrackerApi",
    "FirecrackerApiError",
    "FirecrackerDriver",
    "FirecrackerHandle",
    "FirecrackerOptionError",
    "FirecrackerOptions",
    "create_snapshot",
    "fault_message",
    "parse_options",
    "snapshot_create_body",
    "snapshot_load_body",
    "vm_state_body",
]
