"""The package's three layers, read from the source (docs/design.md section 2).

Every import of every module counts, including those inside functions: a lazy import
still ties the layers together. The rules: train/ imports no Ray; analysis/ imports
neither Ray, torch, launch/ nor train/; no two modules import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kavg_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (``from pkg import sub`` counts as ``pkg.sub`` when
    ``sub`` is a module of the package, else as ``pkg``)."""
    out: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in MODULES else base)
    return out


IMPORTS = {name: imports_of(path) for name, path in MODULES.items()}


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_layers_exist() -> None:
    assert {"kavg_ray.train", "kavg_ray.launch", "kavg_ray.analysis"} <= set(MODULES)
    assert "kavg_ray.analysis.results" in MODULES and "kavg_ray.train.averaging" in MODULES
    # What the rules below forbid is found: the reader sees function-level imports.
    assert "ray" in IMPORTS["kavg_ray.launch.sweep"]
    assert "kavg_ray.train.stacked" in IMPORTS["kavg_ray.cli"]  # inside _model_bytes
    assert "kavg_ray.train.run" in IMPORTS["kavg_ray.train"]  # the package's own __init__
    assert "kavg_ray.train.factories" in IMPORTS["kavg_ray.train.workload"]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _in(n, ("kavg_ray.train",))))
def test_train_imports_no_ray(name: str) -> None:
    assert not {m for m in IMPORTS[name] if _in(m, ("ray",))}


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _in(n, ("kavg_ray.analysis",))))
def test_analysis_imports_neither_ray_nor_torch_nor_the_other_layers(name: str) -> None:
    banned = ("ray", "torch", "torchvision", "kavg_ray.train", "kavg_ray.launch")
    assert not {m for m in IMPORTS[name] if _in(m, banned)}


def test_no_two_modules_import_each_other() -> None:
    pairs = sorted(
        (a, b) for a, deps in IMPORTS.items() for b in deps
        if a < b and b in MODULES and a in IMPORTS.get(b, set())
    )  # fmt: skip
    assert pairs == []

