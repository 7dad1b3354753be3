"""Every message between the supervisor and its workers, as a declared type.

The channel (:mod:`pagefork.serving.ipc`) carries frames; this module says what is in them.
Each message is a frozen dataclass below, so a reader follows one from its sender to its
handler by name. :func:`encode` and :func:`decode` are the only (de)serialisers: values are
plain data (ints, strings, floats, bools, None, tuples, lists, frozensets) or one of the
types in :data:`_TYPES`, written with :mod:`marshal` (which builds no arbitrary objects, unlike
pickle). A decoder meeting a name it does not know raises :class:`ProtocolError`.

The first message each way is a hello carrying :data:`PROTOCOL_VERSION`: the supervisor's
:class:`Hello`, the worker's :class:`Ready`. A worker of another version is refused in one
line (it can only come from a mixed install, say an upgrade under a running supervisor).
"""

from __future__ import annotations

import array
import dataclasses
import enum
import marshal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pagefork.errors import PageforkError
from pagefork.prefetch import PrefetchPlan, PrefetchResult
from pagefork.regions import Region

_T = TypeVar("_T")


# --- how the message types are built ---------------------------------------------------------
# Every worker imports this module when it starts, and a new worker's start is what a fork
# waits for after its worker died. ``dataclass(frozen=True)`` compiles six methods per class
# from generated source (about a millisecond each class, two dozen classes here); the methods
# below are the same for every message and compiled once, with this module. What a message
# is stays the same: a frozen dataclass (``dataclasses.fields``, ``replace`` and
# ``FrozenInstanceError`` work on it, and the type checker sees ``dataclass`` itself).


@dataclasses.dataclass(frozen=True)
class _Frozen:
    """A dataclass declared as every message is: its parameters are theirs."""


_FROZEN_PARAMS = _Frozen.__dataclass_params__  # type: ignore[attr-defined]
del _Frozen  # not a message


def _make_init(cls: type, names: tuple[str, ...], defaults: dict[str, Any]) -> Callable[..., None]:
    put = object.__setattr__
    where = cls.__qualname__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(names):
            raise TypeError(f"{where}() takes {len(names)} arguments but {len(args)} were given")
        for name in kwargs:
            if name not in names[len(args) :]:
                raise TypeError(f"{where}() got an unexpected argument {name!r}")
        for name, value in zip(names, args, strict=False):
            put(self, name, value)
        for name in names[len(args) :]:
            if name in kwargs:
                put(self, name, kwargs[name])
            elif name in defaults:
                put(self, name, defaults[name])
            else:
                raise TypeError(f"{where}() missing argument {name!r}")

    return __init__


def _values(self: Any) -> tuple[Any, ...]:
    return tuple([getattr(self, name) for name in self.__match_args__])


def _repr(self: Any) -> str:
    fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__match_args__)
    return f"{type(self).__qualname__}({fields})"


def _eq(self: Any, other: object) -> object:
    if type(other) is not type(self):
        return NotImplemented
    return _values(self) == _values(other)


def _hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self: Any, name: str) -> None:
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


def _getstate(self: Any) -> tuple[Any, ...]:
    return _values(self)


def _setstate(self: Any, state: tuple[Any, ...]) -> None:
    for name, value in zip(self.__match_args__, state, strict=True):
        object.__setattr__(self, name, value)


def _frozen_dataclass(*, frozen: bool, slots: bool) -> Callable[[type[_T]], type[_T]]:
    assert frozen and slots  # the one kind this module declares

    def build(cls: type[_T]) -> type[_T]:
        # The dataclass machinery with nothing generated: fields, slots, __match_args__.
        cls = dataclasses.dataclass(cls, init=False, repr=False, eq=False, slots=True)
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
        names = tuple(f.name for f in fields)
        for name, value in (
            ("__init__", _make_init(cls, names, defaults)),
            ("__repr__", _repr), ("__eq__", _eq), ("__hash__", _hash),
            ("__setattr__", _frozen_setattr), ("__delattr__", _frozen_delattr),
            ("__getstate__", _getstate), ("__setstate__", _setstate),
            ("__dataclass_params__", _FROZEN_PARAMS),
        ):  # fmt: skip
            setattr(cls, name, value)
        return cls

    return build


if TYPE_CHECKING:
    from dataclasses import dataclass
else:
    dataclass = _frozen_dataclass

#: Bumped whenever a message below changes shape.
PROTOCOL_VERSION = 6

#: Prefetch plans a worker keeps, so forks of one template send theirs once per worker (the
#: supervisor's copy of what each worker kept follows the same bound).
PLANS_KEPT = 16


class ProtocolError(PageforkError):
    """A frame that is not a message of this protocol (or of another version)."""


