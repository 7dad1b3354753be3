"""A child template's hot set before its first fork records one: inherited, plus its layers.

A child's first fork records its own hot set (the daemon makes it the warm-up). Until that
set exists, the child's other forks are prefetched from what it inherits: the pages its
layers give data (what the snapshotted fork changed, which its branches resume into), then
the hot set of its nearest ancestor that has one.

Layer pages are mem-file pages, and a hot set names (region, offset) pages of a fork's
regions, so :meth:`InheritedHotSet.for_regions` converts them once per region layout and
returns the same :class:`~pagefork.hotpages.HotPageList` for every fork of that layout: the
server then plans the prefetch once and reuses it.

The daemon's use::

    inherited = inherited_hot_set(registry, record)      # None: the template has its own
    ...
    regions = server.wait_connected(fork)
    server.prefetch(fork, inherited.for_regions(regions))
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from pagefork.errors import PageforkError
from pagefork.hotpages import HotPage, HotPageList
from pagefork.hotpages import load as load_hot_pages
from pagefork.layers.format import LAYER_PAGE, LayerFile
from pagefork.regions import Region


class TemplateLike(Protocol):
    """What :func:`inherited_hot_set` reads of a template
    (:class:`pagefork.templates.TemplateRecord`, a layer above this one, is one)."""

    @property
    def id(self) -> str: ...
    @property
    def parent(self) -> str | None: ...
    @property
    def layers(self) -> list[str]: ...
    @property
    def hot_pages_path(self) -> str: ...
    def has_hot_pages(self) -> bool: ...


class TemplateLookup(Protocol):
    """Finds a template by id (:class:`pagefork.templates.TemplateRegistry` is one)."""

    def get(self, template_id: str) -> TemplateLike: ...


def chain_data_pages(layer_paths: Sequence[str]) -> list[int]:
    """The mem-file pages the chain's layers give data, in page order (a page a higher layer
    zeroes is not one)."""
    pages: set[int] = set()
    for path in layer_paths:
        with LayerFile(path) as layer:
            for first, count in layer.zero_runs:
                pages.difference_update(range(first, first + count))
            pages.update(layer.index)
    return sorted(pages)


class InheritedHotSet:
    """The layers' data pages, then ``parent_hot``, as a hot set for any region layout."""

    def __init__(self, parent_hot: HotPageList | None, layer_pages: Sequence[int]) -> None:
        self.parent_hot = parent_hot
        self.layer_pages = list(layer_pages)
        self._lock = threading.Lock()
        self._by_layout: dict[tuple[tuple[int, int, int], ...], HotPageList] = {}

    def for_regions(self, regions: Sequence[Region]) -> HotPageList:
        """The hot set in ``regions``' terms (one list per layout, made once). Layer pages
        outside every region are left out."""
        layout = tuple((r.size, r.offset, r.page_size) for r in regions)
        with self._lock:
            found = self._by_layout.get(layout)
            if found is None:
                found = HotPageList.from_pages(
                    [*self._layer_hot_pages(regions), *(self.parent_hot or ())]
                )
                self._by_layout[layout] = found
            return found

    def _layer_hot_pages(self, regions: Sequence[Region]) -> list[HotPage]:
        ordered = sorted(enumerate(regions), key=lambda ir: ir[1].offset)
        out: list[HotPage] = []
        i = 0
        for page in self.layer_pages:  # sorted: walk the regions alongside
            offset = page * LAYER_PAGE
            while i < len(ordered) and offset >= ordered[i][1].offset + ordered[i][1].size:
                i += 1
            if i == len(ordered):
                break
            index, region = ordered[i]
            if offset < region.offset:
                continue
            within = offset - region.offset
            out.append(HotPage(index, within - within % region.page_size))
        return out


def inherited_hot_set(registry: TemplateLookup, record: TemplateLike) -> InheritedHotSet | None:
    """What a fork of ``record`` is prefetched from until the template has its own hot set:
    None for a template that has one, or has no layers. An ancestor's unreadable hot set
    counts as none (it would be re-recorded there)."""
    if not record.layers or record.has_hot_pages():
        return None
    parent_hot: HotPageList | None = None
    seen = {record.id}
    parent = record.parent
    while parent is not None and parent not in seen:
        seen.add(parent)
        try:
            ancestor = registry.get(parent)
        except PageforkError:  # deleted or broken meanwhile: inherit nothing more
            break
        if ancestor.has_hot_pages():
            try:
                parent_hot = load_hot_pages(ancestor.hot_pages_path)
            except PageforkError:
                parent_hot = None
            break
        parent = ancestor.parent
    return InheritedHotSet(parent_hot, chain_data_pages(record.layers))


__all__ = [
    "InheritedHotSet",
    "TemplateLike",
    "TemplateLookup",
    "chain_data_pages",
    "inherited_hot_set",
]
