"""The code by layer (DESIGN.md section 1): imports only go down, no module imports itself round a circle, and
no function grows past a screen. Read from the source with ast, so lazy and TYPE_CHECKING imports count too."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Highest first; a module may import from its own layer's package and from any layer below it.
LAYERS = [
    ("proxy.__main__",),
    ("proxy.cli",),
    ("proxy.process",),
    ("proxy.settings",),
    ("proxy.invocation",),
    ("proxy.upstream", "proxy.runtime"),  # side by side: neither imports the other
    ("proxy.http",),
    ("proxy.errors", "proxy.types"),
    ("metrics",),
]
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = {"ProxyApp": 250}


def modules() -> Iterator[tuple[str, Path]]:
    for package in ("proxy", "metrics"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports(name: str, path: Path) -> set[str]:
    """Every proxy/metrics module this one imports, wherever the import statement stands."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from proxy.runtime import api` names a module
    known = {m for m, _ in modules()}
    return {m for m in found if m in known and m != name}


def layer(module: str) -> tuple[int, str]:
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return rank, prefix
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def graph() -> dict[str, set[str]]:
    return {name: imports(name, path) for name, path in modules()}


def test_every_module_has_a_layer() -> None:
    for name, _ in modules():
        if name not in ("proxy",):
            layer(name)


def test_imports_only_go_down() -> None:
    wrong = []
    for name, targets in graph().items():
        if name == "proxy":
            continue
        rank, prefix = layer(name)
        for target in targets:
            if target == "proxy":
                continue
            target_rank, target_prefix = layer(target)
            if target_rank < rank or (target_rank == rank and target_prefix != prefix):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports that go up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_itself_round_a_circle() -> None:
    edges = graph()
    circles = []

    def visit(node: str, path: list[str]) -> None:
        for target in edges.get(node, ()):
            if target == path[0]:
                circles.append(" -> ".join([*path, target]))
            elif target not in path and len(path) < 8:
                visit(target, [*path, target])

    for start in edges:
        visit(start, [start])
    assert not circles, "\n".join(sorted(set(circles)))


def test_the_check_catches_an_import_that_goes_up(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from proxy.invocation.app import ProxyApp\n")
    assert "proxy.invocation.app" in imports("proxy.http.bad", bad)
    assert layer("proxy.invocation.app")[0] < layer("proxy.http.bad")[0]


def sizes() -> Iterator[tuple[str, str, int]]:
    for name, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                assert node.end_lineno is not None
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                yield kind, f"{name}.{node.name}", node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen() -> None:
    long = [f"{where}: {n} lines" for kind, where, n in sizes() if kind == "function" and n > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)


@pytest.mark.parametrize(("cls", "limit"), MAX_CLASS_LINES.items())
def test_the_request_path_class_stays_small(cls: str, limit: int) -> None:
    found = [n for kind, where, n in sizes() if kind == "class" and where.endswith("." + cls)]
    assert found and max(found) <= limit, found
