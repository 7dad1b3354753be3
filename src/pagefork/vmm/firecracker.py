"""The Firecracker driver: restore forks through Firecracker's HTTP API on its Unix socket.

Supported: Firecracker 1.7 to 1.16 (the releases whose differences
:class:`FirecrackerVersion` records and the test double reproduces). Firecracker runs already
with ``--api-sock``, or the driver starts it through the jailer (:mod:`pagefork.vmm.jailer`):

- restore: ``GET /`` must say ``Not started`` (a Firecracker process loads one snapshot, once);
  then ``PUT /snapshot/load`` with ``mem_backend {"backend_type": "Uffd", "backend_path":
  <page server socket>}`` and ``resume_vm: false``, so the page server can prefetch before the
  vCPUs run; then ``PATCH /vm {"state": "Resumed"}``. Since 1.8 Firecracker writes guest memory
  (the VMGenID) while it loads, so the page server serves from the handshake on.
- per-fork devices: ``network_overrides`` (1.12+) points the snapshot's interfaces at the
  fork's own taps; ``vsock_override`` (1.16+) gives it its own vsock socket. Older releases
  get the same through the jailer: a network namespace and a chroot per fork.
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
import re
import select
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal, cast

from pagefork.errors import VmmError
from pagefork.ksm import merge_preexec
from pagefork.vmm.base import RestoreRequest, VmmDriver, VmmHandle, VmmHandover, VmmSnapshot
from pagefork.vmm.fc_releases import LOAD_FIELD_SINCE, OLDEST_SUPPORTED, FirecrackerVersion
from pagefork.vmm.jailer import (
    Jail,
    JailerConfig,
    JailerError,
    format_pattern,
    parse_jailer,
    remove_made,
)

#: A diff snapshot's files inside the directory it is taken into.
DIFF_VMSTATE_FILE = "vmstate"
DIFF_MEMORY_FILE = "memory.diff"

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


def snapshot_diff_body(snapshot_path: str, mem_file_path: str) -> dict[str, Any]:
    """The body of ``PUT /snapshot/create`` for a diff snapshot: with dirty tracking on (see
    the ``snapshots`` option), a sparse memory file of the pages the guest wrote."""
    return {"snapshot_type": "Diff", "snapshot_path": snapshot_path, "mem_file_path": mem_file_path}


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
        jailed: _Jailed | None = None,
        jail_made: dict[str, list[str]] | None = None,
    ) -> None:
        self.fork_id = fork_id
        self.api = api
        self._pid = pid
        self._pidfd = pidfd
        self._stop_mode = stop_mode
        self._stop_timeout = stop_timeout
        self._jailed = jailed
        # A jailed Firecracker adopted in a takeover: what its jail holds (removed at stop).
        self._jail_made = jail_made
        self._stopped = False

    @property
    def pid(self) -> int | None:
        """Firecracker's pid, from ``SO_PEERCRED`` on its API socket."""
        return self._pid

    @property
    def pidfd(self) -> int | None:
        """A pidfd of Firecracker, opened before the load; None after :meth:`stop`."""
        return self._pidfd

    def exit_status(self) -> int | None:
        """A jailed Firecracker (this daemon's child): its status once it has exited, reaping
        it. Any other is not this process's child: unknown (None)."""
        if self._jailed is None:
            return None
        return self._jailed.proc.poll()

    def handover(self) -> VmmHandover:
        """Its pidfd, API socket and stop settings, and for a jailed one what its jail
        holds: what :meth:`FirecrackerDriver.adopt` needs to drive it as before."""
        state: dict[str, Any] = {
            "pid": self._pid,
            "api_socket": self.api.socket_path,
            "api_timeout": self.api.timeout,
            "stop": self._stop_mode,
            "stop_timeout": self._stop_timeout,
        }
        if self._jailed is not None:
            state["jail"] = self._jailed.jail.made()
        elif self._jail_made is not None:
            state["jail"] = self._jail_made
        fds = {"pidfd": self._pidfd} if self._pidfd is not None else {}
        return VmmHandover(state=state, fds=fds)

    def resume(self) -> None:
        """``PATCH /vm {"state": "Resumed"}``: the vCPUs run."""
        self.api.request("PATCH", "/vm", vm_state_body("Resumed"))

    def pause(self) -> None:
        """``PATCH /vm {"state": "Paused"}``."""
        self.api.request("PATCH", "/vm", vm_state_body("Paused"))

    def snapshot(self, out_dir: str, timeout: float) -> VmmSnapshot:
        """``PATCH /vm Paused``, then ``PUT /snapshot/create`` with ``snapshot_type: "Diff"``:
        ``out_dir/vmstate`` and the sparse ``out_dir/memory.diff``. The VM stays paused."""
        vmstate = os.path.join(out_dir, DIFF_VMSTATE_FILE)
        memory = os.path.join(out_dir, DIFF_MEMORY_FILE)
        self.api.request("PATCH", "/vm", vm_state_body("Paused"), timeout=timeout)
        self.api.request(
            "PUT", "/snapshot/create", snapshot_diff_body(vmstate, memory), timeout=timeout
        )
        return VmmSnapshot(memory_diff=memory, vmstate=vmstate)

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
        the kill after ``stop_timeout``. A jailed Firecracker is reaped and what the driver
        put in its chroot is removed. Idempotent.
        """
        if self._stopped:
            return
        self._stopped = True
        try:
            self._end_process()
        finally:
            if self._jailed is not None:
                self._jailed.release(self._stop_timeout)
            if self._jail_made is not None:
                remove_made(self._jail_made)

    def _end_process(self) -> None:
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
    network_overrides: dict[str, str] = field(default_factory=dict)
    vsock_uds: str | None = None
    jailer: JailerConfig | None = None
    snapshots: bool = False


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
    known = (
        "api_socket",
        "api_timeout",
        "stop",
        "stop_timeout",
        "load_fields",
        "network_overrides",
        "vsock_uds",
        "vsock_override",
        "jailer",
        "snapshots",
    )
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
    nets = _network_overrides(options.get("network_overrides"))
    vsock = _vsock_pattern(options)
    for name, given in (("network_overrides", bool(nets)), ("vsock_override", vsock is not None)):
        if given and name in load_fields:
            raise FirecrackerOptionError("load_fields", f"may not set {name} as well")
    snapshots = options.get("snapshots", False)
    if not isinstance(snapshots, bool):
        raise FirecrackerOptionError("snapshots", f"must be true or false, not {snapshots!r}")
    if snapshots and options.get("jailer") is not None:
        raise FirecrackerOptionError(
            "snapshots",
            "is not supported under the jailer yet (the snapshot is written inside "
            "the fork's chroot)",
        )
    jailer = None
    if options.get("jailer") is not None:
        try:
            jailer = parse_jailer(options["jailer"])
        except JailerError as exc:
            raise FirecrackerOptionError("jailer", str(exc)) from None
        if api_socket is not None:
            raise FirecrackerOptionError(
                "api_socket", "must not be given with 'jailer' (the jailed Firecracker's is used)"
            )
    return FirecrackerOptions(
        api_socket=api_socket,
        api_timeout=_timeout_option(options, "api_timeout"),
        stop=cast(StopMode, stop),
        stop_timeout=5.0 if stop_timeout is None else stop_timeout,
        load_fields=dict(load_fields),
        network_overrides=dict(nets),
        vsock_uds=vsock,
        jailer=jailer,
        snapshots=snapshots,
    )


#: How a ``network_overrides`` option may look, for its errors.
_NETWORK_SHAPES = (
    "{'eth0': 'tap-{fork_hash}'} or Firecracker's "
    "[{'iface_id': 'eth0', 'host_dev_name': 'tap-{fork_hash}'}]"
)


def _network_overrides(value: Any) -> dict[str, str]:
    """``network_overrides`` as interface id -> tap name pattern, from either shape: a map, or
    Firecracker's own list of ``{"iface_id", "host_dev_name"}`` (patterns in the names)."""
    option = "network_overrides"
    if value is None:
        return {}
    nets: dict[str, str] = {}
    if isinstance(value, dict):
        for iface, pattern in value.items():
            if not (isinstance(iface, str) and iface and isinstance(pattern, str) and pattern):
                raise FirecrackerOptionError(
                    option,
                    f"entry {iface!r}: {pattern!r} is not a tap name pattern "
                    f"(like {_NETWORK_SHAPES})",
                )
            nets[iface] = pattern
    elif isinstance(value, list):
        for i, item in enumerate(value):
            where = f"entry {i}"
            if not isinstance(item, dict):
                raise FirecrackerOptionError(
                    option,
                    f"{where}: must be an object with 'iface_id' and 'host_dev_name', not {item!r}",
                )
            extra = sorted(str(k) for k in item if k not in ("iface_id", "host_dev_name"))
            if extra:
                raise FirecrackerOptionError(
                    option,
                    f"{where}: unknown key {extra[0]!r} (an entry has 'iface_id' and "
                    "'host_dev_name')",
                )
            for key in ("iface_id", "host_dev_name"):
                field_value = item.get(key)
                if not isinstance(field_value, str) or not field_value:
                    raise FirecrackerOptionError(
                        option, f"{where}: {key!r} must be a non-empty string, not {field_value!r}"
                    )
            iface = item["iface_id"]
            if iface in nets:
                raise FirecrackerOptionError(option, f"{where}: interface {iface!r} given twice")
            nets[iface] = item["host_dev_name"]
    else:
        raise FirecrackerOptionError(option, f"must be {_NETWORK_SHAPES}, not {value!r}")
    for iface, pattern in nets.items():
        tap_name(option, pattern, "f", iface)  # fields and characters
    return nets


