"""Find int8-activation QDQ layers and hand them to effc's int8 micro-kernels (:mod:`effc.codegen.mcu.s8_kernels`).

A statically quantized model in onnxruntime's QDQ format (``quantize_static``) wraps every conv/matmul as::

    DequantizeLinear(xq, sx, zx) ─┐
    DequantizeLinear(Wq, sw)     ─┼─> Conv | Gemm | MatMul ─> [Relu] ─> QuantizeLinear(sy, zy) ─> yq
    DequantizeLinear(Bq, sx*sw)  ─┘      (bias optional)

Each match (int8 xq/Wq/yq, zero weight zero points, int32 bias, scalar activation scales, Conv 2-D on one image
with groups 1 or depthwise) becomes one ``effc.McuS8Conv`` / ``effc.McuS8DwConv`` / ``effc.McuS8MatMul`` node that
maps ``xq`` straight to ``yq``:

    acc[c] = bias'[c] + sum_k xq[k] * Wq[c, k],   bias'[c] = Bq[c] - zx * sum_k Wq[c, k]   (zero point folded)
    yq[c] = clamp(zy + round(acc[c] * sx * sw[c] / sy), relu ? zy : -128, 127)

with the real multiplier ``sx * sw[c] / sy`` as a fixed-point ``(mult, shift)`` pair (``mult`` in [2^30, 2^31)).
Weights are stored int8, pre-arranged in channel pairs for the 2x2 micro-kernel (see ``s8_kernels.c``).

The rewrite works on a private copy inside the lowering: the artifact's ``model.onnx`` (the reference onnxruntime
runs) keeps its QDQ nodes. Results match onnxruntime within one output quantization step (onnxruntime computes the
conv in float then rounds; the kernel sums exactly in int32 then rounds once).

Source: onnxruntime quantization, QDQ format (``onnxruntime/python/tools/quantization``); Jacob et al.,
"Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018, §2.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper

from effc.ops.base import EFFC_DOMAIN, EFFC_OPSET_VERSION

logger = logging.getLogger(__name__)

OP_CONV = "McuS8Conv"
OP_MATMUL = "McuS8MatMul"
OP_DWCONV = "McuS8DwConv"


@dataclasses.dataclass
class S8Layer:
    """One matched layer, ready for the kernel.

    Attributes:
        op: ``McuS8Conv``, ``McuS8DwConv`` or ``McuS8MatMul``.
        x: name of the int8 input value; y: name of the int8 output value.
        weights: pre-arranged int8 weights (channel pairs, see ``s8_kernels.c``), 1-D.
        bias: int32 bias with the input zero point folded in, shape (N,).
        mult / shift: int32 fixed-point requantization per output channel, shape (N,): the real multiplier is
            ``mult * 2**-(31 + shift)``, ``shift`` in [0, 31].
        attrs: integer attributes of the node (``n``, ``zy``, ``lo``; conv ``geom``; matmul ``m``, ``k``).
        removed: names of the nodes the layer replaces.
    """

    op: str
    x: str
    y: str
    weights: np.ndarray
    bias: np.ndarray
    mult: np.ndarray
    shift: np.ndarray
    attrs: dict[str, int | list[int]]
    removed: list[str]


def fixed_point(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``real ≈ mult * 2**-shift`` with ``mult`` in [2^30, 2^31) and ``shift`` in [1, 62] (int32 arrays).

    Raises:
        ValueError: a multiplier is not positive or out of the representable range.
    """
    mults, shifts = [], []
    for r in np.asarray(real, dtype=np.float64).reshape(-1):
        if not r > 0:
            raise ValueError(f"requantization multiplier {r} is not positive")
        frac, exp = math.frexp(float(r))  # r = frac * 2**exp, frac in [0.5, 1)
        mult = round(frac * (1 << 31))
        if mult == 1 << 31:
            mult, exp = mult // 2, exp + 1
        shift = 31 - exp
        if not 1 <= shift <= 62:
            raise ValueError(f"requantization multiplier {r} out of the fixed-point range")
        mults.append(mult)
        shifts.append(shift)
    return np.array(mults, dtype=np.int32), np.array(shifts, dtype=np.int32)


