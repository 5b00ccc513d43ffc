"""Attention-head groups: Q/K/V projections split into heads by ``Reshape`` and merged back before the output one.

Pattern (BERT-style exports, MiniLM)::

    src_i = MatMul(x, W_i (K, H·D)) [+ b_i]  →  Reshape(..., H, D)  → per-head ops (Transpose, MatMul, Mul/Div, Add,
    Softmax, Where, Cast)  →  Reshape(..., H·D)  →  MatMul(·, W_o (H·D, K))

Removing head ``h`` removes columns ``h·D .. h·D+D-1`` of every ``W_i``/``b_i``, the same rows of ``W_o``, and turns
``H`` into ``H'`` in both reshapes (each gets its own shape constant: exports share them between layers) and on the
head axis of every value in between. Grouped-query attention (K/V with fewer heads than Q) is reported and skipped.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

PER_HEAD_OPS = {"Transpose", "MatMul", "Softmax", "Mul", "Div", "Add", "Sub", "Where", "Cast"}


@dataclasses.dataclass
class HeadGroup:
    """One attention block and its heads.

    Attributes: ``splits`` (source MatMul, bias Add or None, split Reshape), ``merge`` Reshape, output projection
    ``sink``, head count ``heads`` and size ``dim``, the ``inner`` values between split and merge, ``blocked``.
    """

    splits: list[tuple[ir.Node, ir.Node | None, ir.Node]]
    merge: ir.Node | None
    sink: ir.Node | None
    heads: int
    dim: int
    inner: list[ir.Value]
    blocked: str | None = None

    @property
    def name(self) -> str:
        """Name of the first projection node."""
        return self.splits[0][0].name


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _split_of(node: ir.Node):
    """``(src MatMul, bias Add | None, H, D)`` when ``node`` is a Reshape splitting a projection into heads."""
    shape = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    x = node.inputs[0]
    if shape is None or shape.ndim != 1 or len(shape) < 3 or x.shape is None or not isinstance(x.shape[-1], int):
        return None
    dim = int(shape[-1])
    heads = int(shape[-2]) if shape[-2] > 0 else (x.shape[-1] // dim if dim > 0 else 0)
    if heads <= 1 or heads * dim != x.shape[-1]:
        return None
    prod, bias = x.producer(), None
    if prod is not None and prod.op_type == "Add" and _const(prod.inputs[1]) is not None:
        bias, prod = prod, prod.inputs[0].producer()
    if prod is None or prod.op_type != "MatMul" or _const(prod.inputs[1]) is None:
        return None
    return prod, bias, heads, dim


def find_head_groups(model: ir.Model) -> list[HeadGroup]:
    """Attention blocks of ``model`` with their heads (blocked ones carry the reason)."""
    by_merge: dict[int, HeadGroup] = {}
    for node in model.graph:
        if node.op_type != "Reshape" or (found := _split_of(node)) is None:
            continue
        src, bias, heads, dim = found
        seen, stack, merge, blocked, inner = set(), [node.outputs[0]], None, None, []
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            inner.append(v)
            for user, _ in v.uses():
                out = user.outputs[0]
                if user.op_type == "Reshape" and out.shape is not None and out.shape[-1] == heads * dim:
                    if merge is None:
                        merge = user
                    elif merge is not user:
                        blocked = blocked or "the heads are merged by two different Reshapes"
                elif user.op_type in PER_HEAD_OPS:
                    stack.append(out)
                else:
                    repeat = user.op_type in ("Expand", "Tile", "Unsqueeze")
                    gqa = " (grouped-query attention repeats K/V heads)" if repeat else ""
                    blocked = blocked or f"{user.op_type} {user.name!r} between the head split and merge{gqa}"
        key = id(merge) if merge is not None else id(node)
        group = by_merge.setdefault(key, HeadGroup([], merge, None, heads, dim, [], None))
        group.splits.append((src, bias, node))
        group.inner += [v for v in inner if all(v is not w for w in group.inner)]
        group.blocked = group.blocked or blocked
        if (group.heads, group.dim) != (heads, dim):
            group.blocked = (f"grouped-query attention: projections with {group.heads} and {heads} heads share "
                             "one merge (K/V heads serve several Q heads)")
    for g in by_merge.values():
        if g.merge is None:
            g.blocked = g.blocked or "no merge Reshape back to H·D"
            continue
        users = g.merge.outputs[0].uses()
        if len(users) == 1 and users[0][0].op_type == "MatMul" and _const(users[0][0].inputs[1]) is not None:
            g.sink = users[0][0]
        else:
            g.blocked = g.blocked or "the merged heads do not feed one output projection MatMul"
        for v in g.inner:
            if v.shape is None or [d for d in v.shape].count(g.heads) != 1:
                g.blocked = g.blocked or f"cannot locate the head axis of {v.name!r} ({v.shape})"
        if len(g.splits) < 2:
            g.blocked = g.blocked or "fewer than two projections split into heads"
    return list(by_merge.values())


def head_scores(g: HeadGroup) -> np.ndarray:
    """``(H,)`` L2 norm of the weights each head owns (its columns of W_q, W_k, W_v and rows of W_o)."""
    total = np.zeros(g.heads)
    for src, _, _ in g.splits:
        w = _const(src.inputs[1]).astype(np.float64)
        total += np.square(w.reshape(w.shape[0], g.heads, g.dim)).sum(axis=(0, 2))
    wo = _const(g.sink.inputs[1]).astype(np.float64)
    total += np.square(wo.reshape(g.heads, g.dim, -1)).sum(axis=(1, 2))
    return np.sqrt(total)


def _new_const(model: ir.Model, node: ir.Node, index: int, arr: np.ndarray, name: str) -> None:
    v = ir.Value(name=name, const_value=ir.tensor(arr, name=name), shape=ir.Shape(arr.shape),
                 type=ir.TensorType(ir.DataType.INT64))
    model.graph.register_initializer(v)
    node.replace_input_with(index, v)


def _set(v: ir.Value, arr: np.ndarray) -> None:
    v.const_value = ir.tensor(np.ascontiguousarray(arr), name=v.name)
    v.shape = ir.Shape(arr.shape)


def apply_heads(model: ir.Model, g: HeadGroup, keep: np.ndarray) -> None:
    """Keep only heads ``keep`` (sorted indices) of group ``g``; every tensor of the block shrinks."""
    new_h = len(keep)
    ch = (keep[:, None] * g.dim + np.arange(g.dim)[None, :]).ravel()
    for src, bias, reshape in g.splits:
        _set(src.inputs[1], _const(src.inputs[1])[:, ch])
        outs = [src.outputs[0]]
        if bias is not None:
            b = _const(bias.inputs[1])
            _set(bias.inputs[1], b[..., ch])
            outs.append(bias.outputs[0])
        for v in outs:
            v.shape = ir.Shape([*list(v.shape)[:-1], new_h * g.dim])
        shape = _const(reshape.inputs[1]).copy()
        if shape[-2] != -1:
            shape[-2] = new_h
            _new_const(model, reshape, 1, shape, f"{reshape.name}.heads_shape")
    for v in g.inner:
        v.shape = ir.Shape([new_h if d == g.heads else d for d in v.shape])
    shape = _const(g.merge.inputs[1]).copy()
    if shape[-1] != -1:
        shape[-1] = new_h * g.dim
        _new_const(model, g.merge, 1, shape, f"{g.merge.name}.heads_shape")
    out = g.merge.outputs[0]
    out.shape = ir.Shape([*list(out.shape)[:-1], new_h * g.dim])
    _set(g.sink.inputs[1], _const(g.sink.inputs[1])[ch])
