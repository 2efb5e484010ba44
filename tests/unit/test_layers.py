"""Imports only point down the round's data flow (docs/architecture.md, DESIGN §4).

The order is written once, here; a module may import its own layer or any
layer to its left, never one to its right.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "secure_xfl"

#: Layers in data-flow order. Top-level modules are named by file, folders by name.
ORDER: list[tuple[str, ...]] = [
    ("errors", "wire", "fsio", "failpoints"),
    ("crypto",),
    ("transport",),
    ("config", "kit"),
    ("privacy",),
    ("training",),
    ("protocol",),
    ("services",),
    ("experiments", "bench", "cli", "cli_args", "cli_audit", "cli_run", "__init__", "__main__"),
]
RANK = {name: i for i, names in enumerate(ORDER) for name in names}
MAX_LINES = 450


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(source: str) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "secure_xfl":  # from secure_xfl import crypto
                found += [(node.lineno, f"secure_xfl.{a.name}") for a in node.names]
    return [(n, m) for n, m in found if m.startswith("secure_xfl.")]


def violations(here: str, source: str) -> list[str]:
    """Imports in ``source`` (a module of layer ``here``) that point up."""
    bad = []
    for line, module in _imports(source):
        target = module.split(".")[1]
        if target in RANK and RANK[target] > RANK[here]:
            bad.append(f"line {line}: {here} imports {module} ({target} is above {here})")
    return bad


FILES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_known_layer() -> None:
    unknown = sorted({_layer(f) for f in FILES} - set(RANK))
    assert not unknown, f"add these to ORDER in {__file__}: {unknown}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    bad = violations(_layer(path), path.read_text())
    assert not bad, "\n".join(bad)


def test_the_check_can_fail() -> None:
    """Upward imports are caught, lazy ones inside functions included."""
    source = "import numpy\ndef f():\n    from secure_xfl.privacy.dp import DPConfig\n"
    assert violations("crypto", source) == [
        "line 3: crypto imports secure_xfl.privacy.dp (privacy is above crypto)"
    ]
    assert violations("services", source) == []


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it"
