"""The daemon's JSON HTTP control API, on a Unix socket only its owner can use (mode 0600).

Routes (bodies and answers are JSON objects; errors are ``{"error": message}``):

=======  ===========================  ==========================================================
GET      /templates                   ``{"templates": [...], "errors": [...]}`` (broken records)
POST     /templates                   create: ``{"id", "kind": "firecracker", "mem_file",
                                      "snapshot_path", ["page_size", "copy", "name"]}`` or
                                      ``{"id", "kind": "kvm", ["mem_size_mib", "vcpus",
                                      "variants", "working_set", "fork_share", "seed", "name"]}``
                                      or ``{"id", "source": "s3://BUCKET/PREFIX", ["name"]}``;
                                      each takes ``"share_memory": true`` (KSM across its
                                      forks; ``note`` says so when KSM is off) and a prefetch
                                      policy: ``"prefetch_policy": "before-resume"`` (the
                                      default) or ``"stream"`` with ``"prefetch_head": N``
GET      /templates/{id}              the record
DELETE   /templates/{id}              409 while it has forks (live or exited)
POST     /templates/{id}/rerecord     the next fork records a new hot set
POST     /templates/{id}/flatten      merge a child template's layers into one mem-file
GET      /forks                       ``{"forks": [...]}``, each with its ``state``: ``live``
                                      or ``exited`` (held until released)
POST     /forks                       ``{"template", ["fork", "vmm", "options",
                                      "prefetch_policy", "prefetch_head"]}`` → the fork, with
                                      its uffd ``socket`` (201); a policy given here overrides
                                      the template's for this fork
GET      /forks/{id}                  the fork, its page server counters and its VMM's
                                      ``memory`` (:mod:`pagefork.memstats`; null once gone)
POST     /forks/{id}/prefetch         install the hot set (``{"timeout"}`` optional)
POST     /forks/{id}/wait             wait until the guest is done and the session ended;
                                      the final ``stats`` and ``prefetch`` report
POST     /forks/{id}/snapshot         ``{"template", ["release"]}``: pause the fork, register
                                      its memory as a child template of its own (201), then
                                      resume it (or release it)
DELETE   /forks/{id}                  release; the final counters and the VMM's last ``memory``
GET      /metrics                     Prometheus text format
GET      /openapi.json                this API as an OpenAPI 3.1 document (also docs/openapi.json)
=======  ===========================  ==========================================================

Ids in paths are percent-encoded (one path segment each: ``/templates/a%20b`` is the
template ``a b``, which does not exist).

Status codes: 400 a bad request (the message names the field, or the driver option; also bad
HTTP framing), 404 an unknown template, fork or route (also one deleted or released while the
request ran), 405 a known route with another method (``Allow`` lists the right ones; HEAD and
OPTIONS included), 409 a request the current state refuses (a template in use or already
there), 413 a body over 1 MiB, 501 a method HTTP does not define here, 502 the VMM failed.
Every answer but /metrics is JSON, errors included.

:class:`ControlApi` maps a request to a response and does no I/O of its own, so it is tested
without sockets; :class:`ControlServer` serves it over HTTP with
:class:`~pagefork.daemon.httpserver.HttpServer` (h11 under a selector loop; that module says
why).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import socket
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from pagefork.daemon.config import PrefetchPolicy, PrefetchPolicyError
from pagefork.daemon.httpserver import (
    KNOWN_METHODS,
    HttpServer,
    PoolName,
    Response,
    ServerLimits,
)
from pagefork.daemon.manager import (
    FORK_STATES,
    DriverOptionsError,
    ForkManager,
    ForkStateWord,
    TemplateKey,
    UnknownForkError,
)
from pagefork.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pagefork.daemon.metrics import DaemonMetrics
from pagefork.errors import DaemonError, ForkError, PageforkError, TemplateError, VmmError
from pagefork.ksm import off_note
from pagefork.memstats import try_measure
from pagefork.server import bind_private_socket, validate_fork_id
from pagefork.templates import (
    TemplateFieldError,
    TemplateRecord,
    TemplateRegistry,
    UnknownTemplateError,
    kind_of,
    validate_template_id,
)

log = logging.getLogger("pagefork")


#: Forks per template identity and state (:meth:`ForkManager.fork_counts`).
_Counts = dict[TemplateKey, dict[ForkStateWord, int]]


class HttpError(Exception):
    """Ends a request with ``status``, ``{"error": message}`` and any extra ``headers``."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def _bad(message: str) -> HttpError:
    return HttpError(HTTPStatus.BAD_REQUEST, message)


