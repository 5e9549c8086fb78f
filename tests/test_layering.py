"""The package layering of docs/design.md: fusion <- bench <- sweeps, dashboards <- fusebench (the CLI).

A package may import only the ones below it, not even by a module-name string (``importlib``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("fusion", "bench", "sweeps", "dashboards", "fusebench")
ALLOWED = {
    "fusion": set(),
    "bench": {"fusion"},
    "sweeps": {"fusion", "bench"},
    "dashboards": {"fusion", "bench"},
    "fusebench": {"fusion", "bench", "sweeps", "dashboards"},
}


def _is_module(package: str, name: str) -> bool:
    if not name.isidentifier():
        return False
    return (ROOT / package / f"{name}.py").is_file() or (ROOT / package / name / "__init__.py").is_file()


def _references(path: Path) -> set[str]:
    """Top-level project packages a module imports or names as a dotted module string."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.strip().split(".")
            # "sweeps.cli" names a module; "fusebench.role" (a tag of the run schema) does not
            if len(parts) > 1 and parts[0] in PROJECT and _is_module(parts[0], parts[1]):
                names = [parts[0]]
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in PROJECT)
    return found


@pytest.mark.parametrize("package", PROJECT)
def test_no_package_imports_a_higher_one(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for ref in _references(path) - ALLOWED[package] - {package}:
            bad.append(f"{path.relative_to(ROOT)} -> {ref}")
    assert bad == []
