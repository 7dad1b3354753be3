"""The layering rule for the VMM: nothing under ``pagefork.vmm`` imports the page server or
anything above it (the demo's orchestration lives in ``pagefork.demo``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pagefork.vmm

HIGHER = ("pagefork.server", "pagefork.serving", "pagefork.daemon", "pagefork.cli", "pagefork.demo")


def test_the_vmm_layer_never_imports_a_higher_layer() -> None:
    root = Path(pagefork.vmm.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n.startswith(HIGHER)]
    assert offenders == []
