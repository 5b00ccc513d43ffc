"""Per-op mechanics of structured pruning, in a registry keyed by ONNX op type.

Each rule answers two questions about a node that a pruned channel space reaches through input ``index``:

* ``flow(node, index, axis, size)`` — where the channels go: a list of :class:`Flow` (output value, its channel
  axis, and ``(in_channel, out_channel)`` pairs), ``SINK`` when the node consumes the channels into a weight's
  reduction axis, or a :class:`Block` with the reason pruning is unsafe there.
* ``apply(node, index, keep)`` — slice the node's own parameters (weights, biases, BN statistics, split sizes,
  ``group``) after the channels not in ``keep`` were removed from input/output ``index``.

Sources (nodes whose output channels can be chosen freely) are described by :func:`source_axis`.
After Fang et al., "DepGraph: Towards Any Structural Pruning" (CVPR 2023) / Torch-Pruning's per-layer pruners.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir


@dataclasses.dataclass
class Flow:
    """Channels of input ``index`` continue in ``value`` (channel ``axis``) through ``pairs`` ``(c_in, c_out)``."""

    value: ir.Value
    axis: int
    pairs: list[tuple[int, int]]


@dataclasses.dataclass
class Block:
    """Pruning through this node is unsafe; ``reason`` says why."""

    reason: str


SINK = "sink"
UNARY = {"Relu", "Gelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Clip", "LeakyRelu", "Silu",
         "Identity", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Softplus", "Cast", "Elu", "Selu", "PRelu"}
POOLS = {"GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "Resize", "Upsample"}
BINARY = {"Add", "Mul", "Sub", "Div"}


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _set(v: ir.Value, arr: np.ndarray) -> None:
    v.const_value = ir.tensor(np.ascontiguousarray(arr), name=v.name)
    v.shape = ir.Shape(arr.shape)


def _rank(v: ir.Value) -> int | None:
    return None if v.shape is None else len(v.shape)


def source_axis(node: ir.Node) -> tuple[int, int] | None:
    """``(weight out axis, activation channel axis)`` when ``node`` creates a prunable channel space, else None.

    MatMul/Gemm with a constant 2-D weight (output = last axis), Conv with ``group == 1`` (output = axis 1),
    ConvTranspose with ``group == 1``. Depthwise/grouped convs pass channels through instead (see :func:`flow`).
    """
    w = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or node.inputs[1].uses().__len__() != 1:
        return None
    group = node.attributes.get_int("group", 1)
    if node.op_type == "MatMul" and w.ndim == 2:
        return 1, -1
    if node.op_type == "Gemm" and w.ndim == 2 and not node.attributes.get_int("transA", 0):
        return (0 if node.attributes.get_int("transB", 0) else 1), -1
    if node.op_type == "Conv" and group == 1:
        return 0, 1
    if node.op_type == "ConvTranspose" and group == 1:
        return 1, 1
    return None


def flow(node: ir.Node, index: int, axis: int, size: int):
    """Where channel axis ``axis`` (``size`` channels) of input ``index`` goes in ``node`` (see module doc)."""
    op = node.op_type
    out = node.outputs[0] if node.outputs else None
    ident = [(c, c) for c in range(size)]
    if node.domain not in ("", "ai.onnx"):
        return Block(f"{node.domain}.{op} is not understood by structured pruning")
    if op in UNARY and index == 0:
        return [Flow(out, axis, ident)]
    if op in POOLS and index == 0 and axis == 1:
        return [Flow(out, axis, ident)]
    if op == "BatchNormalization" and index == 0 and axis == 1:
        return [Flow(out, axis, ident)]
    if op in BINARY:
        rank = _rank(out)
        if rank is None:
            return Block(f"{op} output has no known rank")
        flows = []
        for j, other in enumerate(node.inputs):
            if j == index:
                continue
            c = _const(other)
            if c is not None:
                ax = axis % rank - (rank - c.ndim)
                if c.ndim and 0 <= ax < c.ndim and c.shape[ax] not in (1, size):
                    return Block(f"{op} constant of shape {c.shape} does not broadcast on the channel axis")
                if c.ndim and 0 <= ax < c.ndim and c.shape[ax] == size > 1 and len(other.uses()) > 1:
                    return Block(f"{op} per-channel constant {other.name!r} is shared with other nodes")
                continue
            if _rank(other) != rank or other.shape[axis] != size:
                return Block(f"{op} broadcasts an activation against the channel axis")
            flows.append(Flow(other, axis, ident))  # coupled: e.g. the residual stream of an Add
        return [Flow(out, axis, ident), *flows]
    if op in ("MatMul", "Gemm") and index == 0 and len(node.inputs) > 1 and _const(node.inputs[1]) is not None:
        if node.inputs[1].uses().__len__() != 1:
            return Block("weight shared by several nodes")
        return SINK if axis in (-1, len(node.inputs[0].shape) - 1 if node.inputs[0].shape else -1) else Block(
            "channel axis is not the reduction axis")
    if op in ("Conv", "ConvTranspose") and index == 0 and axis == 1 and _const(node.inputs[1]) is not None:
        w = _const(node.inputs[1])
        group = node.attributes.get_int("group", 1)
        if group == 1:
            return SINK
        if op == "Conv" and group == size and w.shape[1] == 1:  # depthwise or out = k·in
            k = w.shape[0] // size
            return [Flow(out, 1, [(c, c * k + i) for c in range(size) for i in range(k)])]
        return Block(f"grouped {op} with {size // group} input channels per group")
    if op == "Concat":
        rank = _rank(out)
        cat = node.attributes.get_int("axis", 0) % rank if rank else None
        if cat is None:
            return Block("Concat output has no known rank")
        if cat != axis % rank:
            return [Flow(out, axis, ident)] + [Flow(v, axis, ident) for j, v in enumerate(node.inputs) if j != index]
        offset = sum(int(v.shape[cat]) for v in node.inputs[:index])
        others = [Flow(v, axis, []) for j, v in enumerate(node.inputs) if j != index and v is not node.inputs[index]]
        return [Flow(out, axis, [(c, c + offset) for c in range(size)]), *others]
    if op == "Split" and index == 0:
        rank = _rank(node.inputs[0])
        if node.attributes.get_int("axis", 0) % rank != axis % rank:
            return [Flow(o, axis, ident) for o in node.outputs]
        flows, off = [], 0
        for o in node.outputs:
            n = int(o.shape[axis])
            flows.append(Flow(o, axis, [(c, c - off) for c in range(off, off + n)]))
            off += n
        return flows
    if op in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather"):
        return Block(f"{op} moves or splits the channel axis (attention heads need prune-structured(heads=...))")
    if op in ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "InstanceNormalization"):
        return Block(f"{op} reduces over the channel axis (its statistics would change)")
    return Block(f"{op} is not understood by structured pruning")


def apply_source(node: ir.Node, keep: np.ndarray) -> None:
    """Slice a source's weight (output axis) and bias to ``keep``."""
    w_axis, _ = source_axis(node)
    _set(node.inputs[1], np.take(_const(node.inputs[1]), keep, axis=w_axis))
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = _const(node.inputs[2])
        if b is not None and b.ndim == 1 and b.shape[0] > 1:
            _set(node.inputs[2], b[keep])


