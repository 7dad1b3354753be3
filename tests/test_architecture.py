"""The import graph reads as the architecture: no cycle, no import from a lower layer up.

Every module under ``src/pagefork`` is parsed (never imported) and each of its imports of a
pagefork module is an edge, wherever it is written: a lazy import inside a function is a
dependency too. Layers are :data:`TIERS`, lowest first; a tier holds one or more groups of
top-level modules or packages. A module may import its own group and any group of a lower
tier, never a higher tier nor another group of its own tier (siblings stay independent: the
page server and the VMM drivers know nothing of each other).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "pagefork"

#: The layers, lowest first; each a list of groups, each group the top-level names under
#: ``pagefork`` it holds ("" is the package itself: its version and docstring).
TIERS: list[list[set[str]]] = [
    # Kernel interfaces and plain data: each depends on nothing of ours.
    [{""}, {"errors"}, {"libc"}, {"regions"}, {"removed"}, {"signals"}, {"stats"}],
    # ... and the kernel's memory figures of a process, and KSM (samepage merging) control.
    [{"files"}, {"uffd"}, {"memstats"}, {"ksm"}],
    # Wire and file formats, and the fault-path primitives.
    [{"handshake"}, {"memfile"}, {"hotpages"}, {"prefetch", "copycost"}],
    # Where memory comes from (a mem-file's layers, object storage), and the hot-set policy.
    [{"layers", "store"}, {"hotloop", "hotlearn"}],
    # The page server, and the VMMs it serves: neither knows the other.
    [{"server", "serving"}, {"vmm"}],
    # The template registry (it recognises a built-in microVM template), and the demo's
    # fan-out of microVM forks against a page server.
    [{"templates"}, {"demo"}],
    # The daemon and the live takeover of a daemon or a page server.
    [{"daemon", "takeover"}],
    # Entry points, and what tests and benchmarks drive.
    [{"cli", "__main__"}, {"testing"}],
]

#: The most lines a class may span (its docstring and comments included): a class a newcomer
#: can read whole. Split a longer one by responsibility.
MAX_CLASS_LINES = 400
#: Classes longer than that today, each (module, class name). Keep this short: remove an entry
#: once its class is split (the test fails while an entry is no longer long).
LONG_CLASSES: set[tuple[str, str]] = set()
#: Packages whose modules never touch another object's ``_private`` attributes (only ``self``'s,
#: ``cls``'s, or those of the class the code is written in): give the class a method instead.
NO_PRIVATE_ACCESS = ("pagefork.daemon",)

#: Imports that break the rules today, each (importer, imported). Keep this short: remove an
#: entry once its module moves (the test fails while an entry no longer occurs).
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The pagefork modules ``name`` imports (``from pkg import mod`` names ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
            # ``from pagefork.x import y``: the module y if it is one, else module x.
            targets = [t for t in targets[:-1] if t in modules] or [module]
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                yield target


def import_graph() -> dict[str, set[str]]:
    """Every pagefork module and the pagefork modules it imports."""
    modules = _modules()
    return {name: set(_imported(name, path, modules)) for name, path in modules.items()}


def _place(module: str) -> tuple[int, int]:
    """(tier, group) of a module."""
    top = module.split(".")[1] if "." in module else ""
    for tier, groups in enumerate(TIERS):
        for group, names in enumerate(groups):
            if top in names:
                return tier, group
    raise AssertionError(f"{module}: its top-level name {top!r} is in no layer of TIERS")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _without_exceptions(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    return {a: {b for b in deps if (a, b) not in KNOWN_EXCEPTIONS} for a, deps in graph.items()}


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "pagefork.daemon.manager" in graph["pagefork.daemon.main"]  # from x import y
    assert "pagefork.daemon.main" in graph["pagefork.cli.daemon_cmd"]  # inside a function
    assert "pagefork.demo.orchestrate" in graph["pagefork.demo.branch"]
    assert "pagefork.errors" in graph["pagefork.uffd"]


def test_every_module_has_a_layer() -> None:
    for module in import_graph():
        _place(module)


def test_no_import_cycle_among_pagefork_modules() -> None:
    assert _cycles(_without_exceptions(import_graph())) == []


def test_no_import_from_a_lower_layer_to_a_higher_one_or_a_sibling() -> None:
    wrong = []
    for importer, deps in _without_exceptions(import_graph()).items():
        tier, group = _place(importer)
        for imported in sorted(deps):
            their_tier, their_group = _place(imported)
            if their_tier > tier or (their_tier == tier and their_group != group):
                wrong.append(f"{importer} -> {imported}")
    assert wrong == []


def test_every_known_exception_still_occurs() -> None:
    graph = import_graph()
    stale = [f"{a} -> {b}" for a, b in KNOWN_EXCEPTIONS if b not in graph.get(a, set())]
    assert stale == [], "no longer needed: remove from KNOWN_EXCEPTIONS"


def test_the_checks_catch_a_cycle_and_an_upward_import() -> None:
    graph = {"pagefork.errors": {"pagefork.uffd"}, "pagefork.uffd": {"pagefork.errors"}}
    assert _cycles(graph) == [["pagefork.errors", "pagefork.uffd"]]
    assert _place("pagefork.errors") < _place("pagefork.uffd")
    assert _place("pagefork.vmm.kvm.driver")[0] == _place("pagefork.server")[0]
    assert _place("pagefork.vmm.base")[1] != _place("pagefork.serving.worker")[1]


def _class_lengths() -> Iterator[tuple[str, str, int]]:
    """(module, class, lines) of every class under ``src/pagefork``, nested ones included."""
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                yield module, node.name, node.end_lineno - node.lineno + 1


def test_no_class_is_longer_than_the_limit() -> None:
    long = {(m, c): n for m, c, n in _class_lengths() if n > MAX_CLASS_LINES}
    wrong = [
        f"{m}.{c}: {n} lines" for (m, c), n in sorted(long.items()) if (m, c) not in LONG_CLASSES
    ]
    assert wrong == [], f"split these by responsibility (at most {MAX_CLASS_LINES} lines each)"
    stale = sorted(f"{m}.{c}" for m, c in LONG_CLASSES if (m, c) not in long)
    assert stale == [], "no longer long: remove from LONG_CLASSES"


def _own_private_names(cls: ast.ClassDef) -> set[str]:
    """The ``_private`` names a class defines: its methods and what it sets on ``self``/``cls``."""
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in ("self", "cls"):
                names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if n.startswith("_")}


def _private_reaches(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, expression) of each ``x._name`` where ``x`` is not ``self`` or ``cls`` and the
    enclosing class does not define ``_name`` itself."""

    def visit(node: ast.AST, own: frozenset[str]) -> Iterator[tuple[int, str]]:
        for child in ast.iter_child_nodes(node):
            mine = own | _own_private_names(child) if isinstance(child, ast.ClassDef) else own
            if (
                isinstance(child, ast.Attribute)
                and child.attr.startswith("_")
                and not child.attr.startswith("__")
                and not (isinstance(child.value, ast.Name) and child.value.id in ("self", "cls"))
                and child.attr not in mine
            ):
                yield child.lineno, ast.unparse(child)
            yield from visit(child, mine)

    return visit(tree, frozenset())


