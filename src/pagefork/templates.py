"""The template registry: what forks are restored from, kept on disk under a state directory.

Layout (one directory per template, named by its id)::

    STATE_DIR/templates/<id>/template.json    the record (written atomically)
    STATE_DIR/templates/<id>/hot-pages.hpl    the hot set, once a warm-up fork has recorded it
    STATE_DIR/templates/<id>/microvm/         kind "kvm": the built-in microVM's template
    STATE_DIR/templates/<id>/snapshot/        kind "firecracker", when created with copy=True

A Firecracker snapshot is *referenced* by default: mem-files are often GiBs and already live
where the platform keeps its snapshots, so the record stores their absolute paths and delete
leaves them alone. ``copy=True`` copies both files into the template directory instead; the
registry then owns them and delete removes them.

A *child* template (a snapshot of a fork, :meth:`TemplateRegistry.create_child`) is its
parent's memory plus layers (:mod:`pagefork.layers`): its record names its ``parent`` and its
``layers``, bottom first: the parent's layers, then its own ``layer.pfl`` in its directory.
Its ``mem_file`` is the root's base mem-file. A template with children cannot be deleted (the
error names them); :meth:`TemplateRegistry.flatten` merges a child's chain into its own
mem-file, after which it depends on nothing.

A template's live forks are *not* stored: a stored count drifts from reality when a write fails
(a full disk at release) or the daemon crashes. The fork manager, which holds the forks, answers
:attr:`TemplateRegistry.live_forks` instead; ``TemplateRecord.live_forks`` is filled from it on
every read, and a delete is refused while it is not zero. Records written by older versions
carry a ``live_forks`` field: it is ignored.

:meth:`TemplateRegistry.clean_leftovers` removes what a crash left half made (``.new-*``), half
deleted (``.del-*``) or half written (the temporary files of a record or hot-set save). It is
for the one daemon that owns the state directory (it holds ``daemon.lock``) and must run only
once it does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pagefork.errors import PageforkError, TemplateError
from pagefork.handshake import PAGE_SIZES
from pagefork.layers.source import MAX_DEPTH
from pagefork.regions import PAGE_SIZE

if TYPE_CHECKING:
    from pagefork.vmm.kvm.template import TemplateSpec

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
#: Hidden directories of a creation in progress and of a deletion in progress.
_NEW_PREFIX = ".new-"
_DEL_PREFIX = ".del-"
#: Temporary files of an interrupted atomic save inside a template directory (the record's, or
#: the hot set's): ``.<name>.<mkstemp letters>.tmp``.
_TMP_LEFTOVER = re.compile(
    rf"\.({re.escape(RECORD_FILE)}|{re.escape(HOT_PAGES_FILE)})\.[A-Za-z0-9_]+\.tmp"
)
#: Fields every record has; ``live_forks`` is derived, never stored.
_DERIVED_FIELDS = ("live_forks",)
#: Fields records of older versions lack (they are roots, and do not share memory).
_OPTIONAL_FIELDS = ("parent", "layers", "share_memory")

log = logging.getLogger("pagefork")


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
    :mod:`pagefork.ksm`).
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


def _write_atomically(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON to ``path`` so readers see the old or the new file, never a torn one:
    temp file in the same directory, fsync, rename, fsync the directory."""
    data = (json.dumps(doc, indent=1) + "\n").encode()
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise TemplateStorageError(f"{path}: cannot write: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise TemplateStorageError(f"{path}: cannot write: {exc.strerror}") from None


class TemplateRegistry:
    """Templates under ``STATE_DIR/templates``; every method is safe from any thread."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.root = self.state_dir / "templates"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TemplateError(f"cannot create {self.root}: {exc.strerror}") from None
        # One lock for every read-modify-write of a record, and for delete.
        self._lock = threading.Lock()
        #: The most layers a chain registered here may have (at most ``MAX_DEPTH``, what a
        #: page server opens; lower only to exercise the limit).
        self.max_depth = MAX_DEPTH
        #: How many live forks a template (id, ``created``) has: set by the fork manager, which
        #: holds them. Called with the registry's lock held, so it must not block or take a
        #: lock of its caller. None: no forks anywhere (a registry used on its own).
        self.live_forks: Callable[[str, float], int] | None = None

    def _count_live_forks(self, record: TemplateRecord) -> int:
        return self.live_forks(record.id, record.created) if self.live_forks is not None else 0

    # --- paths -------------------------------------------------------------------------------
    def directory(self, template_id: str) -> Path:
        """The directory of template ``template_id`` (validated; it may not exist)."""
        return self.root / validate_template_id(template_id)

    def exists(self, template_id: str) -> bool:
        """True if a template directory with this id exists (its record may still be broken)."""
        try:
            return (self.directory(template_id) / RECORD_FILE).exists()
        except TemplateError:
            return False

    # --- reading -----------------------------------------------------------------------------
    def get(self, template_id: str) -> TemplateRecord:
        """The record of ``template_id``; :class:`TemplateError` if unknown or broken."""
        path = self.directory(template_id) / RECORD_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UnknownTemplateError(f"unknown template {template_id!r}") from None
        except OSError as exc:
            raise TemplateError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise TemplateError(f"{path}: not valid JSON ({exc})") from None
        record = TemplateRecord.from_dict(doc, str(path))
        if record.id != template_id:
            raise TemplateError(f"{path}: records id {record.id!r}, not {template_id!r}")
        record.live_forks = self._count_live_forks(record)
        return record

    def listing(self) -> TemplateListing:
        """Every template, sorted by id; broken records are reported, not fatal."""
        records: list[TemplateRecord] = []
        errors: list[str] = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or not (entry / RECORD_FILE).exists():
                continue  # a creation in progress, or not ours
            try:
                records.append(self.get(entry.name))
            except TemplateError as exc:
                errors.append(str(exc))
        return TemplateListing(records, errors)

    # --- creating ----------------------------------------------------------------------------
    def create_from_snapshot(
        self,
        template_id: str,
        mem_file: str | os.PathLike[str],
        snapshot_path: str | os.PathLike[str],
        *,
        name: str | None = None,
        page_size: int = PAGE_SIZE,
        copy: bool = False,
    ) -> TemplateRecord:
        """Register a Firecracker snapshot (mem-file + VM state file) as template ``template_id``.

        The files are referenced by absolute path, or copied into the template when ``copy``.
        """
        if (
            isinstance(page_size, bool)
            or not isinstance(page_size, int)
            or page_size not in PAGE_SIZES
        ):
            raise TemplateFieldError(
                "page_size", f"page size {page_size!r} is neither 4 KiB nor 2 MiB"
            )
        mem = Path(mem_file).absolute()
        state = Path(snapshot_path).absolute()
        for field_name, what, p in (
            ("mem_file", "mem-file", mem),
            ("snapshot_path", "snapshot file", state),
        ):
            if not p.is_file():
                raise TemplateFieldError(field_name, f"{what} {p} does not exist or is not a file")
        try:
            size = mem.stat().st_size
        except OSError as exc:
            raise TemplateFieldError("mem_file", f"mem-file {mem}: {exc.strerror}") from None
        if size == 0 or size % page_size:
            raise TemplateFieldError(
                "mem_file", f"mem-file {mem}: {size} bytes is not a multiple of {page_size}"
            )

        def fill(tmp: Path, final: Path) -> TemplateRecord:
            mem_path, state_path = mem, state
            if copy:
                (tmp / SNAPSHOT_DIR).mkdir()
                try:
                    shutil.copyfile(mem, tmp / SNAPSHOT_DIR / "mem-file")
                    shutil.copyfile(state, tmp / SNAPSHOT_DIR / "snapshot")
                except OSError as exc:
                    raise TemplateStorageError(
                        f"template {template_id!r}: cannot copy the snapshot: {exc.strerror or exc}"
                    ) from None
                mem_path = final / SNAPSHOT_DIR / "mem-file"
                state_path = final / SNAPSHOT_DIR / "snapshot"
            return self._new_record(
                template_id, name, "firecracker", mem_path, state_path, size, page_size, copy
            )

        return self._create(template_id, fill)

    def create_from_store(
        self,
        template_id: str,
        source: str,
        mem_size: int,
        vmstate: bytes | None,
        hot_pages: bytes | None,
        *,
        name: str | None = None,
    ) -> TemplateRecord:
        """Register a template pushed to object storage (``source``: ``s3://BUCKET/PREFIX``).

        The mem-file stays in the store (``mem_file`` is the URL, served lazily); the vmstate
        and the hot set pushed with it are kept in the template directory.
        """

        def fill(tmp: Path, final: Path) -> TemplateRecord:
            state_path = ""
            try:
                if vmstate is not None:
                    (tmp / SNAPSHOT_DIR).mkdir()
                    (tmp / SNAPSHOT_DIR / "snapshot").write_bytes(vmstate)
                    state_path = str(final / SNAPSHOT_DIR / "snapshot")
                if hot_pages is not None:
                    (tmp / HOT_PAGES_FILE).write_bytes(hot_pages)
            except OSError as exc:
                raise TemplateStorageError(
                    f"template {template_id!r}: cannot write its files: {exc.strerror or exc}"
                ) from None
            record = self._new_record(
                template_id, name, "firecracker", Path(), Path(), mem_size, PAGE_SIZE, True
            )
            record.mem_file, record.snapshot_path = source, state_path
            return record

        return self._create(template_id, fill)

    def create_microvm(
        self, template_id: str, spec: TemplateSpec | None = None, *, name: str | None = None
    ) -> TemplateRecord:
        """Build a template of the built-in KVM microVM (``spec``: a
        :class:`pagefork.vmm.kvm.template.TemplateSpec`) and register it."""
        from pagefork.vmm.kvm.template import MEM_FILE, TemplateSpec, build_template

        build_spec = spec if spec is not None else TemplateSpec()

        def fill(tmp: Path, final: Path) -> TemplateRecord:
            try:
                built = build_template(tmp / MICROVM_DIR, build_spec)
            except TemplateError as exc:
                # build_template raises TemplateError only for a spec it cannot build (memory
                # too small or too large, traces that do not fit); KVM failures are VmmError.
                raise TemplateFieldError(_SPEC_FIELDS, str(exc)) from None
            except OSError as exc:  # writing the mem-file or the metadata (a full disk)
                what = exc.filename or f"its files in {self.root}"
                raise TemplateStorageError(
                    f"template {template_id!r}: cannot write {what}: {exc.strerror or exc}"
                ) from None
            built.close()
            return self._new_record(
                template_id,
                name,
                "kvm",
                final / MICROVM_DIR / MEM_FILE,
                final / MICROVM_DIR,
                built.mem_size,
                PAGE_SIZE,
                True,
            )

        return self._create(template_id, fill)

    def _new_record(
        self,
        template_id: str,
        name: str | None,
        kind: TemplateKind,
        mem_file: Path,
        snapshot_path: Path,
        mem_size: int,
        page_size: int,
        owns_files: bool,
    ) -> TemplateRecord:
        return TemplateRecord(
            id=template_id,
            name=name or template_id,
            kind=kind,
            mem_file=str(mem_file),
            snapshot_path=str(snapshot_path),
            mem_size=mem_size,
            page_size=page_size,
            hot_pages_path=str(self.root / template_id / HOT_PAGES_FILE),
            created=time.time(),
            owns_files=owns_files,
        )

    def _create(
        self,
        template_id: str,
        fill: Callable[[Path, Path], TemplateRecord],
        check: Callable[[], None] | None = None,
    ) -> TemplateRecord:
        """Build the template in a hidden directory, then rename it into place: a crash or a
        failed build never leaves a half-made template that lists. ``check`` runs under the
        lock just before the rename (a child's parent must still be there)."""
        final = self.directory(template_id)
        if final.exists():
            raise TemplateError(f"template {template_id!r} already exists")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{_NEW_PREFIX}{template_id}-", dir=self.root))
        except OSError as exc:
            raise TemplateStorageError(
                f"cannot create a template in {self.root}: {exc.strerror}"
            ) from None
        try:
            record = fill(tmp, final)
            _write_atomically(tmp / RECORD_FILE, _record_doc(record))
            with self._lock:
                if check is not None:
                    check()
                try:
                    os.rename(tmp, final)  # fails if another create won the race
                except OSError:
                    raise TemplateError(f"template {template_id!r} already exists") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return record

    # --- updating ----------------------------------------------------------------------------
    def _update(self, template_id: str, change: Callable[[TemplateRecord], None]) -> TemplateRecord:
        with self._lock:
            record = self.get(template_id)
            change(record)
            _write_atomically(self.directory(template_id) / RECORD_FILE, _record_doc(record))
            return record

    def set_share_memory(self, template_id: str, share: bool) -> TemplateRecord:
        """Turn KSM sharing of the template's forks on or off (forks started from now on)."""

        def change(r: TemplateRecord) -> None:
            r.share_memory = share

        return self._update(template_id, change)

    def touch(self, template_id: str, created: float) -> None:
        """Note that the template was used now (``last_used``), best effort.

        Only the record created at ``created`` is changed (one deleted and created again under
        the same id is another template). A failed write (a full disk) is logged, never
        raised: a fork must not fail over a timestamp.
        """

        def change(r: TemplateRecord) -> None:
            if r.created != created:
                raise UnknownTemplateError(f"template {template_id!r} was created again")
            r.last_used = time.time()

        try:
            self._update(template_id, change)
        except UnknownTemplateError:
            pass
        except (TemplateError, TemplateStorageError) as exc:
            log.warning("template %s: cannot note its use: %s", template_id, exc)

    def clean_leftovers(self) -> list[str]:
        """Remove what a crashed daemon left under ``templates/``: creations that never got
        renamed into place (``.new-*``), deletions never finished (``.del-*``) and torn
        temporary record files. Only for the daemon that owns the state directory (it holds
        ``daemon.lock``): another process's creation in progress looks the same. Returns the
        names removed."""
        removed: list[str] = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink():
                continue  # never ours: creations and deletions are directories we made
            if entry.name.startswith((_NEW_PREFIX, _DEL_PREFIX)) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
            elif entry.is_dir() and not entry.name.startswith("."):
                for tmp in sorted(entry.iterdir()):
                    # Only regular files of our own naming: a symlink or a FIFO is not ours.
                    if _TMP_LEFTOVER.fullmatch(tmp.name) and _is_regular(tmp):
                        with contextlib.suppress(OSError):
                            tmp.unlink()
                            removed.append(f"{entry.name}/{tmp.name}")
        if removed:
            log.info("templates: removed leftovers of a previous run: %s", ", ".join(removed))
        return removed

    # --- layers ------------------------------------------------------------------------------
    def children(self, template_id: str) -> list[str]:
        """The ids of the templates that depend on ``template_id``, sorted: its children, and
        any template whose chain still reads a file in its directory (a grandchild whose
        parent was flattened reads its grandparent's mem-file and layers)."""
        directory = self.directory(template_id)
        return [
            r.id
            for r in self.listing().templates
            if r.id != template_id
            and (
                r.parent == template_id
                or any(Path(p).is_relative_to(directory) for p in (r.mem_file, *r.layers))
            )
        ]

    def create_child(
        self,
        template_id: str,
        parent_id: str,
        layer_path: str | os.PathLike[str],
        vmstate: str | os.PathLike[str],
        *,
        name: str | None = None,
        flatten_past: int | None = None,
    ) -> TemplateRecord:
        """Register a snapshot of a fork of ``parent_id`` as template ``template_id``.

        ``layer_path`` is its layer over the parent (:func:`pagefork.layers.format.write_layer`)
        and ``vmstate`` its VM state (a file or a directory). Both are placed in the new
        template's directory, the originals left to the caller: hard-linked when they are
        under the registry's own directory (a snapshot's work directory), copied otherwise (a
        file someone else may later rewrite in place must not change the template). With
        ``flatten_past``, a chain deeper than that many layers (or than :attr:`max_depth`) is
        flattened at once, as :meth:`flatten` does, but before the child appears: a flatten
        that fails (a full disk) leaves no child behind. Without it, a chain deeper than
        :attr:`max_depth` is refused.
        """
        from pagefork.layers.format import LayerError, LayerFile
        from pagefork.layers.source import flatten as flatten_chain

        parent = self.get(parent_id)
        if flatten_past is not None:
            flatten_past = min(flatten_past, self.max_depth)
        elif len(parent.layers) + 1 > self.max_depth:
            raise TemplateError(
                f"template {parent_id!r} already has {len(parent.layers)} layers, the most a "
                f"chain may have is {self.max_depth}: flatten it first"
            )
        try:
            with LayerFile(layer_path) as layer:
                if layer.size != parent.mem_size:
                    raise TemplateFieldError(
                        "layer",
                        f"layer {layer.path} is for {layer.size} bytes of memory, but template "
                        f"{parent_id!r} has {parent.mem_size}",
                    )
        except LayerError as exc:
            raise TemplateFieldError("layer", str(exc)) from None
        state = Path(vmstate).absolute()
        if not state.exists():
            raise TemplateFieldError("vmstate", f"VM state {state} does not exist")

        def fill(tmp: Path, final: Path) -> TemplateRecord:
            try:
                for src, dst in ((Path(layer_path).absolute(), LAYER_FILE), (state, CHILD_STATE)):
                    _place(src, tmp / dst, link=src.is_relative_to(self.root))
            except OSError as exc:
                raise TemplateStorageError(
                    f"template {template_id!r}: cannot place its files: {exc.strerror or exc}"
                ) from None
            record = self._new_record(
                template_id,
                name,
                parent.kind,
                Path(parent.mem_file),
                final / CHILD_STATE,
                parent.mem_size,
                parent.page_size,
                True,
            )
            record.parent = parent_id
            record.layers = [*parent.layers, str(final / LAYER_FILE)]
            # Its forks are the parent's forks' kin: they share memory only if those did.
            record.share_memory = parent.share_memory
            if flatten_past is not None and len(record.layers) > flatten_past:
                chain = [*parent.layers, str(tmp / LAYER_FILE)]
                try:
                    flatten_chain(parent.mem_file, chain, str(tmp / FLAT_MEM_FILE))
                except (LayerError, OSError) as exc:
                    raise TemplateStorageError(
                        f"template {template_id!r}: cannot flatten its {len(chain)} layers "
                        f"(past the depth of {flatten_past}): {exc}"
                    ) from None
                record.mem_file, record.layers, record.parent = str(final / FLAT_MEM_FILE), [], None
            return record

        def parent_still_there() -> None:
            try:
                again = self.get(parent_id)
            except UnknownTemplateError:
                raise TemplateError(f"template {parent_id!r} was deleted meanwhile") from None
            if again.created != parent.created or again.layers != parent.layers:
                raise TemplateError(f"template {parent_id!r} changed meanwhile; try again")

        return self._create(template_id, fill, parent_still_there)

    def flatten(self, template_id: str) -> TemplateRecord:
        """Merge the template's chain into one mem-file in its directory: it then has no
        layers and no parent. Its own layer file stays until the template is deleted: its
        children's chains name it, and a page server starting from the record read just
        before may be opening it."""
        from pagefork.layers.format import LayerError
        from pagefork.layers.source import flatten as flatten_chain

        record = self.get(template_id)
        if not record.layers:
            raise TemplateError(f"template {template_id!r} has no layers: nothing to flatten")
        out = self.directory(template_id) / FLAT_MEM_FILE
        try:
            flatten_chain(record.mem_file, record.layers, str(out))
        except LayerError as exc:
            raise TemplateError(f"template {template_id!r}: cannot flatten: {exc}") from None
        before = list(record.layers)

        def change(r: TemplateRecord) -> None:
            if r.created != record.created or r.layers != before:
                raise TemplateError(f"template {template_id!r} changed meanwhile; try again")
            r.mem_file, r.layers, r.parent = str(out), [], None

        flat = self._update(template_id, change)
        return flat

    # --- deleting ----------------------------------------------------------------------------
    def delete(self, template_id: str) -> None:
        """Remove the template; refused while it has live forks.

        A template whose record is broken can still be deleted (that is how one cleans it up).
        """
        self.purge(self.detach(template_id))

    def detach(self, template_id: str) -> Path:
        """The first half of :meth:`delete`: the template disappears at once (renamed to a
        hidden directory, returned); :meth:`purge` removes that at leisure. Refused while it
        has live forks (:attr:`live_forks`)."""
        directory = self.directory(template_id)
        with self._lock:
            if not directory.is_dir():
                raise UnknownTemplateError(f"unknown template {template_id!r}")
            try:
                record: TemplateRecord | None = self.get(template_id)
            except TemplateError:
                record = None
            if record is not None and record.live_forks > 0:
                raise TemplateError(
                    f"template {template_id!r} is in use by {record.live_forks} live "
                    f"fork{'s' if record.live_forks != 1 else ''}; release them first"
                )
            children = self.children(template_id)
            if children:
                raise TemplateError(
                    f"template {template_id!r} has templates layered over it: "
                    f"{', '.join(children)}; delete or flatten them first"
                )
            # Rename first so the template disappears at once, then remove at leisure. A
            # rename in place needs no new space: a full disk cannot make a template undeletable.
            doomed = self.root / f"{_DEL_PREFIX}{template_id}-{secrets.token_hex(6)}"
            try:
                os.rename(directory, doomed)
            except OSError as exc:
                raise TemplateError(f"cannot delete {directory}: {exc.strerror}") from None
        return doomed

    @staticmethod
    def purge(doomed: Path) -> None:
        """The second half of :meth:`delete`: remove a detached template's files."""
        shutil.rmtree(doomed, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(src, dst)


def _copy(src: str, dst: str) -> None:
    shutil.copyfile(src, dst)


def _place(src: Path, dst: Path, *, link: bool) -> None:
    """Put ``src`` (a file or a directory) at ``dst``, leaving ``src`` as it was."""
    put = _link_or_copy if link else _copy
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=put, symlinks=True)
    else:
        put(str(src), str(dst))


#: What a microVM template spec's build failure is about (the API's field names).
_SPEC_FIELDS = ("mem_size_mib", "vcpus", "variants", "working_set", "fork_share")


def _record_doc(record: TemplateRecord) -> dict[str, Any]:
    doc = asdict(record)
    for name in _DERIVED_FIELDS:
        del doc[name]
    return {"format": RECORD_FORMAT, "version": RECORD_VERSION, **doc}


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def kind_of(value: object) -> TemplateKind:
    """``value`` as a template kind; :class:`TemplateError` naming the allowed ones."""
    for kind in TEMPLATE_KINDS:
        if value == kind:
            return kind
    raise TemplateError(f"kind must be one of {', '.join(TEMPLATE_KINDS)}, not {value!r}")


__all__ = [
    "HOT_PAGES_FILE",
    "LAYER_FILE",
    "RECORD_FILE",
    "TEMPLATE_KINDS",
    "TemplateFieldError",
    "TemplateKind",
    "TemplateListing",
    "TemplateRecord",
    "TemplateRegistry",
    "TemplateStorageError",
    "UnknownTemplateError",
    "kind_of",
    "validate_template_id",
]
