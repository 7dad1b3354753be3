"""A template's record (``template.json``): its fields, how it is read and checked, the names
of the files in a template's directory, and the errors of the registry. Plain data: no I/O
but :meth:`TemplateRecord.has_hot_pages`."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pagefork.errors import PageforkError, TemplateError
from pagefork.regions import PAGE_SIZE

TemplateKind = Literal["firecracker", "kvm"]
TEMPLATE_KINDS: tuple[TemplateKind, ...] = ("firecracker", "kvm")
RECORD_FILE = "template.json"
RECORD_FORMAT = "pagefork-template"
RECORD_VERSION = 1
HOT_PAGES_FILE = "hot-pages.hpl"
#: A child template's own layer, and its flattened mem-file, in its directory.
LAYER_FILE = "layer.pfl"
FLAT_MEM_FILE = "flat.mem"
#: A child template's VM state (a file or a directory), in its directory.
CHILD_STATE = "vmstate"
MICROVM_DIR = "microvm"
SNAPSHOT_DIR = "snapshot"

_TEMPLATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Fields every record has; ``live_forks`` is derived, never stored.
_DERIVED_FIELDS = ("live_forks",)
#: Fields records of older versions lack (they are roots, and do not share memory).
_OPTIONAL_FIELDS = ("parent", "layers", "share_memory", "prefetch_policy", "prefetch_head")


class UnknownTemplateError(TemplateError):
    """No template has this id (the control API answers 404)."""


class TemplateStorageError(PageforkError):
    """The state directory cannot take a template's files (a full disk, a read-only mount);
    nothing of the template was kept. Not the request's fault: the control API answers 5xx."""


class TemplateFieldError(TemplateError):
    """A template creation request is invalid; ``fields`` names what was wrong (the control
    API answers 400 naming them)."""

    def __init__(self, fields: str | tuple[str, ...], message: str) -> None:
        self.fields = (fields,) if isinstance(fields, str) else fields
        names = ", ".join(repr(f) for f in self.fields)
        super().__init__(f"field{'s' if len(self.fields) > 1 else ''} {names}: {message}")


def validate_template_id(template_id: object) -> str:
    """Return ``template_id`` if it is safe as a directory name (no separators, no traversal)."""
    if not isinstance(template_id, str) or not _TEMPLATE_ID.fullmatch(template_id):
        raise TemplateError(
            f"invalid template id {template_id!r}: use 1-64 characters from [A-Za-z0-9._-], "
            "starting with a letter or digit"
        )
    return template_id