def _vsock_pattern(options: Mapping[str, Any]) -> str | None:
    """The vsock socket path pattern, from ``vsock_uds`` or Firecracker's own
    ``vsock_override: {"uds_path": ...}`` (not both); null is absent, as in Firecracker."""
    given = [k for k in ("vsock_uds", "vsock_override") if options.get(k) is not None]
    if len(given) == 2:
        raise FirecrackerOptionError(
            "vsock_override", "and 'vsock_uds' both give the vsock socket: give one"
        )
    if given == ["vsock_override"]:
        option, override = "vsock_override", options["vsock_override"]
        if not isinstance(override, dict) or set(override) != {"uds_path"}:
            raise FirecrackerOptionError(
                option,
                "must be Firecracker's {'uds_path': PATTERN} (with {fork} or {fork_hash} in "
                f"PATTERN), not {override!r}",
            )
        vsock = override["uds_path"]
        option = "vsock_override.uds_path"
    else:
        option, vsock = "vsock_uds", options.get("vsock_uds")
        if vsock is None:
            return None
    if not isinstance(vsock, str) or not ("{fork}" in vsock or "{fork_hash}" in vsock):
        raise FirecrackerOptionError(
            option, f"must be a path pattern with {{fork}} or {{fork_hash}} in it, not {vsock!r}"
        )
    _pattern(option, vsock, "f")
    return vsock


