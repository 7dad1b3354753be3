"""The page server's shape, checked from its source: small classes, no private reach-ins.

A class of the page server (``pagefork.serving``, ``pagefork.server``, the takeover's page
server half) stays under :data:`MAX_CLASS_LINES`, and no module reads or writes an underscore
attribute of an object that is not its own (``x._name`` where ``_name`` is defined in no class
of that module): each part is used through its methods.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "pagefork"
#: About 400 lines: a class a newcomer reads in one sitting.
MAX_CLASS_LINES = 400
#: The modules this applies to: the page server and what drives it.
CHECKED = sorted(
    [
        *(SRC / "serving").glob("*.py"),
        SRC / "server.py",
        SRC / "uffd.py",
        SRC / "takeover" / "pageserver.py",
        SRC / "takeover" / "serve.py",
    ]
)


def class_lengths(path: Path) -> dict[str, int]:
    """Lines of each class in ``path``, by name."""
    tree = ast.parse(path.read_text())
    return {
        node.name: (node.end_lineno or node.lineno) - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
    }


def private_reach_ins(path: Path) -> list[str]:
    """``x._name`` in ``path`` where ``x`` is not ``self``/``cls`` and ``_name`` is not
    defined by any class or function of the module (so it belongs to another module's class)."""
    tree = ast.parse(path.read_text())
    own: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, (ast.AnnAssign, ast.Assign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            own.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            own.add(node.value)  # a name in __slots__
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__") or name in own:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if name == "_exit" and ast.unparse(node.value) == "os":
            continue
        found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(SRC)))
def test_no_page_server_class_is_longer_than_a_sitting(path: Path) -> None:
    long = {n: lines for n, lines in class_lengths(path).items() if lines > MAX_CLASS_LINES}
    assert not long, f"{path.name}: classes over {MAX_CLASS_LINES} lines: {long}"


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: str(p.relative_to(SRC)))
def test_no_page_server_module_reaches_into_another_class(path: Path) -> None:
    assert private_reach_ins(path) == []


def test_nothing_in_the_project_reaches_into_the_page_server() -> None:
    private = set()
    for path in CHECKED:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    private.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                private.add(node.name)
    private -= {"_lock", "_closed", "_thread", "_exit"}  # names other classes use for their own
    offenders = [
        hit
        for path in sorted(SRC.rglob("*.py"))
        if path not in CHECKED
        for hit in private_reach_ins(path)
        if hit.rsplit(".", 1)[-1] in private
    ]
    assert offenders == []
