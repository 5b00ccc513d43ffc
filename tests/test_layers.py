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

# the top: the compile driver and the user interfaces; no layer below imports them
TOP = ("effc.compiler", "effc.cli", "effc.api")
# layer -> imports it must not make (a module or any module below it)
FORBIDDEN = {
    "effc.ir": ("effc.ops", "effc.passes", "effc.codegen", "effc.eval", "effc.targets", "effc.runtime", "tvm", *TOP),
    "effc.ops": ("effc.passes", "effc.codegen", "effc.eval", "effc.targets", "effc.runtime", "tvm", *TOP),
    "effc.codegen": ("effc.passes", *TOP),
    "effc.eval": ("effc.passes", *TOP),
    "effc.runtime": ("effc.passes", *TOP),
    "effc.passes": TOP,
    "effc.targets": TOP,
}
_DYNAMIC = ("import_module", "__import__")  # importlib.import_module("effc.x") / __import__("effc.x")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import of one file: statements (relative ones resolved) and calls
    ``importlib.import_module("...")`` / ``__import__("...")`` with a string literal."""
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
        elif isinstance(node, ast.Call) and _called_name(node.func) in _DYNAMIC and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def _called_name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


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
    (pkg / "ops" / "bad.py").write_text(
        "import importlib\n"
        "def f():\n    from ..passes import base\n    import tvm.relax\n"
        "    importlib.import_module('effc.passes.nm_sparsity')\n    from effc.compiler import compile_model\n"
        "    __import__('effc.cli')\n    importlib.import_module(name_from_elsewhere)\n"
    )
    monkeypatch.setattr(f"{__name__}.ROOT", pkg)
    assert _violations("effc.ops", FORBIDDEN["effc.ops"]) == [
        "effc/ops/bad.py:3 imports effc.passes", "effc/ops/bad.py:3 imports effc.passes.base",
        "effc/ops/bad.py:4 imports tvm.relax", "effc/ops/bad.py:5 imports effc.passes.nm_sparsity",
        "effc/ops/bad.py:6 imports effc.compiler", "effc/ops/bad.py:6 imports effc.compiler.compile_model",
        "effc/ops/bad.py:7 imports effc.cli",
    ]