def _pattern(option: str, pattern: str, fork: str, iface: str = "") -> str:
    try:
        return format_pattern(option, pattern, fork, iface)
    except JailerError as exc:
        raise FirecrackerOptionError(option, str(exc)) from None


#: What Linux allows in an interface name: at most IFNAMSIZ - 1 bytes, of these characters.
_MAX_TAP_NAME = 15
_TAP_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,15}$")


def tap_name(option: str, pattern: str, fork: str, iface: str) -> str:
    """The fork's tap name from ``pattern`` (``{fork}``, ``{fork_hash}``, ``{iface}``); it must
    be a valid Linux interface name, at most 15 bytes: :class:`FirecrackerOptionError`
    otherwise."""
    name = _pattern(option, pattern, fork, iface)
    if len(name.encode()) > _MAX_TAP_NAME:
        raise FirecrackerOptionError(
            option,
            f"gives tap name {name!r} for fork {fork!r}: {len(name.encode())} characters, and "
            f"Linux allows {_MAX_TAP_NAME} (use {{fork_hash}}, like 'tap-{{fork_hash}}', or a "
            "shorter fork id)",
        )
    if not _TAP_NAME.match(name):
        raise FirecrackerOptionError(
            option,
            f"gives tap name {name!r} for fork {fork!r}: an interface name is 1-15 letters, "
            "digits or _.:-",
        )
    return name


#: The longest Unix socket path ``bind`` takes (``sun_path`` less its NUL).
_MAX_SOCKET_PATH = 107