# --- what travels inside messages -----------------------------------------------------------
class EndState(str, enum.Enum):
    """How a worker says a fork ended (the supervisor's lifecycle names the same two)."""

    ENDED = "ended"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ForkSpec:
    """A fork handed to a worker: what it needs besides the fds that come with it.

    ``fds`` names the fds of the frame in order (``uffd``, ``ledger``, ``pidfd``, ``conn``).
    """

    key: str
    fork: str
    pid: int | None
    on_failure: str
    regions: tuple[Region, ...]
    record_capacity: int
    record_max_pages: int | None
    record_max_seconds: float | None
    fds: tuple[str, ...]
    adopt: bool
    hangup_ends: bool
    # Only for a new supervisor, should this one die (what a takeover's state carries).
    record: bool = False
    ephemeral: bool = False
    socket: str | None = None
    window_reported: bool = False
    next_conn: int = 0


# --- supervisor -> worker --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """The supervisor's first message: the protocol it speaks."""

    version: int


@dataclass(frozen=True, slots=True)
class Serve:
    """Serve this fork (its fds come with the frame); ``spec.adopt``: a dead worker's."""

    spec: ForkSpec


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Install ``plan`` into fork ``key``. With a ``token`` and no plan: the plan sent before
    under that token."""

    req: int
    key: str
    token: int | None
    plan: PrefetchPlan | None
    timeout: float
    #: Stream: answer :class:`PrefetchHead` once this many hot pages are in, then go on.
    head: int | None = None


@dataclass(frozen=True, slots=True)
class ChunkReady:
    """A lazy template's chunk is verified and in the view: serve the faults parked on it."""

    chunk: int


@dataclass(frozen=True, slots=True)
class ChunkFailed:
    """A lazy template's chunk could not be had: fail the forks whose faults wait on it."""

    chunk: int
    error: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Stop serving fork ``key`` (it was unregistered)."""

    key: str


@dataclass(frozen=True, slots=True)
class Release:
    """Let these forks go without ending them: for a takeover (close their fds), or, with
    ``park``, for a move to another worker (drop their ledgers' locks and stop watching them,
    but keep their fds until a :class:`Forget`: should this supervisor die before the other
    worker adopts them, this one serves them on)."""

    keys: tuple[str, ...]
    park: bool = False


@dataclass(frozen=True, slots=True)
class Forget:
    """Another worker serves these parked forks now (it holds their ledgers' locks): close
    their fds."""

    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you answering? (the heartbeat; answered by :class:`Pong` from the worker's loop)."""

    seq: int


@dataclass(frozen=True, slots=True)
class OrphanSetup:
    """If this supervisor dies, serve on and wait for the next one: ``handler`` names the
    module that carries it out in the worker (a layer above the page server's), ``settings``
    is its JSON (where to wait, what to tell an adopter, for how long)."""

    handler: str
    settings: str


@dataclass(frozen=True, slots=True)
class Stop:
    """An orderly stop: the channel's end that follows is not the supervisor's death."""


@dataclass(frozen=True, slots=True)
class CrashAt:
    """Tests only: SIGKILL yourself the ``count``-th time you reach ``point`` (SIGSTOP, with
    ``stop``: the test sends SIGCONT)."""

    point: str
    count: int
    req: int
    stop: bool = False


# --- worker -> supervisor --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Ready:
    """The worker's first message: it has mapped the template and serves."""

    version: int
    pid: int


@dataclass(frozen=True, slots=True)
class Serving:
    """The worker serves fork ``key`` now (sent for every :class:`Serve`)."""

    key: str


@dataclass(frozen=True, slots=True)
class Ended:
    """Fork ``key`` ended: its VMM exited or it was dropped (``ENDED``), or it failed."""

    key: str
    state: EndState
    error: str | None


@dataclass(frozen=True, slots=True)
class WindowClosed:
    """Fork ``key``'s recording window closed (its ledger holds the final hot set)."""

    key: str


@dataclass(frozen=True, slots=True)
class HungUp:
    """Fork ``key``'s VMM closed its socket; its exit (pidfd) ends the fork."""

    key: str


@dataclass(frozen=True, slots=True)
class Remapped:
    """Fork ``key``'s VMM moved a region (``mremap``): these are its regions now."""

    key: str
    regions: tuple[Region, ...]


@dataclass(frozen=True, slots=True)
class Released:
    """The forks of a :class:`Release` are let go: their ledgers are final."""

    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Refused:
    """Fork ``key`` was not taken: another process holds its ledger's lock (serves it)."""

    key: str


@dataclass(frozen=True, slots=True)
class Need:
    """Faults wait on this chunk of a lazy template: fetch it (the block holding file
    ``offset``, the first fault's, first when the template has block digests)."""

    chunk: int
    offset: int = -1


@dataclass(frozen=True, slots=True)
class Prefetched:
    """A :class:`Prefetch` finished: its ``result``, or ``error`` and pages ``installed``."""

    req: int
    result: PrefetchResult | None
    error: str | None
    installed: int


@dataclass(frozen=True, slots=True)
class PrefetchHead:
    """A streamed :class:`Prefetch` has its head in (``result`` so far): the guest may run
    while the rest streams; :class:`Prefetched` follows."""

    req: int
    result: PrefetchResult


@dataclass(frozen=True, slots=True)
class Pong:
    """The answer to :class:`Ping`."""

    seq: int


@dataclass(frozen=True, slots=True)
class OrphanPrepared:
    """The answer to :class:`OrphanSetup`: the worker has carried it out (its handler is
    imported and prepared), so its start-up is paid in full."""


@dataclass(frozen=True, slots=True)
class Armed:
    """Tests only: the :class:`CrashAt` numbered ``req`` is armed."""

    req: int


ToWorker = (
    Hello
    | Serve
    | Prefetch
    | ChunkReady
    | ChunkFailed
    | Drop
    | Release
    | Forget
    | Ping
    | OrphanSetup
    | Stop
    | CrashAt
)
ToSupervisor = (
    Ready
    | Serving
    | Ended
    | WindowClosed
    | HungUp
    | Remapped
    | Released
    | Refused
    | Need
    | Prefetched
    | PrefetchHead
    | Pong
    | OrphanPrepared
    | Armed
)
Message = ToWorker | ToSupervisor

_MESSAGES: tuple[type, ...] = (
    Hello, Serve, Prefetch, ChunkReady, ChunkFailed, Drop, Release, Forget, Ping, OrphanSetup,
    Stop, CrashAt,
    Ready, Serving, Ended, WindowClosed, HungUp, Remapped, Released, Refused, Need, Prefetched,
    PrefetchHead, Pong, OrphanPrepared, Armed,
)  # fmt: skip
#: Every type a frame may name: the messages and the values they carry.
_TYPES: dict[str, type] = {
    t.__name__: t for t in (*_MESSAGES, ForkSpec, Region, PrefetchResult, EndState)
}
_PLAN = "PrefetchPlan"


def _to_wire(value: Any) -> Any:
    # A dict on the wire is always a typed value: messages carry no dicts of their own.
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        if isinstance(value, enum.Enum):
            return {"@": type(value).__name__, "v": value.value}
        return value
    if isinstance(value, PrefetchPlan):
        # Its run table is one int64 buffer: a plan of many runs packs in microseconds.
        rest = [f.name for f in dataclasses.fields(value) if f.name != "table"]
        return {
            "@": _PLAN,
            "table": value.table.tobytes(),
            "f": tuple(_to_wire(getattr(value, name)) for name in rest),
        }
    if isinstance(value, (tuple, list)):
        return type(value)(_to_wire(v) for v in value)
    if isinstance(value, frozenset):
        return value
    name = type(value).__name__
    if _TYPES.get(name) is type(value) and dataclasses.is_dataclass(value):
        return {
            "@": name,
            "f": tuple(_to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)),
        }
    raise ProtocolError(f"cannot send a {name} over the worker channel")