def pack_pairs(w: np.ndarray) -> np.ndarray:
    """Arrange int8 weights (N, K) for the 2x2 micro-kernel.

    Per channel pair: K/4 blocks of [4 bytes of row n, 4 bytes of row n+1], then the K%4 tail of row n and of row
    n+1 (an odd last row pairs with zeros). Returns a 1-D int8 array of 2 * ceil(N/2) * K bytes.
    """
    n, k = w.shape
    if n % 2:
        w = np.concatenate([w, np.zeros((1, k), dtype=w.dtype)])
    k4 = k // 4 * 4
    out = []
    for r in range(0, w.shape[0], 2):
        a, b = w[r], w[r + 1]
        blocks = np.stack([a[:k4].reshape(-1, 4), b[:k4].reshape(-1, 4)], axis=1).reshape(-1)
        out += [blocks, a[k4:], b[k4:]]
    return np.concatenate(out).astype(np.int8)


class _Graph:
    """Producers, consumers and constants of an ONNX graph (proto)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for i in n.input:
                self.users.setdefault(i, []).append(n)
        self.outputs = {v.name for v in graph.output}

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def dq(self, value: str) -> tuple[onnx.NodeProto, np.ndarray | None, np.ndarray, np.ndarray | None, int] | None:
        """``(node, q_const_or_None, scale, zero_point, axis)`` when ``value`` comes from a DequantizeLinear."""
        node = self.producer.get(value)
        if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
            return None
        scale = self.const(node.input[1])
        if scale is None:
            return None
        zp = self.const(node.input[2]) if len(node.input) > 2 else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        return node, self.const(node.input[0]), scale, zp, axis

    def single_user(self, value: str) -> onnx.NodeProto | None:
        users = self.users.get(value, [])
        return users[0] if len(users) == 1 and value not in self.outputs else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _value_dtype(graph: _Graph, value: str) -> int | None:
    """ONNX element type of the input of a DequantizeLinear (from its producer Q or the graph inputs)."""
    prod = graph.producer.get(value)
    if prod is not None and prod.op_type == "QuantizeLinear" and len(prod.input) > 2:
        zp = graph.const(prod.input[2])
        return helper.np_dtype_to_tensor_dtype(zp.dtype) if zp is not None else None
    for v in graph.graph.input:
        if v.name == value:
            return v.type.tensor_type.elem_type
    return None


def _match(graph: _Graph, node: onnx.NodeProto, shapes: dict[str, list[int]]) -> S8Layer | None:
    """The :class:`S8Layer` for ``node`` (Conv/Gemm/MatMul), or None when the pattern does not hold."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "Gemm", "MatMul"):
        return None
    x_dq, w_dq = graph.dq(node.input[0]), graph.dq(node.input[1])
    if x_dq is None or w_dq is None or w_dq[1] is None or w_dq[1].dtype != np.int8:
        return None
    if _value_dtype(graph, x_dq[0].input[0]) != onnx.TensorProto.INT8 or x_dq[2].size != 1:
        return None
    if w_dq[3] is not None and w_dq[3].any():
        return None
    zx = int(x_dq[3].reshape(-1)[0]) if x_dq[3] is not None else 0
    sx = float(x_dq[2].reshape(-1)[0])
    # Output chain: [Relu] -> QuantizeLinear(int8, scalar scale).
    removed = [node.name]
    out = node.output[0]
    user = graph.single_user(out)
    relu = user is not None and user.op_type == "Relu"
    if relu:
        removed.append(user.name)
        out = user.output[0]
        user = graph.single_user(out)
    if user is None or user.op_type != "QuantizeLinear" or len(user.input) < 3:
        return None
    sy, zy = graph.const(user.input[1]), graph.const(user.input[2])
    if sy is None or zy is None or sy.size != 1 or zy.dtype != np.int8:
        return None
    removed.append(user.name)
    wq = w_dq[1]
    if node.op_type == "Conv":
        xs, group = shapes.get(node.input[0]), _attr(node, "group", 1)
        if wq.ndim != 4 or _attr(node, "auto_pad", b"NOTSET") != b"NOTSET" or xs is None or len(xs) != 4:
            return None
        n, c, kh, kw = wq.shape
        depthwise = group == xs[1] == n and c == 1
        if xs[0] != 1 or not (group == 1 or depthwise):
            return None
        strides, dil = _attr(node, "strides", [1, 1]), _attr(node, "dilations", [1, 1])
        pads = _attr(node, "pads", [0, 0, 0, 0])
        oh = (xs[2] + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
        ow = (xs[3] + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
        w2, axis_ok = wq.reshape(n, -1), w_dq[4] % 4 == 0
        attrs = {"geom": [xs[1], xs[2], xs[3], kh, kw, *strides, pads[0], pads[1], *dil, oh, ow, zx]}
        op = OP_DWCONV if depthwise else OP_CONV
    else:
        xs = shapes.get(node.input[0])
        trans_b = node.op_type == "Gemm" and _attr(node, "transB", 0) == 1
        if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0):
            return None
        if node.op_type == "Gemm" and _attr(node, "beta", 1.0) != 1.0 or xs is None or len(xs) != 2 or wq.ndim != 2:
            return None
        w2 = wq if trans_b else wq.T
        n = w2.shape[0]
        axis_ok = (w_dq[4] % 2) == (0 if trans_b else 1)
        attrs = {"m": xs[0], "k": xs[1]}
        op = OP_MATMUL
    sw = w_dq[2].reshape(-1).astype(np.float64)
    if sw.size not in (1, n) or (sw.size == n and n > 1 and not axis_ok):
        return None
    sw = np.broadcast_to(sw, (n,))
    bias = np.zeros(n, dtype=np.int64)
    if len(node.input) > 2 and node.input[2]:
        b_dq = graph.dq(node.input[2])
        if b_dq is None or b_dq[1] is None or b_dq[1].dtype != np.int32 or (b_dq[3] is not None and b_dq[3].any()):
            return None
        sb = np.broadcast_to(b_dq[2].reshape(-1).astype(np.float64), (n,))
        bias = np.round(b_dq[1].reshape(-1).astype(np.float64) * sb / (sx * sw)).astype(np.int64)
    bias -= zx * w2.astype(np.int64).sum(axis=1)
    try:
        mult, shift = fixed_point(sx * sw / float(sy.reshape(-1)[0]))
    except ValueError as exc:
        logger.info("int8 kernel skipped for %s: %s", node.name, exc)
        return None
    if (shift < 31).any():  # the kernel rescales by mult / 2^31 then shifts right: multipliers below 1 only
        logger.info("int8 kernel skipped for %s: requantization multiplier >= 1", node.name)
        return None
    if np.abs(bias).max(initial=0) >= 2**31:
        return None
    attrs.update(n=n, zy=int(zy.reshape(-1)[0]), lo=int(zy.reshape(-1)[0]) if relu else -128)
    weights = w2.reshape(-1) if op == OP_DWCONV else pack_pairs(w2)  # depthwise: (C, KH*KW) as is
    return S8Layer(op, x_dq[0].input[0], user.output[0], weights, bias.astype(np.int32), mult, shift - 31,
                   attrs, removed)  # fmt: skip


#: Ops that commute with a per-tensor QDQ pair (same scale and zero point on both sides): run them on int8.
_INT8_PASSTHROUGH = frozenset({"MaxPool", "Reshape", "Flatten"})


def _passthrough(graph: _Graph, node: onnx.NodeProto) -> tuple[str, str, list[str]] | None:
    """``DequantizeLinear(xq) -> MaxPool|Reshape|Flatten -> QuantizeLinear`` with equal (scale, zero point).

    Returns:
        ``(xq, yq, [op, q])``: the op can read ``xq`` and write ``yq`` directly (max and reshapes commute with a
        monotonic per-tensor dequantize), or None.
    """
    if node.op_type not in _INT8_PASSTHROUGH or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    if node.op_type == "MaxPool" and _attr(node, "storage_order", 0) != 0:
        return None
    x_dq, q = graph.dq(node.input[0]), graph.single_user(node.output[0])
    if x_dq is None or x_dq[3] is None or q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
        return None
    sy, zy = graph.const(q.input[1]), graph.const(q.input[2])
    if sy is None or zy is None or sy.size != 1 or x_dq[2].size != 1 or x_dq[3].dtype != zy.dtype:
        return None
    same_scale = float(sy.reshape(-1)[0]) == float(x_dq[2].reshape(-1)[0])
    if not same_scale or int(zy.reshape(-1)[0]) != int(x_dq[3].reshape(-1)[0]):
        return None
    return x_dq[0].input[0], q.output[0], [node.name, q.name]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]
    return shapes


