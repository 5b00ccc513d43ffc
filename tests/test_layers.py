"""The layer rule of docs/ARCHITECTURE.md, checked on the source: no import arrow points up.

Every ``import`` / ``from ... import`` statement of the package is read with ``ast`` (also those inside functions,
which run later but still tie the layers together); a forbidden arrow fails the test with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import effc

ROOT = Path(effc.__file__).parent

# layer -> imports it must not make (a module or any module below it)
FORBIDDEN = {
    "effc.ir": ("effc.ops", "effc.passes", "effc.codegen", "effc.eval", "effc.targets", "effc.runtime", "tvm"),
    "effc.ops": ("effc.passes", "effc.codegen", "effc.eval", "effc.targets", "effc.runtime", "tvm"),
    "effc.codegen": ("effc.passes",),
    "effc.eval": ("effc.passes",),
    "effc.runtime": ("effc.passes",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import statement of one file, relative imports resolved."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from effc import passes`` imports effc.passes: check the names as submodules too
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
            found.append((node.lineno, base))
    return found


def _violations(layer: str, banned: tuple[str, ...]) -> list[str]:
    folder = ROOT.joinpath(*layer.split(".")[1:])
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for line, target in _imports(path):
            if any(target == b or target.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}")
    return sorted(set(bad))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_points_up(layer):
    assert _violations(layer, FORBIDDEN[layer]) == []


def test_the_checker_sees_an_upward_arrow(tmp_path, monkeypatch):
    # a fake package with one forbidden import inside a function, one relative: both are found
    pkg = tmp_path / "effc"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "bad.py").write_text("def f():\n    from ..passes import base\n    import tvm.relax\n")
    monkeypatch.setattr(f"{__name__}.ROOT", pkg)
    assert _violations("effc.ops", FORBIDDEN["effc.ops"]) == [
        "effc/ops/bad.py:2 imports effc.passes", "effc/ops/bad.py:2 imports effc.passes.base",
        "effc/ops/bad.py:3 imports tvm.relax",
    ]