def _from_wire(value: Any) -> Any:
    if isinstance(value, dict):
        name = value.get("@")
        if name == _PLAN:
            table = array.array("q")
            table.frombytes(value["table"])
            return PrefetchPlan(table, *(_from_wire(v) for v in value["f"]))
        cls = _TYPES.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ProtocolError(f"unknown message type {name!r} on the worker channel")
        if issubclass(cls, enum.Enum):
            return cls(value["v"])
        try:
            return cls(*(_from_wire(v) for v in value["f"]))
        except TypeError as exc:
            raise ProtocolError(f"malformed {name} on the worker channel: {exc}") from None
    if isinstance(value, (tuple, list)):
        return type(value)(_from_wire(v) for v in value)
    return value


def encode(message: Message) -> bytes:
    """The bytes of one frame's body for ``message``."""
    if type(message) not in _MESSAGES:
        raise ProtocolError(f"{type(message).__name__} is not a worker-channel message")
    return marshal.dumps(_to_wire(message))


def decode(body: bytes) -> Message:
    """The message in one frame's body; :class:`ProtocolError` if it is not one."""
    try:
        raw = marshal.loads(body)
    except (EOFError, ValueError, TypeError) as exc:
        raise ProtocolError(f"undecodable frame on the worker channel: {exc}") from None
    message = _from_wire(raw)
    if type(message) not in _MESSAGES:
        raise ProtocolError(f"a {type(message).__name__} is not a message on the worker channel")
    return message  # type: ignore[no-any-return]


def check_version(version: int, who: str) -> None:
    """Raise :class:`ProtocolError` unless ``version`` is this side's protocol version."""
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{who} speaks worker protocol version {version}, this process version "
            f"{PROTOCOL_VERSION}: mixed pagefork installs (restart the service after an upgrade)"
        )
