"""Run-time FFN skipping as real control flow: a cheap per-sequence gate and an ONNX ``If`` around the FFN.

For an FFN sub-block ``y = x + FFN(x)`` (then its post-norm, if any) preceded in its layer by an attention
sub-block with input ``h`` and output ``a`` (``a`` is the FFN's ``x``), the gate is FFN-SkipLLM's signal (Jaiswal
et al. 2024, "FFN-SkipLLM: A Hidden Gem for Autoregressive Decoding with Adaptive Feed Forward Skipping"): how
little the blocks already computed changed the hidden state,

    s = mean over tokens of cos(h[t], a[t])      (one scalar per sequence; O(T·d), no weight read)

and the FFN runs only when ``s < τ``: ``y = If(s < τ, then: x + FFN(x), else: x)``. The FFN's nodes move into the
``then`` branch (its weights stay initializers of the main graph, read from the outer scope), so a skipped FFN
reads no weight and runs no kernel: onnxruntime and TVM's Relax ``If`` (which the CPU target compiles to a VM
branch) both execute only the taken branch. ``τ`` per FFN is calibrated so that the FFN is skipped on a
``ratio`` fraction of the calibration sequences (a quantile of ``s``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from effc.ir.calibration import Calibration
from effc.ir.residual import ResidualBlock

GATE_TAG = "effc_ffn_gate"


@dataclasses.dataclass
class Gate:
    """One gated FFN: its attention sub-block (signal), the FFN sub-block, the threshold and the measured signal.

    Attributes:
        name: the FFN's readable name.
        attention: the attention sub-block whose input and output give the signal.
        ffn: the FFN sub-block run under ``If``.
        threshold: ``τ``; the FFN runs when ``s < τ``.
        signals: ``s`` per calibration sequence.
    """

    name: str
    attention: ResidualBlock
    ffn: ResidualBlock
    threshold: float = float("inf")
    signals: list[float] = dataclasses.field(default_factory=list)


def sequence_signal(h: np.ndarray, a: np.ndarray) -> float:
    """``s``: mean over token rows of ``cos(h, a)`` along the last axis (float32, as the graph computes it)."""
    h32, a32 = h.astype(np.float32).reshape(-1, h.shape[-1]), a.astype(np.float32).reshape(-1, a.shape[-1])
    dot = (h32 * a32).sum(-1)
    norm = np.sqrt((h32 * h32).sum(-1)) * np.sqrt((a32 * a32).sum(-1))
    return float((dot / (norm + np.float32(1e-6))).mean())


def calibrate(model: ir.Model, gate: Gate, calibration: Calibration, ratio: float) -> None:
    """Set ``gate``'s threshold so that it skips its FFN on a ``ratio`` fraction of the calibration sequences.

    ``model`` should already hold the gates before this one: the signal is measured on the states it will see.
    """
    h, a = gate.attention.skip.name, gate.attention.output.name
    taps = calibration.tap(model, [h, a], progress=False)
    gate.signals = [sequence_signal(x, y) for x, y in zip(taps[h], taps[a], strict=True)]
    skipped = int(round(ratio * len(gate.signals)))
    ranked = np.sort(np.asarray(gate.signals, dtype=np.float64))[::-1]
    if not skipped:
        gate.threshold = float("inf")
    else:  # midway below the `skipped`-th largest signal: a rounding difference between runtimes flips no sequence
        below = ranked[skipped] if skipped < len(ranked) else ranked[-1] - 1e-3
        gate.threshold = float((ranked[skipped - 1] + below) / 2)


def const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(name, const_value=ir.tensor(array))
    graph.register_initializer(value)
    return value


def row_cosine_nodes(graph: ir.Graph, h: ir.Value, a: ir.Value, tag: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing ``cos(h, a)`` per row along the last axis (kept as size 1), ``h`` and ``a`` of one shape."""
    axes = const(graph, f"{tag}_axes", np.asarray([-1], dtype=np.int64))
    eps = const(graph, f"{tag}_eps", np.asarray(1e-6, dtype=np.float32))
    nodes = [ir.node("Mul", [h, a], name=f"{tag}_ha"), ir.node("Mul", [h, h], name=f"{tag}_hh"),
             ir.node("Mul", [a, a], name=f"{tag}_aa")]
    sums = [ir.node("ReduceSum", [n.outputs[0], axes], attributes={"keepdims": 1}, name=f"{n.name}_sum")
            for n in nodes]
    roots = [ir.node("Sqrt", [s.outputs[0]], name=f"{s.name}_sqrt") for s in sums[1:]]
    norm = ir.node("Mul", [roots[0].outputs[0], roots[1].outputs[0]], name=f"{tag}_norm")
    denom = ir.node("Add", [norm.outputs[0], eps], name=f"{tag}_denom")
    cos = ir.node("Div", [sums[0].outputs[0], denom.outputs[0]], name=f"{tag}_cos")
    return [*nodes, *sums, *roots, norm, denom, cos], cos.outputs[0]