def rewrite_s8_layers(model: ir.Model) -> tuple[ir.Model, list[S8Layer]]:
    """Replace every matching QDQ conv/matmul by an effc int8 node (see the module docstring).

    Args:
        model: the model (not modified).

    Returns:
        ``(model, layers)``: a rewritten copy and the layers replaced (``model`` itself when none matched).
    """
    proto = ir.to_proto(model)
    for i, node in enumerate(proto.graph.node):  # the rewrite identifies nodes by name
        node.name = node.name or f"{node.op_type}__{i}"
    graph = _Graph(proto.graph)
    shapes = _shapes(proto)
    layers = [layer for node in proto.graph.node if (layer := _match(graph, node, shapes)) is not None]
    if not layers:
        return model, []
    passes = {node.name: p for node in proto.graph.node if (p := _passthrough(graph, node)) is not None}
    removed = {name for layer in layers for name in layer.removed} | {p[2][1] for p in passes.values()}
    first = {layer.removed[0]: layer for layer in layers}
    nodes, inits = [], list(proto.graph.initializer)
    for node in proto.graph.node:
        if node.name in first:
            layer = first[node.name]
            names = [f"{layer.y}__s8_{k}" for k in ("w", "b", "mult", "shift")]
            arrays = (layer.weights, layer.bias, layer.mult, layer.shift)
            inits += [numpy_helper.from_array(a, nm) for a, nm in zip(arrays, names, strict=True)]
            nodes.append(helper.make_node(layer.op, [layer.x, *names], [layer.y], name=f"{node.name}__s8",
                                          domain=EFFC_DOMAIN, **layer.attrs))  # fmt: skip
        elif node.name in passes:
            node.input[0], node.output[0] = passes[node.name][0], passes[node.name][1]
            nodes.append(node)
        elif node.name not in removed:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
    _drop_dead(proto)
    if not any(o.domain == EFFC_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(EFFC_DOMAIN, EFFC_OPSET_VERSION))
    logger.info(
        "int8 activations: %d conv/matmul layer(s) on effc's int8 micro-kernels, %d pool/reshape(s) on int8",
        len(layers),
        len(passes),
    )
    return ir.from_proto(proto), layers


def _drop_dead(proto: onnx.ModelProto) -> None:
    """Remove nodes whose outputs nobody reads (the weight/input DequantizeLinear nodes left behind)."""
    live = {v.name for v in proto.graph.output}
    keep = []
    for node in reversed(proto.graph.node):
        if any(o in live for o in node.output):
            keep.append(node)
            live.update(node.input)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(keep))
    inits = [t for t in proto.graph.initializer if t.name in live]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(inits)
