"""The main graph of an ONNX model evaluated in torch, differentiable in chosen initializers.

Model-level reconstruction (``reconstruct=model``) needs gradients of the model's outputs with respect to a few
weights. onnxruntime gives no gradients, so this module interprets the already canonicalized graph (constant
shapes, folded constants; see :mod:`effc.ir.canonicalize`) node by node in torch, one feed at a time, with the
same ONNX semantics. Only the ops of the table :data:`OPS` are supported; :func:`check_supported` names the
others so a caller can refuse the model up front with a clear error instead of failing mid-way.

ONNX operator semantics: https://onnx.ai/onnx/operators/ (opset 13+ forms: ``axes`` as inputs where the spec has
them there).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from effc.errors import PassError
from effc.ir.elementwise import ELEMENTWISE, torch_elementwise

# ONNX TensorProto data type -> torch dtype name (Cast targets)
_CAST = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
         11: "float64", 16: "bfloat16"}


def _attr_int(nd: ir.Node, name: str, default: int) -> int:
    return nd.attributes.get_int(name, default)


def _ints_input(nd: ir.Node, env, k: int) -> list[int] | None:
    """An int64 input (axes, shape) as a Python list, or None when absent."""
    if len(nd.inputs) <= k or nd.inputs[k] is None:
        return None
    return [int(v) for v in env(nd.inputs[k]).reshape(-1).tolist()]


def _axes(nd: ir.Node, env, k: int = 1) -> list[int] | None:
    """``axes`` from the input ``k`` (opset 13+/18+) or from the attribute (older opsets)."""
    axes = _ints_input(nd, env, k)
    if axes is None and "axes" in nd.attributes:
        axes = list(nd.attributes.get_ints("axes"))
    return axes


def _reshape(torch, x, shape: list[int], allowzero: int):
    dims = [x.shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(shape)]
    return x.reshape(dims)


def _gather(torch, x, idx, axis: int):
    axis = axis % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])


def _gather_nd(torch, x, idx, batch_dims: int):
    if batch_dims:
        raise PassError("GatherND with batch_dims > 0 is not supported by the torch graph evaluator",
                        "use reconstruct=true (SparseGPT) or reconstruct=false for this model")
    k = idx.shape[-1]
    flat = idx.reshape(-1, k)
    picked = x[tuple(flat[:, i] for i in range(k))]
    return picked.reshape(*idx.shape[:-1], *x.shape[k:])


def _reduce(torch, fn, x, axes, keepdims: int, noop_empty: int):
    if not axes:
        return x if noop_empty else fn(x, dim=tuple(range(x.dim())), keepdim=bool(keepdims))
    return fn(x, dim=tuple(axes), keepdim=bool(keepdims))


def _layer_norm(torch, x, scale, bias, nd):
    axis = _attr_int(nd, "axis", -1) % x.dim()
    eps = nd.attributes.get_float("epsilon", 1e-5)
    return torch.nn.functional.layer_norm(x, tuple(x.shape[axis:]), scale, bias, eps)


def _ops(torch) -> dict:
    """Op type -> ``fn(node, env) -> output tensor`` (``env(value)`` gives an input's tensor)."""
    act = torch_elementwise(torch)

    def elementwise(op):
        return lambda nd, env: act[op](*(env(i) for i in nd.inputs if i is not None), nd)

    ops = {op: elementwise(op) for op in act}
    ops.update({
        "MatMul": lambda nd, env: torch.matmul(env(nd.inputs[0]), env(nd.inputs[1])),
        "Reshape": lambda nd, env: _reshape(torch, env(nd.inputs[0]), _ints_input(nd, env, 1),
                                            _attr_int(nd, "allowzero", 0)),
        "Transpose": lambda nd, env: env(nd.inputs[0]).permute(
            *(nd.attributes.get_ints("perm") or range(env(nd.inputs[0]).dim() - 1, -1, -1))),
        "LayerNormalization": lambda nd, env: _layer_norm(
            torch, env(nd.inputs[0]), env(nd.inputs[1]),
            env(nd.inputs[2]) if len(nd.inputs) > 2 and nd.inputs[2] is not None else None, nd),
        "Softmax": lambda nd, env: torch.softmax(env(nd.inputs[0]), dim=_attr_int(nd, "axis", -1)),
        "Gather": lambda nd, env: _gather(torch, env(nd.inputs[0]), env(nd.inputs[1]), _attr_int(nd, "axis", 0)),
        "GatherND": lambda nd, env: _gather_nd(torch, env(nd.inputs[0]), env(nd.inputs[1]),
                                               _attr_int(nd, "batch_dims", 0)),
        "Cast": lambda nd, env: env(nd.inputs[0]).to(getattr(torch, _CAST[_attr_int(nd, "to", 1)])),
        "ReduceSum": lambda nd, env: _reduce(torch, torch.sum, env(nd.inputs[0]), _axes(nd, env),
                                             _attr_int(nd, "keepdims", 1), _attr_int(nd, "noop_with_empty_axes", 0)),
        "ReduceMean": lambda nd, env: _reduce(torch, torch.mean, env(nd.inputs[0]), _axes(nd, env),
                                              _attr_int(nd, "keepdims", 1), _attr_int(nd, "noop_with_empty_axes", 0)),
        "Unsqueeze": lambda nd, env: _unsqueeze(env(nd.inputs[0]), _axes(nd, env)),
        "Squeeze": lambda nd, env: _squeeze(env(nd.inputs[0]), _axes(nd, env)),
        "And": lambda nd, env: torch.logical_and(env(nd.inputs[0]), env(nd.inputs[1])),
        "Or": lambda nd, env: torch.logical_or(env(nd.inputs[0]), env(nd.inputs[1])),
        "Not": lambda nd, env: torch.logical_not(env(nd.inputs[0])),
        "Equal": lambda nd, env: torch.eq(env(nd.inputs[0]), env(nd.inputs[1])),
        "Where": lambda nd, env: torch.where(env(nd.inputs[0]), env(nd.inputs[1]), env(nd.inputs[2])),
        "Clip": lambda nd, env: _clip(torch, env, nd),
        "Concat": lambda nd, env: torch.cat([env(i) for i in nd.inputs], dim=_attr_int(nd, "axis", 0)),
    })
    return ops


def _unsqueeze(x, axes: list[int]):
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _squeeze(x, axes: list[int] | None):
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def _clip(torch, env, nd):
    x = env(nd.inputs[0])
    lo = env(nd.inputs[1]) if len(nd.inputs) > 1 and nd.inputs[1] is not None else None
    hi = env(nd.inputs[2]) if len(nd.inputs) > 2 and nd.inputs[2] is not None else None
    return torch.clamp(x, min=lo, max=hi)


#: Op types :class:`TorchGraph` evaluates: the element-wise ops of :data:`effc.ir.elementwise.ELEMENTWISE` plus
#: the structural ones below (the keys of ``_ops``; a test keeps the two in step).
SUPPORTED = frozenset(ELEMENTWISE) | frozenset(
    ("MatMul", "Reshape", "Transpose", "LayerNormalization", "Softmax", "Gather", "GatherND", "Cast", "ReduceSum",
     "ReduceMean", "Unsqueeze", "Squeeze", "And", "Or", "Not", "Equal", "Where", "Clip", "Concat"))


def check_supported(model: ir.Model) -> list[str]:
    """Op types of ``model``'s main graph that :class:`TorchGraph` cannot evaluate (sorted; empty when none)."""
    return sorted({nd.op_type for nd in model.graph if nd.op_type not in SUPPORTED or nd.domain not in ("", "ai.onnx")})


class TorchGraph:
    """``model``'s main graph as a torch function of its inputs and of selected initializers.

    Args:
        model: a canonicalized model (static shapes; shape/axes operands are constants).

    Raises:
        PassError: the graph holds an op outside :data:`SUPPORTED` (named, with the fix).

    ``run(feed, overrides)`` evaluates the graph on one feed (``{input name: array}``, shapes as the model's
    inputs) and returns ``{output name: tensor}``; ``overrides`` maps initializer names to torch tensors (e.g.
    trainable weights) used in place of the stored values, so gradients flow to them.
    """

    def __init__(self, model: ir.Model) -> None:
        import torch

        missing = check_supported(model)
        if missing:
            raise PassError(f"the torch graph evaluator does not support op(s) {', '.join(missing)}",
                            "use reconstruct=true (SparseGPT) or reconstruct=false for this model")
        self.torch, self.model, self.ops = torch, model, _ops(torch)
        self.nodes = list(model.graph)
        self.consts: dict[int, object] = {}
        for nd in self.nodes:
            for v in nd.inputs:
                if v is not None and v.const_value is not None and id(v) not in self.consts:
                    self.consts[id(v)] = torch.from_numpy(np.array(v.const_value.numpy()))
        self.outputs = [v.name for v in model.graph.outputs]

    def run(self, feed: dict[str, np.ndarray], overrides: dict[str, object] | None = None) -> dict[str, object]:
        """Outputs of the graph on one feed (see the class docstring)."""
        torch = self.torch
        overrides = overrides or {}
        values: dict[int, object] = {}
        for v in self.model.graph.inputs:
            values[id(v)] = torch.from_numpy(np.asarray(feed[v.name]))

        def env(v: ir.Value):
            key = id(v)
            if key in values:
                return values[key]
            if v.name in overrides:
                return overrides[v.name]
            return self.consts[key]

        for nd in self.nodes:
            values[id(nd.outputs[0])] = self.ops[nd.op_type](nd, env)
        return {v.name: env(v) for v in self.model.graph.outputs}
