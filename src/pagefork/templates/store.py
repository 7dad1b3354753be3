"""The registry's storage: one directory per template under ``STATE_DIR/templates``, its
record read and written under one lock, a creation built aside and renamed into place, a
deletion renamed aside and removed at leisure. What goes into a template is
:mod:`pagefork.templates.registry`'s business."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pagefork.errors import TemplateError
from pagefork.templates.ondisk import (
    DEL_PREFIX,
    NEW_PREFIX,
    clean_leftovers,
    write_atomically,
)
from pagefork.templates.record import (
    HOT_PAGES_FILE,
    RECORD_FILE,
    TemplateKind,
    TemplateListing,
    TemplateRecord,
    TemplateStorageError,
    UnknownTemplateError,
    record_doc,
    validate_template_id,
)

log = logging.getLogger("pagefork")


class TemplateStore:
    """Templates under ``STATE_DIR/templates`` as directories and records: reading, the
    atomic creation and update of a record, deletion. Every method is safe from any thread.
    What a template is made from is :class:`~pagefork.templates.registry.TemplateRegistry`'s
    business."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.root = self.state_dir / "templates"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TemplateError(f"cannot create {self.root}: {exc.strerror}") from None
        # One lock for every read-modify-write of a record, and for delete.
        self._lock = threading.Lock()
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
    def new_record(
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
        """A new record of template ``template_id``, created now (its hot set, once saved,
        sits in its directory); nothing is written."""
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

    def create_with(
        self,
        template_id: str,
        fill: Callable[[Path, Path], TemplateRecord],
        check: Callable[[], None] | None = None,
    ) -> TemplateRecord:
        """Create template ``template_id``: ``fill(building, final)`` puts its files in the
        hidden directory ``building`` and returns its record (paths under ``final``, where the
        template will be); the record is saved and the directory renamed into place: a crash
        or a failed build never leaves a half-made template that lists. ``check`` runs under
        the lock just before the rename (a child's parent must still be there)."""
        final = self.directory(template_id)
        if final.exists():
            raise TemplateError(f"template {template_id!r} already exists")
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{NEW_PREFIX}{template_id}-", dir=self.root))
        except OSError as exc:
            raise TemplateStorageError(
                f"cannot create a template in {self.root}: {exc.strerror}"
            ) from None
        try:
            record = fill(tmp, final)
            write_atomically(tmp / RECORD_FILE, record_doc(record))
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
    def update_with(
        self, template_id: str, change: Callable[[TemplateRecord], None]
    ) -> TemplateRecord:
        """Read the record of ``template_id``, let ``change`` edit it (or raise to leave it),
        and save it atomically, all under the lock; the record saved."""
        with self._lock:
            record = self.get(template_id)
            change(record)
            write_atomically(self.directory(template_id) / RECORD_FILE, record_doc(record))
            return record

    def set_share_memory(self, template_id: str, share: bool) -> TemplateRecord:
        """Turn KSM sharing of the template's forks on or off (forks started from now on)."""

        def change(r: TemplateRecord) -> None:
            r.share_memory = share

        return self.update_with(template_id, change)

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
            self.update_with(template_id, change)
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
        return clean_leftovers(self.root)

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
            doomed = self.root / f"{DEL_PREFIX}{template_id}-{secrets.token_hex(6)}"
            try:
                os.rename(directory, doomed)
            except OSError as exc:
                raise TemplateError(f"cannot delete {directory}: {exc.strerror}") from None
        return doomed

    @staticmethod
    def purge(doomed: Path) -> None:
        """The second half of :meth:`delete`: remove a detached template's files."""
        shutil.rmtree(doomed, ignore_errors=True)


__all__ = ["TemplateStore"]
