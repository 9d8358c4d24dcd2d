"""The package's import graph has no circle, and config.py is a leaf.

Every import counts: at module level, inside functions and under TYPE_CHECKING (an import moved into
a function to dodge a circle is still a dependency), and importing a submodule counts as importing
the packages above it, which Python runs first. A registry's lazy "module:attribute" entries are
plugins looked up by name, not imports, and are not counted.
"""

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "platform"
PACKAGE = "panacea_platform"


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    modules = {}
    for path in (root / package).rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imported_names(tree: ast.AST, base: str) -> list[str]:
    """Every dotted name an import statement anywhere in `tree` may load (`from A import B`: A and A.B)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                module = f"{anchor}.{module}" if module else anchor
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, parent packages included."""
    modules = _modules(root, package)

    def owner(name: str) -> str | None:  # the longest prefix that is a module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        base = name if is_package else name.rpartition(".")[0]
        for imported in _imported_names(ast.parse(path.read_text()), base):
            target = owner(imported) if imported.split(".")[0] == package else None
            while target and target != name and not name.startswith(target + "."):
                graph[name].add(target)
                target = target.rpartition(".")[0] or None  # Python runs each package above it first
                target = target if target in modules else None
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_circle():
    assert circles(import_graph(PACKAGE_ROOT, PACKAGE)) == []


def test_config_is_a_leaf_that_gathers_only_the_plugins_settings():
    graph = import_graph(PACKAGE_ROOT, PACKAGE)
    allowed = {
        f"{PACKAGE}.config_base",
        f"{PACKAGE}.algorithms",
        f"{PACKAGE}.evaluation",
        f"{PACKAGE}.evaluation.suite_config",
    }
    for name in (f"{PACKAGE}.config", f"{PACKAGE}.config_base", f"{PACKAGE}.evaluation.suite_config"):
        extra = {t for t in graph[name] if t not in allowed and not t.endswith("_config")}
        assert not extra, f"{name} imports {sorted(extra)}"
    # The package __init__s config passes through register names only; they import nothing that could
    # import config back.
    assert graph[f"{PACKAGE}.algorithms"] == {f"{PACKAGE}.registry"}
    assert graph[f"{PACKAGE}.evaluation"] == set()


def test_the_check_finds_a_circle_through_a_function_level_and_a_type_checking_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub import c\n")
    (package / "a.py").write_text("def f():\n    from pkg import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n")
    (package / "c.py").write_text("import os\n")
    (package / "sub" / "c.py").write_text("from ..d import x\n")
    (package / "d.py").write_text("from pkg.sub.e import y\n")  # pkg.sub runs first: pkg.sub -> c -> d -> pkg.sub
    (package / "sub" / "e.py").write_text("")
    found = circles(import_graph(tmp_path, "pkg"))
    assert ["pkg.a", "pkg.b"] in found
    assert ["pkg.d", "pkg.sub", "pkg.sub.c"] in found
    assert len(found) == 2