@dataclass
class TemplateRecord:
    """One template's ``template.json``.

    ``snapshot_path`` is Firecracker's snapshot (VM state) file, or the microVM's template
    directory for kind ``kvm``; ``owns_files`` says whether delete removes ``mem_file`` and
    ``snapshot_path`` (they sit in the template directory) or leaves them (referenced).
    Times are Unix seconds. ``live_forks`` is not stored: the registry fills it from the forks
    the daemon holds when it reads the record. ``parent`` is the template a child was
    snapshotted from (None for a root, or once flattened) and ``layers`` the layer files over
    ``mem_file``, bottom first (records of older versions have neither: a root).
    ``share_memory``: its forks' VMMs are marked mergeable for KSM (opt-in; see
    :mod:`pagefork.ksm`). ``prefetch_policy`` and ``prefetch_head``: how the daemon installs
    its forks' hot set around their resume (None: the daemon's default; checked by the daemon,
    :class:`pagefork.daemon.config.PrefetchPolicy`).
    """

    id: str
    name: str
    kind: TemplateKind
    mem_file: str
    snapshot_path: str
    mem_size: int
    page_size: int
    hot_pages_path: str
    created: float
    last_used: float | None = None
    owns_files: bool = True
    live_forks: int = field(default=0, compare=False)
    parent: str | None = None
    layers: list[str] = field(default_factory=list)
    share_memory: bool = False
    prefetch_policy: str | None = None
    prefetch_head: int | None = None

    @property
    def mem_pages(self) -> int:
        """Guest memory in pages of :attr:`page_size`."""
        return self.mem_size // self.page_size

    def has_hot_pages(self) -> bool:
        """True once a hot set has been saved for this template."""
        return os.path.exists(self.hot_pages_path)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data (the API's template object)."""
        return {**asdict(self), "has_hot_pages": self.has_hot_pages()}

    @classmethod
    def from_dict(cls, doc: object, where: str) -> TemplateRecord:
        """Parse a record; :class:`TemplateError` naming ``where`` and the field if malformed."""
        if not isinstance(doc, dict):
            raise TemplateError(f"{where}: not a JSON object")
        if doc.get("format") != RECORD_FORMAT:
            raise TemplateError(f"{where}: format is {doc.get('format')!r}, not {RECORD_FORMAT!r}")
        kinds: dict[str, tuple[type, ...]] = {
            "id": (str,),
            "name": (str,),
            "kind": (str,),
            "mem_file": (str,),
            "snapshot_path": (str,),
            "mem_size": (int,),
            "page_size": (int,),
            "hot_pages_path": (str,),
            "created": (int, float),
            "last_used": (int, float, type(None)),
            "owns_files": (bool,),
            "parent": (str, type(None)),
            "layers": (list,),
            "share_memory": (bool,),
            "prefetch_policy": (str, type(None)),
            "prefetch_head": (int, type(None)),
        }
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in _DERIVED_FIELDS:
                continue  # an older version stored it; the stored value means nothing now
            if f.name in _OPTIONAL_FIELDS and f.name not in doc:
                continue  # a record of a version before layers: a root template
            if f.name not in doc:
                raise TemplateError(f"{where}: field {f.name!r} is missing")
            value = doc[f.name]
            if not isinstance(value, kinds[f.name]) or (
                isinstance(value, bool) and f.name not in ("owns_files", "share_memory")
            ):
                raise TemplateError(f"{where}: field {f.name!r} has a wrong type")
            values[f.name] = value
        if values["kind"] not in TEMPLATE_KINDS:
            raise TemplateError(f"{where}: field 'kind' is {values['kind']!r}")
        if values["mem_size"] <= 0 or values["page_size"] < PAGE_SIZE:
            raise TemplateError(f"{where}: mem_size or page_size out of range")
        if not all(isinstance(p, str) for p in values.get("layers", [])):
            raise TemplateError(f"{where}: field 'layers' has a wrong type")
        return cls(**values)


@dataclass(frozen=True)
class TemplateListing:
    """Every readable template, and one message per template whose record is broken."""

    templates: list[TemplateRecord]
    errors: list[str]


def record_doc(record: TemplateRecord) -> dict[str, Any]:
    """The JSON document of ``record`` as ``template.json`` stores it (no derived fields)."""
    doc = asdict(record)
    for name in _DERIVED_FIELDS:
        del doc[name]
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION, **doc}


def kind_of(value: object) -> TemplateKind:
    """``value`` as a template kind; :class:`TemplateError` naming the allowed ones."""
    for kind in TEMPLATE_KINDS:
        if value == kind:
            return kind
    raise TemplateError(f"kind must be one of {', '.join(TEMPLATE_KINDS)}, not {value!r}")


__all__ = [
    "CHILD_STATE",
    "FLAT_MEM_FILE",
    "HOT_PAGES_FILE",
    "LAYER_FILE",
    "MICROVM_DIR",
    "RECORD_FILE",
    "RECORD_FORMAT",
    "RECORD_VERSION",
    "SNAPSHOT_DIR",
    "TEMPLATE_KINDS",
    "TemplateFieldError",
    "TemplateKind",
    "TemplateListing",
    "TemplateRecord",
    "TemplateStorageError",
    "UnknownTemplateError",
    "kind_of",
    "record_doc",
    "validate_template_id",
]