def _not_found(message: str) -> HttpError:
    return HttpError(HTTPStatus.NOT_FOUND, message)


def _segment(raw: str) -> str:
    """A path segment's id, percent-decoded (as UTF-8, strictly)."""
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise _bad(f"path segment {raw!r}: percent-encoding is not UTF-8") from None


#: The deepest JSON a request body may nest (a control request nests two or three levels;
#: driver options a few more).
MAX_BODY_DEPTH = 32
#: C0 and C1 control characters and DEL: a terminal acts on them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _walk(doc: object) -> list[tuple[str, object]]:
    """Every value in ``doc`` with its place (``options.a[2]``), without recursion."""
    out: list[tuple[str, object]] = []
    todo: list[tuple[str, object]] = [("", doc)]
    while todo:
        where, value = todo.pop()
        out.append((where, value))
        if isinstance(value, dict):
            for key, item in value.items():
                place = f"{where}.{key}" if where else str(key)
                todo.append((place, key))  # a key is text too
                todo.append((place, item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return out


def _lone_surrogate(doc: object) -> str | None:
    """Where ``doc`` holds a string that is not encodable Unicode (``"\\ud800"`` in JSON),
    or None."""
    for where, value in _walk(doc):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return repr(where.encode("utf-8", "backslashreplace").decode())
    return None


def _nesting(doc: object) -> int:
    """How deep ``doc`` nests (a scalar is 0), without recursion."""
    deepest = 0
    todo: list[tuple[int, object]] = [(0, doc)]
    while todo:
        depth, value = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth + 1)
            items = value.values() if isinstance(value, dict) else value
            todo.extend((depth + 1, v) for v in items)
    return deepest


class _Body:
    """A request's JSON object, with typed field access that names the field on error."""

    def __init__(self, raw: bytes, required: bool) -> None:
        self.doc: dict[str, Any] = {}
        if not raw.strip():
            if required:
                raise _bad("request body: a JSON object is required")
            return
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise _bad(f"request body: not valid JSON ({exc})") from None
        except RecursionError:  # the parser recurses per level: refuse, never a traceback
            raise _bad("request body: JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise _bad("request body: must be a JSON object")
        where = _lone_surrogate(doc)
        if where is not None:
            raise _bad(f"request body: {where} holds a lone surrogate (not Unicode text)")
        if _nesting(doc) > MAX_BODY_DEPTH:
            raise _bad(f"request body: JSON nested deeper than {MAX_BODY_DEPTH} levels")
        self.doc = doc

    def text(self, name: str) -> str | None:
        """A free-text field shown to people (a display name): no control characters."""
        value: str | None = self.get(name, str)
        if value is not None and _CONTROL.search(value):
            raise _bad(f"field {name!r} must not hold control characters, not {value!r}")
        return value

    def get(self, name: str, kind: type | tuple[type, ...], required: bool = False) -> Any:
        if name not in self.doc or self.doc[name] is None:
            if required:
                raise _bad(f"field {name!r} is required")
            return None
        value = self.doc[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # JSON true/false are not numbers here, whatever Python thinks.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise _bad(f"field {name!r} must be of type {names}, not {type(value).__name__}")
        return value

    def prefetch_policy(self) -> PrefetchPolicy | None:
        """The prefetch policy the body names (``prefetch_policy``, ``prefetch_head``), or
        None when it names none; 400 naming the field if it is invalid."""
        policy = self.get("prefetch_policy", str)
        head = self.get("prefetch_head", int)
        if policy is None and head is None:
            return None
        try:
            return PrefetchPolicy.parse(policy, head)
        except PrefetchPolicyError as exc:
            raise _bad(str(exc)) from None

    def number(self, name: str, low: float, high: float, integer: bool = False) -> Any:
        value = self.get(name, int if integer else (int, float))
        if value is not None and not low <= value <= high:
            raise _bad(f"field {name!r} must be within [{low:g}, {high:g}], not {value}")
        return value


_ROUTES = [
    (re.compile(r"/templates"), "templates"),
    (re.compile(r"/templates/([^/]+)"), "template"),
    (re.compile(r"/templates/([^/]+)/rerecord"), "rerecord"),
    (re.compile(r"/templates/([^/]+)/flatten"), "flatten"),
    (re.compile(r"/forks"), "forks"),
    (re.compile(r"/forks/([^/]+)"), "fork"),
    (re.compile(r"/forks/([^/]+)/prefetch"), "prefetch"),
    (re.compile(r"/forks/([^/]+)/wait"), "wait"),
    (re.compile(r"/forks/([^/]+)/snapshot"), "snapshot"),
    (re.compile(r"/metrics"), "metrics"),
    (re.compile(r"/openapi\.json"), "openapi"),
]


class ControlApi:
    """Maps control requests onto the registry and the fork manager."""

    def __init__(
        self, registry: TemplateRegistry, manager: ForkManager, metrics: DaemonMetrics
    ) -> None:
        self.registry = registry
        self.manager = manager
        self.metrics = metrics

    def handle(self, method: str, path: str, body: bytes) -> Response:
        """Answer one request; never raises."""
        try:
            if method not in KNOWN_METHODS:
                raise HttpError(HTTPStatus.NOT_IMPLEMENTED, f"method {method} is not implemented")
            return self._dispatch(method, path.split("?", 1)[0].rstrip("/") or "/", body)
        except HttpError as exc:
            return Response.json(exc.status, {"error": str(exc)}, exc.headers)
        except (TemplateFieldError, DriverOptionsError, PrefetchPolicyError) as exc:
            return Response.json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
        except (UnknownTemplateError, UnknownForkError) as exc:
            return Response.json(HTTPStatus.NOT_FOUND, {"error": str(exc)})
        except VmmError as exc:
            return Response.json(HTTPStatus.BAD_GATEWAY, {"error": str(exc)})
        except (TemplateError, ForkError) as exc:
            return Response.json(HTTPStatus.CONFLICT, {"error": str(exc)})
        except PageforkError as exc:
            return Response.json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})
        except Exception as exc:  # a bug answers 500 and leaves the daemon running
            log.exception("%s %s failed", method, path)
            return Response.json(
                HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error: {exc!r}"}
            )

    def _dispatch(self, method: str, path: str, raw: bytes) -> Response:
        for pattern, name in _ROUTES:
            m = pattern.fullmatch(path)
            if m is None:
                continue
            handler = getattr(self, f"_{method.lower()}_{name}", None)
            if handler is None:
                allowed = [
                    v for v in ("GET", "POST", "DELETE") if hasattr(self, f"_{v.lower()}_{name}")
                ]
                raise HttpError(
                    HTTPStatus.METHOD_NOT_ALLOWED,
                    f"{method} is not allowed on {path} (allowed: {', '.join(allowed)})",
                    (("Allow", ", ".join(allowed)),),
                )
            response: Response = handler(*(_segment(g) for g in m.groups()), raw)
            return response
        raise _not_found(f"no such route: {path}")

    # --- templates ---------------------------------------------------------------------------
    def _template_id(self, template_id: str) -> str:
        if not self.registry.exists(template_id):
            raise _not_found(f"unknown template {template_id!r}")
        return template_id

    def _record(self, record: TemplateRecord, counts: _Counts) -> dict[str, Any]:
        """A template as the API shows it: its record, and its forks counted by state."""
        mine = counts.get((record.id, record.created), {})
        return {
            **record.to_dict(),
            **{f"{word}_forks": mine.get(word, 0) for word in FORK_STATES},
        }

    def _get_templates(self, raw: bytes) -> Response:
        listing = self.registry.listing()
        counts = self.manager.fork_counts()
        return Response.json(
            HTTPStatus.OK,
            {
                "templates": [self._record(r, counts) for r in listing.templates],
                "errors": listing.errors,
            },
        )

    def _post_templates(self, raw: bytes) -> Response:
        body = _Body(raw, required=True)
        template_id = body.get("id", str, required=True)
        try:
            validate_template_id(template_id)
        except TemplateError as exc:
            raise _bad(f"field 'id': {exc}") from None
        share = body.get("share_memory", bool) is True
        policy = body.prefetch_policy()  # checked before anything is made
        source = body.get("source", str)
        if source is not None:  # a template pushed to object storage: kind firecracker
            record = self.manager.create_template_from(template_id, source, body.text("name"))
            return self._created_template(record, share, policy)
        try:
            kind = kind_of(body.get("kind", str, required=True))
        except TemplateError as exc:
            raise _bad(f"field 'kind': {exc}") from None
        name = body.text("name")
        if kind == "firecracker":
            record = self.registry.create_from_snapshot(
                template_id,
                body.get("mem_file", str, required=True),
                body.get("snapshot_path", str, required=True),
                name=name,
                page_size=body.number("page_size", 4096, 1 << 30, integer=True) or 4096,
                copy=bool(body.get("copy", bool)),
            )
        else:
            record = self.registry.create_microvm(template_id, _microvm_spec(body), name=name)
        return self._created_template(record, share, policy)

    def _created_template(
        self, record: TemplateRecord, share: bool, policy: PrefetchPolicy | None
    ) -> Response:
        """201 with the record; with ``share``, sharing is turned on first, and ``note`` says
        so in one line when KSM is off on this host (pagefork never turns it on); ``policy``
        is kept in the record (None: the template follows the daemon's default)."""
        doc: dict[str, Any] = {}
        if policy is not None:

            def keep_policy(r: TemplateRecord) -> None:
                r.prefetch_policy, r.prefetch_head = policy.policy, policy.head

            record = self.registry.update_with(record.id, keep_policy)
        if share:
            record = self.registry.set_share_memory(record.id, True)
            note = off_note()
            if note is not None:
                doc["note"] = note
        return Response.json(HTTPStatus.CREATED, {**record.to_dict(), **doc})

    def _get_template(self, template_id: str, raw: bytes) -> Response:
        record = self.registry.get(self._template_id(template_id))
        hot = self.manager.hot_set(template_id)
        doc = self._record(record, self.manager.fork_counts())
        doc["hot_pages"] = len(hot) if hot is not None else 0
        return Response.json(HTTPStatus.OK, doc)

    def _delete_template(self, template_id: str, raw: bytes) -> Response:
        self.manager.delete_template(self._template_id(template_id))
        return Response.json(HTTPStatus.OK, {"deleted": template_id})

    def _post_rerecord(self, template_id: str, raw: bytes) -> Response:
        self.manager.rerecord(self._template_id(template_id))
        return Response.json(HTTPStatus.OK, {"template": template_id, "rerecord": True})

    def _post_flatten(self, template_id: str, raw: bytes) -> Response:
        record = self.registry.flatten(self._template_id(template_id))
        return Response.json(HTTPStatus.OK, record.to_dict())

    # --- forks -------------------------------------------------------------------------------
    def _fork_id(self, fork_id: str) -> str:
        if not self.manager.has_fork(fork_id):
            raise _not_found(f"unknown fork {fork_id!r}")
        return fork_id

    def _get_forks(self, raw: bytes) -> Response:
        return Response.json(HTTPStatus.OK, {"forks": [f.to_dict() for f in self.manager.forks()]})

    def _post_forks(self, raw: bytes) -> Response:
        body = _Body(raw, required=True)
        template_id = body.get("template", str, required=True)
        if not self.registry.exists(template_id):
            raise _not_found(f"unknown template {template_id!r}")
        fork_id = body.get("fork", str)
        if fork_id is not None:
            try:
                validate_fork_id(fork_id)
            except ForkError as exc:
                raise _bad(f"field 'fork': {exc}") from None
        vmm = body.get("vmm", str)
        if vmm is not None and vmm not in self.manager.drivers:
            known = ", ".join(sorted(self.manager.drivers)) or "none available"
            raise _bad(f"field 'vmm': unknown VMM driver {vmm!r} (known: {known})")
        options = body.get("options", dict) or {}
        policy = body.prefetch_policy()
        fork = self.manager.create_fork(template_id, fork_id, vmm, options, policy)
        return Response.json(HTTPStatus.CREATED, fork.to_dict())

    def _get_fork(self, fork_id: str, raw: bytes) -> Response:
        fork = self.manager.fork(self._fork_id(fork_id))
        stats = self.manager.stats(fork_id)
        memory = try_measure(fork.handle.pid if fork.handle is not None else stats.pid)
        return Response.json(
            HTTPStatus.OK,
            {
                **fork.to_dict(),
                "stats": stats.to_dict(),
                "memory": memory.to_dict() if memory is not None else None,
            },
        )

    def _post_prefetch(self, fork_id: str, raw: bytes) -> Response:
        body = _Body(raw, required=False)
        timeout = body.number("timeout", 0.001, 600)
        result = self.manager.prefetch(self._fork_id(fork_id), timeout)
        return Response.json(HTTPStatus.OK, {"fork": fork_id, **result})

    def _post_wait(self, fork_id: str, raw: bytes) -> Response:
        body = _Body(raw, required=False)
        timeout = body.number("timeout", 0.001, 3600)
        result = self.manager.wait(self._fork_id(fork_id), 60.0 if timeout is None else timeout)
        return Response.json(HTTPStatus.OK, {"fork": fork_id, **result})

    def _post_snapshot(self, fork_id: str, raw: bytes) -> Response:
        body = _Body(raw, required=True)
        template_id = body.get("template", str, required=True)
        try:
            validate_template_id(template_id)
        except TemplateError as exc:
            raise _bad(f"field 'template': {exc}") from None
        release = bool(body.get("release", bool))
        result, stats = self.manager.snapshot(self._fork_id(fork_id), template_id, release=release)
        doc = {"fork": fork_id, "template": result.template.to_dict(), **result.to_dict()}
        if stats is not None:
            doc["released"] = stats.to_dict()
        return Response.json(HTTPStatus.CREATED, doc)

    def _delete_fork(self, fork_id: str, raw: bytes) -> Response:
        fork = self.manager.fork(self._fork_id(fork_id))
        # Measured before the release stops the VMM: afterwards there is nothing to read.
        pid = fork.handle.pid if fork.handle is not None else self.manager.stats(fork_id).pid
        memory = try_measure(pid)
        stats = self.manager.release(fork_id)
        return Response.json(
            HTTPStatus.OK,
            {
                "released": fork_id,
                "stats": stats.to_dict(),
                "memory": memory.to_dict() if memory is not None else None,
            },
        )

    # --- the API's own description -------------------------------------------------------------
    def _get_openapi(self, raw: bytes) -> Response:
        return Response(HTTPStatus.OK, _openapi_body())

    # --- metrics -----------------------------------------------------------------------------
    def _get_metrics(self, raw: bytes) -> Response:
        records = self.registry.listing().templates
        templates = [r.id for r in records]
        counts = self.manager.fork_counts()
        hot: dict[str, int] = {}
        for t in templates:
            try:
                pages = self.manager.hot_set(t)
            except TemplateError:
                continue  # deleted meanwhile
            hot[t] = len(pages) if pages is not None else 0
        # By template id (one record per id): the same counts GET /templates shows.
        forks: dict[str, dict[str, int]] = {
            r.id: {str(w): n for w, n in counts.get((r.id, r.created), {}).items()} for r in records
        }
        live = self.manager.live_stats()
        memory = {
            t: [(s.fork, m) for s in forks_of if (m := try_measure(s.pid)) is not None]
            for t, forks_of in live.items()
        }
        text = self.metrics.render(live, templates, hot, forks, memory=memory)
        return Response(HTTPStatus.OK, text, METRICS_CONTENT_TYPE)


@functools.cache
def _openapi_body() -> bytes:
    from pagefork.daemon.openapi import render

    return render().encode()


def _microvm_spec(body: _Body) -> Any:
    from pagefork.vmm.kvm.template import TemplateSpec
    from pagefork.vmm.kvm.trace import TraceSpec

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    try:
        trace = TraceSpec(
            working_set=pick(body.number("working_set", 0, 1), TraceSpec.working_set),
            fork_share=pick(body.number("fork_share", 0, 1), TraceSpec.fork_share),
            seed=pick(body.number("seed", 0, 1 << 31, integer=True), TraceSpec.seed),
        )
    except ValueError as exc:
        raise _bad(str(exc)) from None
    return TemplateSpec(
        mem_size=pick(body.number("mem_size_mib", 4, 3072, integer=True), 64) << 20,
        vcpus=pick(body.number("vcpus", 1, 64, integer=True), 1),
        variants=pick(body.number("variants", 1, 1024, integer=True), TemplateSpec.variants),
        trace=trace,
    )


def request_pool(method: str, target: str) -> PoolName:
    """Which of the server's pools answers a request: ``wait`` for the requests that only
    wait for a guest to be done (any number of waiters must not hold up a fork's creation),
    ``long`` for the others that may wait on a VMM (:func:`takes_long`), else ``quick``."""
    path = target.split("?", 1)[0]
    if method == "POST" and path.startswith("/forks/") and path.endswith("/wait"):
        return "wait"
    return "long" if takes_long(method, target) else "quick"


def takes_long(method: str, target: str) -> bool:
    """The requests that may wait on a VMM for long (restore, prefetch, a guest's end): they
    are answered by a pool of their own, so a burst of them never holds up the others."""
    path = target.split("?", 1)[0]
    if method == "POST" and path.endswith("/flatten"):
        return True  # writes a whole mem-file
    if method == "POST" and path.endswith("/snapshot"):
        return True  # pauses a VMM and writes a layer
    if method == "POST" and path == "/templates":
        return True  # may fetch from object storage or build a microVM (the body says which)
    return method == "POST" and (
        path == "/forks" or path.endswith("/wait") or path.endswith("/prefetch")
    )


class ControlServer(HttpServer):
    """The control API served over HTTP on a mode-0600 Unix socket at ``path``.

    The server owns its listening socket; :meth:`from_socket` serves on one that is already
    bound (for instance handed over by a previous daemon).
    """

    def __init__(self, path: str, api: ControlApi, limits: ServerLimits | None = None) -> None:
        # Bound in a private directory and renamed into place: never reachable with looser
        # permissions, whatever the umask.
        sock = bind_private_socket(path)
        try:
            super().__init__(sock, api.handle, limits, is_long=request_pool)
        except BaseException:
            sock.close()
            raise
        self.api = api
        self.path = path

    @classmethod
    def from_socket(
        cls, sock: socket.socket, api: ControlApi, limits: ServerLimits | None = None
    ) -> ControlServer:
        """Serve ``api`` on ``sock``, a listening Unix stream socket; the server then owns it."""
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise DaemonError(f"control socket fd {sock.fileno()}: not a Unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise DaemonError(f"control socket fd {sock.fileno()}: not listening")
        server = cls.__new__(cls)
        HttpServer.__init__(server, sock, api.handle, limits, is_long=request_pool)
        server.api = api
        name = sock.getsockname()
        server.path = name if isinstance(name, str) else name.decode(errors="replace")
        return server


__all__ = ["ControlApi", "ControlServer", "HttpError", "Response", "ServerLimits"]
