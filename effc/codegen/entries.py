"""Several Relax modules (one per entry point of an artifact) merged into one module with named functions.

A decoder artifact has two entry points over the same weights (``prefill`` and ``decode``). Each graph is imported
on its own (:func:`effc.codegen.frontend.to_relax` gives a module with ``main`` and the kernels of effc operators);
here the ``main`` functions are renamed after their entry point and the kernels prefixed, so names never collide.
Weights stay Relax constants; the Relax VM's constant pool keeps structurally equal constants once, so a weight
used by both functions (in the same layout) is stored once in the library.
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.expr_functor import PyExprMutator, mutator


@mutator
class _Retarget(PyExprMutator):
    """Points ``call_tir``-style calls and direct calls at renamed ``GlobalVar``s."""

    def __init__(self, renamed: dict[str, tvm.ir.GlobalVar]) -> None:
        super().__init__()
        self.renamed = renamed

    def visit_global_var_(self, gv: tvm.ir.GlobalVar) -> relax.Expr:
        return self.renamed.get(gv.name_hint, gv)


def merge_entry_modules(modules: dict[str, tvm.IRModule]) -> tvm.IRModule:
    """One module whose Relax function ``name`` is ``modules[name]["main"]``, kernels prefixed ``name_``.

    Args:
        modules: entry-point name → module from ``to_relax`` (each with a ``main``).

    Returns:
        The merged module (functions carry their new names as ``global_symbol``; ``GlobalVar``s are typed by a
        ``BlockBuilder``, as Relax requires).
    """
    builder = relax.BlockBuilder()
    for entry, mod in modules.items():
        renamed: dict[str, tvm.ir.GlobalVar] = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                name = f"{entry}_{gv.name_hint}"
                renamed[gv.name_hint] = builder.add_func(func.with_attr("global_symbol", name), name)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                name = entry if gv.name_hint == "main" else f"{entry}_{gv.name_hint}"
                func = _Retarget(renamed).visit_expr(func).with_attr("global_symbol", name)
                renamed[gv.name_hint] = builder.add_func(func, name)
    return builder.get()
