"""What a template is made from: a Firecracker snapshot (referenced or copied), a template
pushed to object storage, the built-in KVM microVM, or a snapshot of a fork over its parent
(a child, with layers), and the flattening of a child's chain. Storage is
:class:`~pagefork.templates.store.TemplateStore`'s."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from pagefork.errors import TemplateError
from pagefork.handshake import PAGE_SIZES
from pagefork.layers.source import MAX_DEPTH
from pagefork.regions import PAGE_SIZE
from pagefork.templates.ondisk import place
from pagefork.templates.record import (
    CHILD_STATE,
    FLAT_MEM_FILE,
    HOT_PAGES_FILE,
    LAYER_FILE,
    MICROVM_DIR,
    SNAPSHOT_DIR,
    TemplateFieldError,
    TemplateRecord,
    TemplateStorageError,
    UnknownTemplateError,
)
from pagefork.templates.store import TemplateStore

if TYPE_CHECKING:
    from pagefork.vmm.kvm.template import TemplateSpec

#: What a microVM template spec's build failure is about (the API's field names).
_SPEC_FIELDS = ("mem_size_mib", "vcpus", "variants", "working_set", "fork_share")


class TemplateRegistry(TemplateStore):
    """Templates under ``STATE_DIR/templates``; every method is safe from any thread."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        super().__init__(state_dir)
        #: The most layers a chain registered here may have (at most ``MAX_DEPTH``, what a
        #: page server opens; lower only to exercise the limit).
        self.max_depth = MAX_DEPTH

    # --- creating a root ---------------------------------------------------------------------
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
            return self.new_record(
                template_id, name, "firecracker", mem_path, state_path, size, page_size, copy
            )

        return self.create_with(template_id, fill)

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
            record = self.new_record(
                template_id, name, "firecracker", Path(), Path(), mem_size, PAGE_SIZE, True
            )
            record.mem_file, record.snapshot_path = source, state_path
            return record

        return self.create_with(template_id, fill)

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
            return self.new_record(
                template_id,
                name,
                "kvm",
                final / MICROVM_DIR / MEM_FILE,
                final / MICROVM_DIR,
                built.mem_size,
                PAGE_SIZE,
                True,
            )

        return self.create_with(template_id, fill)

    # --- layers ------------------------------------------------------------------------------
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
                    place(src, tmp / dst, link=src.is_relative_to(self.root))
            except OSError as exc:
                raise TemplateStorageError(
                    f"template {template_id!r}: cannot place its files: {exc.strerror or exc}"
                ) from None
            record = self.new_record(
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

        return self.create_with(template_id, fill, parent_still_there)

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

        flat = self.update_with(template_id, change)
        return flat


__all__ = ["TemplateRegistry"]
