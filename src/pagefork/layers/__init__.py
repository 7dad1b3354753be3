"""Layered templates: a base mem-file plus layers of changed and zeroed pages.

:mod:`pagefork.layers.format` is the layer file; :mod:`pagefork.layers.source` resolves a
chain into the composite view that workers map, so the fault path is the same as for a plain
mem-file.
"""