def _signal_nodes(graph: ir.Graph, h: ir.Value, a: ir.Value, tag: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing the scalar ``s`` of :func:`sequence_signal` from ``h`` and ``a`` (same shape, last axis d)."""
    nodes, cos = row_cosine_nodes(graph, h, a, tag)
    mean = ir.node("ReduceMean", [cos], attributes={"keepdims": 0}, name=f"{tag}_signal")
    return [*nodes, mean], mean.outputs[0]


def insert_gate(model: ir.Model, gate: Gate, index: int) -> ir.Node:
    """Rewrite ``gate.ffn`` as ``If(s < τ)`` (see the module docstring); returns the ``If`` node.

    The residual ``Add`` and the FFN's branch nodes move into the ``then`` graph; the ``else`` graph passes the
    skip input through. The post-norm (if any) stays in the main graph and reads the ``If`` output.
    """
    graph, tag = model.graph, f"{GATE_TAG}_{index}"
    signal_nodes, signal = _signal_nodes(graph, gate.attention.skip, gate.attention.output, tag)
    threshold = const(graph, f"{tag}_threshold", np.asarray(gate.threshold, dtype=np.float32))
    run = ir.node("Less", [signal, threshold], name=f"{tag}_run")
    run.outputs[0].name = f"{tag}_run"
    graph.insert_before(gate.ffn.nodes[0], [*signal_nodes, run])
    return branch_block(model, gate.ffn, run.outputs[0], tag)


def branch_block(model: ir.Model, block: ResidualBlock, cond: ir.Value, tag: str,
                 mask: ir.Value | None = None) -> ir.Node:
    """Move residual ``block`` (``y = x + f(x)``) under ``If(cond)``; returns the ``If`` node.

    ``then: x + f(x)`` (``x + f(x)·mask`` with a ``mask``), ``else: x``; the ``If`` goes right after ``cond``'s
    producer.
    The block's nodes and its ``Add`` move into the ``then`` graph (weights stay initializers of the main graph,
    read from the outer scope); readers of ``y`` read the ``If`` output, which also takes ``y``'s graph-output slot
    and name if it had one.
    """
    graph, out = model.graph, block.add.outputs[0]
    moved = [*block.nodes, block.add]
    slots = [i for i, value in enumerate(graph.outputs) if value is out]
    graph.remove(moved)
    if mask is not None:  # the branch's contribution is scaled by the mask: x + f(x) * mask
        k = next(i for i, v in enumerate(block.add.inputs) if v is not block.skip)
        scaled = ir.node("Mul", [block.add.inputs[k], mask], name=f"{tag}_mask")
        scaled.outputs[0].name = f"{tag}_masked"
        block.add.replace_input_with(k, scaled.outputs[0])
        moved.insert(-1, scaled)
    then_graph = ir.Graph([], [out], nodes=moved, name=f"{tag}_then")
    passthrough = ir.node("Identity", [block.skip], name=f"{tag}_skip")
    else_graph = ir.Graph([], [passthrough.outputs[0]], nodes=[passthrough], name=f"{tag}_else")
    passthrough.outputs[0].name = f"{tag}_skipped"
    passthrough.outputs[0].shape, passthrough.outputs[0].type = out.shape, out.type
    branch = ir.node("If", [cond], attributes={"then_branch": then_graph, "else_branch": else_graph}, name=tag)
    result = branch.outputs[0]
    result.shape, result.type = out.shape, out.type
    graph.insert_after(cond.producer(), branch)
    for use in list(out.uses()):
        use.node.replace_input_with(use.idx, result)
    if slots:  # the block's output was a graph output: the If's output takes its slot and name
        result.name, out.name = out.name, f"{out.name}__then"
        for i in slots:
            graph.outputs[i] = result
    else:
        result.name = f"{tag}_out"
    return branch
