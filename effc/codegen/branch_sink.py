"""Move the computations of an ONNX ``If`` branch into the Relax ``If`` that selects it (apache-tvm 0.27).

TVM 0.27's ONNX frontend converts ``If`` with a data-dependent condition into ``relax.If``, but it emits the
nodes of both branch graphs into the *enclosing* binding block and keeps only each branch's last expression
inside the ``If``: both branches are computed on every run and the ``If`` merely selects a result. A skipped
branch (``layer-skip(mode=adaptive)``'s FFN) would still read its weights and run its kernels.

:func:`sink_into_branches` undoes that: the bindings before an ``If`` whose values are used only inside one branch
(directly, or by other bindings that move there) move into a new private Relax function ``effc_branch_<k>``,
which that branch calls, so the VM runs them only when the branch is taken. A function of its own is planned and
fused on its own: bindings placed directly inside the branch's ``SeqExpr`` stayed unfused, and TVM's static memory
planner reused storage across the branch boundary (a segfault in ``AllocTensor`` on a 3-layer model). Bindings
used anywhere else stay where they are.
"""

from __future__ import annotations

import tvm
from tvm import relax

__all__ = ["sink_into_branches"]


def _uses(bindings: list, tail_vars: set) -> dict:
    """``{var: set of use sites}``; a site is ``("b", i)``, ``("then", i)``, ``("else", i)`` or ``("ext",)``."""
    sites: dict = {}
    for i, binding in enumerate(bindings):
        value = binding.value
        if isinstance(value, relax.If):
            parts = (("b", value.cond), ("then", value.true_branch), ("else", value.false_branch))
        else:
            parts = (("b", value),)
        for kind, expr in parts:
            for var in relax.analysis.free_vars(expr):
                sites.setdefault(var, set()).add((kind, i))
    for var in tail_vars:
        sites.setdefault(var, set()).add(("ext",))
    return sites


def _branch_only(bindings: list, sites: dict, j: int, kind: str) -> list[int]:
    """Indices of the bindings before ``bindings[j]`` (an ``If``) used only inside its ``kind`` branch."""
    moving: set[int] = set()
    for i in range(j - 1, -1, -1):
        if isinstance(bindings[i].value, relax.If):
            continue
        users = sites.get(bindings[i].var, set())
        if users and all(u == (kind, j) or (u[0] == "b" and u[1] in moving) for u in users):
            moving.add(i)
    return sorted(moving)


class _Outliner:
    """Turns a branch body into a call of a new private Relax function (planned and fused on its own)."""

    def __init__(self, mod: tvm.IRModule) -> None:
        self.builder = relax.BlockBuilder(mod)
        self.count = 0

    def branch(self, seq: relax.SeqExpr, bindings: list) -> relax.SeqExpr:
        if not bindings:
            return seq
        body = relax.SeqExpr([relax.DataflowBlock(bindings), *seq.blocks], seq.body)
        params = list(relax.analysis.free_vars(body))
        func = relax.utils.copy_with_new_vars(relax.Function(params, body, seq.body.ty, is_pure=True))
        gvar = self.builder.add_func(func, f"effc_branch_{self.count}")
        self.count += 1
        out = relax.Var(f"{gvar.name_hint}_out", seq.body.ty)
        return relax.SeqExpr([relax.BindingBlock([relax.VarBinding(out, relax.Call(gvar, params))])], out)


def _sink_block(bindings: list, tail_vars: set, outliner: _Outliner) -> tuple[list, int]:
    """The block's bindings with branch-only bindings moved into their ``If``; returns (bindings, moved count)."""
    moved, j = 0, 0
    while j < len(bindings):
        value = bindings[j].value
        if isinstance(value, relax.If):
            sites = _uses(bindings, tail_vars)
            then, other = _branch_only(bindings, sites, j, "then"), _branch_only(bindings, sites, j, "else")
            if then or other:
                new_if = relax.If(value.cond, outliner.branch(value.true_branch, [bindings[i] for i in then]),
                                  outliner.branch(value.false_branch, [bindings[i] for i in other]))
                bindings[j] = relax.VarBinding(bindings[j].var, new_if)
                gone = set(then) | set(other)
                bindings = [b for i, b in enumerate(bindings) if i not in gone]
                j -= len(gone)  # every moved binding stood before the If
                moved += len(gone)
        j += 1
    return bindings, moved


def _sink_function(func: relax.Function, outliner: _Outliner) -> tuple[relax.Function, int]:
    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return func, 0
    blocks, moved = [], 0
    for k, block in enumerate(body.blocks):
        if isinstance(block, relax.DataflowBlock):
            blocks.append(block)
            continue
        later = [*body.blocks[k + 1:]]
        tail = set(relax.analysis.free_vars(relax.SeqExpr(later, body.body))) if later else set(
            relax.analysis.free_vars(body.body))
        bindings, count = _sink_block(list(block.bindings), tail, outliner)
        blocks.append(relax.BindingBlock(bindings))
        moved += count
    if not moved:
        return func, 0
    new = relax.Function(func.params, relax.SeqExpr(blocks, body.body), func.ret_ty, func.is_pure,
                         func.attrs, func.span)
    return new, moved


def sink_into_branches(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """``mod`` with branch-only bindings moved into their ``relax.If`` (see the module docstring).

    Returns:
        ``(module, bindings moved)``; the module is ``mod`` itself when nothing moved.
    """
    total, outliner = 0, _Outliner(mod)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            new, moved = _sink_function(func, outliner)
            if moved:
                outliner.builder.update_func(gvar, new)
                total += moved
    return (outliner.builder.get() if total else mod), total
