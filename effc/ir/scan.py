"""Unroll ONNX ``Scan`` nodes with a static sequence length into copies of their body (TVM 0.27 has no Scan).

Source: ONNX operator spec, ``Scan`` (opset 9-25). A Scan has ``N`` state inputs and ``M = num_scan_inputs`` scan
inputs; its body maps ``(states, one slice of every scan input)`` to ``(new states, one slice of every scan
output)``. With ``T`` slices along ``scan_input_axes`` (read from the end for ``scan_input_directions`` 1), the
unrolled graph is, per step ``t``: ``Gather(x_j, t, axis)`` for every scan input, a renamed copy of the body,
and at the end ``Concat`` of the per-step slices (``Unsqueeze``d along ``scan_output_axes``, in reverse order for
``scan_output_directions`` 1); the final states are the last step's. ONNX's own ``LinearAttention`` function body is
such a Scan. Scans whose body holds subgraphs, or whose scan inputs have no static length, are left for the
frontend's unsupported-op check.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from effc.ir.expand import default_opset, value_types

logger = logging.getLogger(__name__)

#: Longest sequence unrolled (the graph grows by one body copy per step).
MAX_STEPS = 256


def _attr(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    found = next((a for a in node.attribute if a.name == name), None)
    return list(found.ints) if found is not None else default


def _rank_and_length(types: dict[str, onnx.TypeProto], name: str, axis: int) -> tuple[int, int] | None:
    kind = types.get(name)
    if kind is None or not kind.HasField("tensor_type") or not kind.tensor_type.HasField("shape"):
        return None
    dims = kind.tensor_type.shape.dim
    rank = len(dims)
    dim = dims[axis % rank] if rank else None
    if dim is None or not dim.HasField("dim_value"):
        return None
    return rank, dim.dim_value


def _why_not(node: onnx.NodeProto, types: dict[str, onnx.TypeProto]) -> str | None:
    body = next(a.g for a in node.attribute if a.name == "body")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in body.node for a in n.attribute):
        return "its body holds subgraphs"
    m = next(a.i for a in node.attribute if a.name == "num_scan_inputs")
    scans = list(node.input)[len(node.input) - m:]
    axes = _attr(node, "scan_input_axes", [0] * m)
    found = [_rank_and_length(types, name, axis) for name, axis in zip(scans, axes, strict=True)]
    lengths = {None if f is None else f[1] for f in found}
    if None in lengths or len(lengths) != 1:
        return f"scan inputs without one static length ({sorted(map(str, lengths))})"
    if lengths.pop() > MAX_STEPS:
        return f"more than {MAX_STEPS} steps"
    return None


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value, name))


def _unroll(node: onnx.NodeProto, tag: str, types: dict[str, onnx.TypeProto], opset: int) -> list[onnx.NodeProto]:
    """The nodes that compute ``node``'s outputs (same names) step by step."""
    body = next(a.g for a in node.attribute if a.name == "body")
    m = next(a.i for a in node.attribute if a.name == "num_scan_inputs")
    n = len(node.input) - m
    k = len(body.output) - n
    scans = list(node.input)[n:]
    in_axes = _attr(node, "scan_input_axes", [0] * m)
    in_dirs = _attr(node, "scan_input_directions", [0] * m)
    out_axes = _attr(node, "scan_output_axes", [0] * k)
    out_dirs = _attr(node, "scan_output_directions", [0] * k)
    ranks_lengths = [_rank_and_length(types, name, axis) for name, axis in zip(scans, in_axes, strict=True)]
    steps = ranks_lengths[0][1]
    nodes: list[onnx.NodeProto] = []
    states = list(node.input)[:n]
    slices: list[list[str]] = [[] for _ in range(k)]
    for init in body.initializer:  # body constants: once, renamed
        nodes.append(_const(f"{tag}_{init.name}", onnx.numpy_helper.to_array(init)))
    for t in range(steps):
        rename = {init.name: f"{tag}_{init.name}" for init in body.initializer}
        rename.update({v.name: s for v, s in zip(body.input[:n], states, strict=True)})
        for j, (name, axis, direction) in enumerate(zip(scans, in_axes, in_dirs, strict=True)):
            index, element = f"{tag}_t{t}_index{j}", f"{tag}_t{t}_{body.input[n + j].name}"
            nodes.append(_const(index, np.array(steps - 1 - t if direction else t, np.int64)))
            nodes.append(onnx.helper.make_node("Gather", [name, index], [element], axis=axis % ranks_lengths[j][0]))
            rename[body.input[n + j].name] = element
        for inner in body.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(inner)
            copy.name = f"{tag}_t{t}_{inner.name}" if inner.name else ""
            copy.input[:] = [rename.get(x, x) for x in inner.input]
            for i, out in enumerate(inner.output):
                if out:
                    rename[out] = f"{tag}_t{t}_{out}"
                    copy.output[i] = rename[out]
            nodes.append(copy)
        mapped = [rename.get(v.name, v.name) for v in body.output]
        states = mapped[:n]
        for j in range(k):
            slices[j].append(mapped[n + j])
    for out, state in zip(node.output[:n], states, strict=True):
        if out:
            nodes.append(onnx.helper.make_node("Identity", [state], [out]))
    for j, out in enumerate(node.output[n:]):
        if not out:
            continue
        rank = _rank_and_length(types, out, 0)
        axis = out_axes[j] % rank[0] if rank else out_axes[j]
        parts = []
        for t, name in enumerate(slices[j][::-1] if out_dirs[j] else slices[j]):
            part = f"{tag}_{out}_part{t}"
            if opset >= 13:
                axes = f"{tag}_{out}_axes"
                if t == 0:
                    nodes.append(_const(axes, np.array([axis], np.int64)))
                nodes.append(onnx.helper.make_node("Unsqueeze", [name, axes], [part]))
            else:
                nodes.append(onnx.helper.make_node("Unsqueeze", [name], [part], axes=[axis]))
            parts.append(part)
        nodes.append(onnx.helper.make_node("Concat", parts, [out], axis=axis))
    return nodes


def unroll_scans(model: ir.Model) -> tuple[ir.Model, int]:
    """Unroll the main graph's ``Scan`` nodes that have a static sequence length and a plain body.

    Args:
        model: a model whose values carry types (run shape inference first); not modified.

    Returns:
        ``(model, count)``: a new model with the Scans unrolled, or ``model`` itself when there were none.
    """
    if not any(node.op_type == "Scan" for node in model.graph):
        return model, 0
    proto = ir.to_proto(model)
    types = value_types(proto.graph)
    opset = default_opset(proto)
    if opset < 9:  # Scan-8 has a batch axis and sequence_lens: another operator
        return model, 0
    nodes, count = [], 0
    for k, node in enumerate(proto.graph.node):
        if node.op_type != "Scan" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        reason = _why_not(node, types)
        if reason is not None:
            logger.info("Scan node %r left for the frontend: %s", node.name, reason)
            nodes.append(node)
            continue
        nodes.extend(_unroll(node, f"scan{k}", types, opset))
        count += 1
    if not count:
        return model, 0
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return ir.from_proto(proto), count