def fork_devices(opts: FirecrackerOptions, fork_id: str) -> dict[str, Any]:
    """The fork's own taps and vsock socket as ``PUT /snapshot/load`` fields
    (``network_overrides``, ``vsock_override``), its id filled into the patterns;
    :class:`FirecrackerOptionError` if a tap name or socket path does not fit."""
    fields: dict[str, Any] = {}
    if opts.network_overrides:
        fields["network_overrides"] = [
            {"iface_id": iface, "host_dev_name": tap_name("network_overrides", p, fork_id, iface)}
            for iface, p in opts.network_overrides.items()
        ]
    if opts.vsock_uds is not None:
        path = _pattern("vsock_uds", opts.vsock_uds, fork_id)
        if len(path.encode()) > _MAX_SOCKET_PATH:
            raise FirecrackerOptionError(
                "vsock_uds",
                f"gives vsock socket {path!r} for fork {fork_id!r}: {len(path.encode())} bytes, "
                f"and a Unix socket path holds at most {_MAX_SOCKET_PATH}",
            )
        fields["vsock_override"] = {"uds_path": path}
    return fields


def fork_load_fields(
    opts: FirecrackerOptions, fork_id: str, version: FirecrackerVersion
) -> dict[str, Any]:
    """The extra ``PUT /snapshot/load`` fields of one fork: ``load_fields`` plus its own taps
    and vsock socket; :class:`VmmError` if ``version`` does not accept one of them."""
    extra = dict(opts.load_fields)
    extra.update(fork_devices(opts, fork_id))
    if opts.snapshots and not {"track_dirty_pages", "enable_diff_snapshots"} & set(extra):
        # Dirty tracking makes a Diff snapshot hold only the pages the guest wrote; the field
        # was renamed in 1.13 (older releases take only the old name).
        name = (
            "track_dirty_pages"
            if version.accepts_load_field("track_dirty_pages")
            else ("enable_diff_snapshots")
        )
        extra[name] = True
    hints = {
        "network_overrides": "; give each fork its own network namespace instead (the "
        "jailer's netns), with a tap of the snapshot's name in it",
        "vsock_override": "; run each fork in its own chroot instead (the jailer), where the "
        "snapshot's vsock path is the fork's own",
    }
    for name in extra:
        if not version.accepts_load_field(name):
            raise VmmError(
                f"fork {fork_id}: Firecracker {version} does not accept the load field "
                f"{name!r}{hints.get(name, '')}"
            )
    return extra


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
    """Restores forks into fresh Firecracker processes (1.7-1.16), one process per fork.

    Options read from :attr:`RestoreRequest.options` (all validated before any API request;
    an invalid one raises :class:`FirecrackerOptionError` naming it):

    - ``api_socket``: the ``--api-sock`` path of a Firecracker started by the caller, or
    - ``jailer``: start Firecracker through the jailer, chrooted per fork
      (:func:`pagefork.vmm.jailer.parse_jailer` lists its keys);
    - ``api_timeout``: seconds per API request (default: the ``restore`` timeout);
    - ``stop``: ``"kill"`` (default) or ``"ctrl-alt-del"``; ``stop_timeout`` (default 5 s);
    - ``network_overrides``: interface id → tap name pattern (``{fork}``, ``{fork_hash}``,
      ``{iface}``), or Firecracker's own list of ``{"iface_id", "host_dev_name"}``; sent as
      ``network_overrides`` (1.12+). A tap name holds at most 15 characters, checked against
      the fork's id before the fork is made: ``tap-{fork_hash}`` always fits;
    - ``vsock_uds``: a vsock socket path pattern with ``{fork}`` or ``{fork_hash}``, or the
      same as Firecracker's own ``vsock_override: {"uds_path": ...}``; sent as
      ``vsock_override`` (1.16+);
    - ``load_fields``: other ``PUT /snapshot/load`` fields (e.g. ``track_dirty_pages``); each
      must be one the release accepts;
    - ``snapshots``: true to take diff snapshots of the fork later (:meth:`FirecrackerHandle.
      snapshot`): the load asks for dirty tracking (``track_dirty_pages``, 1.13+, or
      ``enable_diff_snapshots`` before). Not under the jailer yet.

    ``RestoreRequest.mem_file`` is not sent: with the Uffd backend Firecracker never opens the
    mem-file, the page server serves it.
    """

    name = "firecracker"

    def check_options(self, options: Mapping[str, Any], fork_id: str | None = None) -> None:
        """Validate restore options without side effects (the daemon calls this before it
        registers a fork); :class:`FirecrackerOptionError` naming the bad option. With
        ``fork_id``, also the tap names and vsock path it gives the patterns."""
        opts = parse_options(options)
        if fork_id is not None:
            fork_devices(opts, fork_id)

    def restore(self, request: RestoreRequest, timeout: float = 30.0) -> FirecrackerHandle:
        """``PUT /snapshot/load`` with the Uffd backend, paused; returns once Firecracker
        accepted it (it has connected to ``request.uffd_socket``, sent the handshake, and had
        any fault of the load itself served).

        First ``GET /`` must report ``Not started``: a Firecracker that already loaded or
        booted cannot load again, so every fork needs a fresh process. Its ``vmm_version``
        decides which load fields may be sent (a clear error before the load otherwise).

        When Firecracker refuses the load, it exits by itself (as it does after any failed
        load, except for a malformed body or a VM that already started); the driver leaves
        a process it did not start to that. If anything else fails once the load was sent
        (no answer, a dropped connection, an error after the load), Firecracker is killed:
        its state is unknown, and a VMM loaded without a page server behind it would only
        hang. A Firecracker the driver started through the jailer is killed on any failure.
        """
        opts = parse_options(request.options)
        if opts.api_socket is None and opts.jailer is None:
            raise VmmError(
                f"fork {request.fork_id}: the firecracker driver needs api_socket or jailer"
            )
        limit = timeout if opts.api_timeout is None else opts.api_timeout
        jailed: _Jailed | None = None
        snapshot, uffd_socket = request.snapshot_path, request.uffd_socket
        if opts.jailer is not None:
            jailed = _Jailed.start(opts.jailer, request, limit)
            snapshot, uffd_socket = jailed.snapshot_path, jailed.uffd_socket
            api = FirecrackerApi(jailed.jail.api_socket, timeout=limit)
        else:
            assert opts.api_socket is not None
            api = FirecrackerApi(opts.api_socket, timeout=limit)
        pidfd: int | None = None
        sent = False
        try:
            # Pin the process before loading: if the load or the handler fails we can still
            # kill the right VMM, and a reused pid cannot be hit later.
            pid = api.peer_pid()
            pidfd = _pidfd_open(pid)
            version = self._check_fresh(api, request.fork_id)
            body = snapshot_load_body(
                snapshot, uffd_socket, extra=fork_load_fields(opts, request.fork_id, version)
            )
            sent = True
            api.request("PUT", "/snapshot/load", body, timeout=timeout)
            return FirecrackerHandle(
                request.fork_id, api, pid, pidfd, opts.stop, opts.stop_timeout, jailed
            )
        except BaseException as exc:
            ours = jailed is not None
            if pidfd is not None:
                try:
                    if ours or (sent and not isinstance(exc, FirecrackerApiError)):
                        log.warning(
                            "fork %s: killing Firecracker pid %d after a failed restore: %s",
                            request.fork_id,
                            pid,
                            exc,
                        )
                        _kill(pidfd, opts.stop_timeout)
                finally:
                    os.close(pidfd)
            if jailed is not None:
                jailed.release(opts.stop_timeout)
            raise

    def adopt(self, fork_id: str, handover: VmmHandover) -> FirecrackerHandle:
        """A Firecracker another daemon restored, from its :meth:`FirecrackerHandle.handover`:
        driven through the same API socket (resume, snapshots, its stop mode), watched and
        killed through its pidfd (duplicated here). A jailed one's jail is removed at stop;
        its process is not this daemon's child, so its exit status is unknown."""
        state = handover.state
        path = state.get("api_socket")
        if not isinstance(path, str) or not path:
            raise VmmError(f"fork {fork_id}: a Firecracker handover needs its API socket")
        pid = state.get("pid")
        timeout = state.get("api_timeout")
        stop = state.get("stop")
        stop_timeout = state.get("stop_timeout")
        jail = state.get("jail")
        fd = handover.fds.get("pidfd", -1)
        if not isinstance(timeout, (int, float)):
            timeout = DEFAULT_API_TIMEOUT
        return FirecrackerHandle(
            fork_id,
            FirecrackerApi(path, timeout=float(timeout)),
            pid if isinstance(pid, int) else None,
            os.dup(fd) if fd >= 0 else None,
            "ctrl-alt-del" if stop == "ctrl-alt-del" else "kill",
            float(stop_timeout) if isinstance(stop_timeout, (int, float)) else 5.0,
            jail_made=(
                {k: [str(p) for p in v] for k, v in jail.items() if isinstance(v, list)}
                if isinstance(jail, dict)
                else None
            ),
        )

    @staticmethod
    def _check_fresh(api: FirecrackerApi, fork_id: str) -> FirecrackerVersion:
        """``GET /``: the process must be ``Not started`` and a supported release."""
        info = api.request("GET", "/")
        state = info.get("state") if isinstance(info, dict) else None
        if state != "Not started":
            raise VmmError(
                f"fork {fork_id}: Firecracker at {api.socket_path} is {state!r}, not "
                "'Not started': a snapshot loads only into a fresh Firecracker process, "
                "start one per fork"
            )
        raw = info.get("vmm_version")
        try:
            version = FirecrackerVersion.parse(str(raw))
        except VmmError:
            raise VmmError(
                f"fork {fork_id}: Firecracker at {api.socket_path} reports version {raw!r}, "
                "which is not a version"
            ) from None
        if not version.supported:
            raise VmmError(
                f"fork {fork_id}: Firecracker {version} is older than 1.7, the oldest release "
                "pagefork supports"
            )
        return version


