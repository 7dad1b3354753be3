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

Where each part lives: :mod:`.record` the record and the registry's errors; :mod:`.ondisk`
atomic saves, placing files and finding leftovers; :mod:`.store` the directories, the lock,
reading, creating, updating and deleting records; :mod:`.registry` what a template is made
from (a snapshot, object storage, the microVM, a fork's layer) and flattening.
"""

from __future__ import annotations

# The package's names are its modules' public names, each listed once, in its module.
from pagefork.templates import record, registry, store
from pagefork.templates.record import *  # noqa: F403
from pagefork.templates.registry import *  # noqa: F403
from pagefork.templates.store import *  # noqa: F403

__all__: list[str] = []
__all__ += record.__all__
__all__ += registry.__all__
__all__ += store.__all__