def apply(node: ir.Node, index: int, keep: np.ndarray, axis: int, size: int) -> None:
    """Slice ``node``'s parameters after input ``index`` (channel ``axis``, ``size`` before) kept ``keep``."""
    op = node.op_type
    if op in ("MatMul", "Gemm"):
        w = _const(node.inputs[1])
        in_axis = 1 if (op == "Gemm" and node.attributes.get_int("transB", 0)) else 0
        _set(node.inputs[1], np.take(w, keep, axis=in_axis))
    elif op in ("Conv", "ConvTranspose"):
        w = _const(node.inputs[1])
        group = node.attributes.get_int("group", 1)
        if group == 1:
            _set(node.inputs[1], np.take(w, keep, axis=1 if op == "Conv" else 0))
        else:  # depthwise / out = k·in: output channels follow their input channel
            k = w.shape[0] // size
            out_keep = (keep[:, None] * k + np.arange(k)[None, :]).ravel()
            _set(node.inputs[1], w[out_keep])
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                _set(node.inputs[2], _const(node.inputs[2])[out_keep])
            node.attributes["group"] = ir.AttrInt64("group", len(keep))
    elif op == "BatchNormalization":
        for v in node.inputs[1:5]:
            _set(v, _const(v)[keep])
    elif op in BINARY:
        rank = _rank(node.outputs[0])
        for v in node.inputs:
            c = _const(v)
            if c is None or not c.ndim:
                continue
            ax = axis % rank - (rank - c.ndim)
            if 0 <= ax < c.ndim and c.shape[ax] == size and size > 1:
                _set(v, np.take(c, keep, axis=ax))
    elif op == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
        pass  # split sizes are rewritten by the driver, which knows every output's kept count