def test_no_module_reaches_into_another_objects_private_attributes() -> None:
    wrong = []
    for module, path in _modules().items():
        if module.startswith(NO_PRIVATE_ACCESS):
            tree = ast.parse(path.read_text(), str(path))
            wrong += [f"{module}:{line}: {expr}" for line, expr in _private_reaches(tree)]
    assert wrong == []


def test_the_class_checks_catch_a_long_class_and_a_private_reach() -> None:
    long_class = "class Big:\n" + "    x = 1\n" * MAX_CLASS_LINES
    [node] = [n for n in ast.walk(ast.parse(long_class)) if isinstance(n, ast.ClassDef)]
    assert node.end_lineno is not None and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    reaching = (
        "class A:\n"
        "    def f(self, other):\n"
        "        self._mine = other._theirs\n"
        "    @classmethod\n"
        "    def make(cls):\n"
        "        a = cls.__new__(cls)\n"
        "        a._mine = 1\n"
        "        return a\n"
    )
    assert list(_private_reaches(ast.parse(reaching))) == [(3, "other._theirs")]


def _calls_of(function: str) -> list[str]:
    """Every ``module:line`` under ``src/pagefork`` that calls ``function`` (by its name)."""
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if name == function:
                    found.append(f"{module}:{node.lineno}")
    return found


def test_the_prefetch_planner_is_made_ready_in_one_place() -> None:
    # The page server's prefetch service, once per process; everyone else asks the server.
    [call] = _calls_of("prepare_planner")
    assert call.startswith("pagefork.serving.prefetching:")