class _Jailed:
    """A Firecracker the driver started through the jailer, and the jail prepared for it."""

    def __init__(
        self,
        jail: Jail,
        proc: subprocess.Popen[bytes],
        paths: tuple[str, str],
        stderr: IO[bytes],
    ) -> None:
        self.jail = jail
        self.proc = proc
        self.snapshot_path, self.uffd_socket = paths
        self.stderr = stderr

    @classmethod
    def start(cls, config: JailerConfig, request: RestoreRequest, timeout: float) -> _Jailed:
        """Prepare the fork's chroot, start the jailer, wait for the API socket."""
        jail = Jail(config, request.fork_id)
        paths = jail.prepare(request.snapshot_path, request.uffd_socket)
        # A file, not a pipe: a chatty Firecracker must never block on a full pipe.
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 (kept open for the process life)
        try:
            proc = subprocess.Popen(
                jail.command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                # Opt-in KSM: set before exec, kept by the jailer and the Firecracker it execs.
                preexec_fn=merge_preexec if request.share_memory else None,
            )
        except OSError as exc:
            stderr.close()
            jail.cleanup()
            raise VmmError(
                f"fork {request.fork_id}: cannot start the jailer {config.binary}: {exc.strerror}"
            ) from None
        jailed = cls(jail, proc, paths, stderr)
        try:
            jailed._wait_api(timeout)
        except BaseException:
            jailed.release(timeout)
            raise
        return jailed

    def _wait_api(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        path = self.jail.api_socket
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stderr.seek(0)
                err = self.stderr.read(1 << 16).decode("utf-8", "replace")
                last = err.strip().splitlines()[-1:] or ["no message"]
                raise VmmError(
                    f"fork {self.jail.fork_id}: the jailer exited with status {code} before "
                    f"Firecracker's API socket {path} answered: {last[0][:_MAX_QUOTED_BODY]}"
                )
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise VmmError(
                    f"fork {self.jail.fork_id}: Firecracker's API socket {path} did not answer "
                    f"within {timeout:g}s of starting the jailer"
                )
            # Nothing to wait on for a socket to appear: check again shortly, or sooner if
            # the jailer exits.
            _wait_exit_or(self.proc.pid, 0.01)

    def release(self, timeout: float) -> None:
        """Kill (if still running) and reap the jailed process; remove what the jail made."""
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("fork %s: jailed Firecracker not reaped", self.jail.fork_id)
        finally:
            self.stderr.close()
            self.jail.cleanup()


def _wait_exit_or(pid: int, seconds: float) -> None:
    """Wait up to ``seconds`` or until the process ``pid`` exits, whichever comes first."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        _wait_exit(fd, seconds)
    finally:
        os.close(fd)


__all__ = [
    "DEFAULT_API_TIMEOUT",
    "LOAD_FIELD_SINCE",
    "OLDEST_SUPPORTED",
    "FirecrackerApi",
    "FirecrackerApiError",
    "FirecrackerDriver",
    "FirecrackerHandle",
    "FirecrackerOptionError",
    "FirecrackerOptions",
    "FirecrackerVersion",
    "create_snapshot",
    "fault_message",
    "fork_devices",
    "fork_load_fields",
    "parse_options",
    "snapshot_create_body",
    "snapshot_load_body",
    "tap_name",
    "vm_state_body",
]
