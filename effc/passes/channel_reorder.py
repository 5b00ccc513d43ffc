"""Exact channel reordering before block quantization: ``channel-reorder(score=product)``.

Block formats share one scale per block of 32 consecutive reduction-axis channels, so one outlier channel costs
its 31 neighbours their precision. Sorting the reduction-axis channels by magnitude puts outliers into the same
blocks ("Accurate Block Quantization in LLMs with Outliers", Trukhanov & Soloveychik 2024, section 3). The
permutation ``P`` is applied at compile time so it costs nothing at run time: ``X[..., P] @ W[P, :] = X @ W``.

Each *channel domain* is a connected set of values whose last axis carries the same channels, found from a
linear layer's input by walking:

* backwards through elementwise ops (unary activations, ``Add``/``Mul``/``Div`` with constants, residual
  ``Add``), ``LayerNormalization`` (gamma/beta permuted) to producers that can emit permuted columns:
  MatMul/Gemm with a constant weight (``W[:, P]``) and Gather embedding tables (``T[:, P]``);
* forwards to every reader: linear layers take permuted rows (``W[P, :]``), elementwise ops and LayerNorm
  propagate, anything else (and graph outputs) gets an inverse ``Gather(axis=-1)`` so it sees the original order.

On a BERT-style encoder this finds one domain for the whole residual stream (embeddings, every LayerNorm,
attention output and FFN down-projection columns, Q/K/V and FFN up-projection rows) and one per FFN hidden layer.
A domain reached through an op that mixes channel order (Reshape into attention heads, Concat, Conv) is skipped
with the reason. Scores per channel: ``weight`` = sum over readers of ``max_n |W_kn|``, ``act`` = max ``|x|`` on
calibration data, ``product`` = both multiplied (``act``/``product`` need calibration).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from effc.errors import CalibrationError
from effc.passes.base import EffcPass, PassOptions, register_pass
from effc.passes.rewrite import take_output_slots

__all__ = ["ChannelReorderOptions", "ChannelReorderPass", "find_domains"]

logger = logging.getLogger(__name__)

UNARY = {"Relu", "Gelu", "Tanh", "Sigmoid", "Erf", "Softplus", "LeakyRelu", "Elu", "HardSigmoid", "HardSwish",
         "Identity", "Neg", "Abs", "Sqrt", "Exp", "Log", "Selu", "Mish", "Cast", "Dropout"}
BINARY = {"Add", "Sub", "Mul", "Div"}


class _Skip(Exception):
    """The domain cannot be permuted (the message is the reason)."""


@dataclasses.dataclass
class Domain:
    """Values sharing one channel order and the edits that permute them.

    Attributes:
        size: number of channels (last-axis length).
        readers: linear consumers ``(node, weight)`` whose rows ``W[P, :]`` are permuted (their inputs are tapped).
        cols: producer weights permuted along their last axis (MatMul ``W[:, P]``, Gather tables ``T[:, P]``).
        vecs: constants broadcast along the channel axis (biases, gamma/beta), permuted along the last axis.
        unpermute: ``(node, input index)`` uses that must keep the original order (inverse Gather inserted).
        outputs: graph outputs inside the domain (inverse Gather inserted).
    """

    size: int
    readers: list = dataclasses.field(default_factory=list)
    cols: dict = dataclasses.field(default_factory=dict)
    vecs: dict = dataclasses.field(default_factory=dict)
    unpermute: list = dataclasses.field(default_factory=list)
    outputs: list = dataclasses.field(default_factory=list)
    values: set = dataclasses.field(default_factory=set)


def _const(v: ir.Value | None) -> bool:
    return v is not None and v.const_value is not None


def _weight_reader(node: ir.Node, idx: int) -> bool:
    return (node.op_type == "MatMul" and idx == 0 and _const(node.inputs[1])
            and len(node.inputs[1].const_value.shape) == 2)


def _add_vec(dom: Domain, v: ir.Value) -> None:
    shape = tuple(v.const_value.shape)
    if not shape or shape[-1] == 1:
        return  # scalar / broadcast along channels: order-free
    if shape[-1] != dom.size:
        raise _Skip(f"constant {v.name} has last dim {shape[-1]} != {dom.size}")
    dom.vecs[id(v)] = v


def _explore(start: ir.Value, size: int) -> Domain:
    dom, todo = Domain(size), [start]
    while todo:
        v = todo.pop()
        if id(v) in dom.values:
            continue
        dom.values.add(id(v))
        if v.shape is None or len(v.shape) == 0 or v.shape[-1] != size:
            raise _Skip(f"value {v.name} does not end in the channel axis ({v.shape})")
        if v.is_graph_input():
            raise _Skip(f"graph input {v.name} carries the channels")
        if v.is_graph_output():
            dom.outputs.append(v)
        node = v.producer()
        if node is None:
            raise _Skip(f"{v.name} has no producer")
        op = node.op_type
        if op in UNARY or (op in BINARY | {"LayerNormalization"}):
            _visit_node(dom, node, todo)
        elif op == "MatMul" and _const(node.inputs[1]) and len(node.inputs[1].const_value.shape) == 2:
            dom.cols[id(node.inputs[1])] = node.inputs[1]
        elif op == "Gather" and _const(node.inputs[0]) and node.attributes.get_int("axis", 0) == 0:
            dom.cols[id(node.inputs[0])] = node.inputs[0]
        else:
            raise _Skip(f"channels come from {op} node {node.name!r}, which cannot emit them permuted")
        for use in v.uses():
            user, idx = use.node, use.idx
            if _weight_reader(user, idx):
                dom.readers.append((user, user.inputs[1]))
            elif user.op_type in UNARY or user.op_type in BINARY or (user.op_type == "LayerNormalization"
                                                                      and idx == 0):
                _visit_node(dom, user, todo)
            else:
                dom.unpermute.append((user, idx))
    return dom


def _visit_node(dom: Domain, node: ir.Node, todo: list) -> None:
    """An elementwise / LayerNorm node inside the domain: its float inputs and output join it."""
    if node.op_type == "LayerNormalization":
        if node.attributes.get_int("axis", -1) not in (-1, len(node.inputs[0].shape or ()) - 1):
            raise _Skip(f"LayerNormalization {node.name!r} does not normalize the last axis")
        for v in node.inputs[1:]:
            if v is not None:
                if not _const(v):
                    raise _Skip(f"LayerNormalization {node.name!r} has a computed scale/bias")
                _add_vec(dom, v)
        todo.append(node.inputs[0])
        todo.append(node.outputs[0])
        if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
            raise _Skip(f"LayerNormalization {node.name!r} exports mean/inv-std")
        return
    for v in node.inputs[: 2 if node.op_type in BINARY else 1]:
        if _const(v):
            _add_vec(dom, v)
        elif v is not None and v.shape is not None and len(v.shape) and v.shape[-1] == 1:
            continue  # broadcast along the channels (e.g. a mask of shape (B, S, 1)): order-free
        elif v is not None:
            todo.append(v)
    todo.append(node.outputs[0])


def find_domains(model: ir.Model) -> tuple[list[Domain], list[dict[str, str]]]:
    """Channel domains of all linear layers' inputs, and the skipped ones with reasons."""
    domains, skipped, seen = [], [], set()
    for node in model.graph:
        if node.op_type != "MatMul" or not _weight_reader(node, 0) or id(node.inputs[0]) in seen:
            continue
        size = node.inputs[1].const_value.shape[0]
        try:
            dom = _explore(node.inputs[0], size)
        except _Skip as why:
            skipped.append({"node": node.name or "", "reason": str(why)})
            seen.add(id(node.inputs[0]))
            continue
        seen |= dom.values
        domains.append(dom)
    return domains, skipped


@dataclasses.dataclass(frozen=True)
class ChannelReorderOptions(PassOptions):
    """Options of ``channel-reorder``."""

    score: str = dataclasses.field(
        default="product", metadata={"help": "channel score: weight | act | product", "choices": ("weight", "act",
                                                                                               "product")})

    def validate(self) -> None:
        """Raises: PipelineError: unknown score."""
        if self.score not in ("weight", "act", "product"):
            self.fail("score", self.score, "weight | act | product")


def _permute(v: ir.Value, perm: np.ndarray, axis: int) -> None:
    arr = np.take(v.const_value.numpy(), perm, axis=axis)
    v.const_value = ir.Tensor(np.ascontiguousarray(arr), dtype=v.const_value.dtype, name=v.name)


@register_pass
class ChannelReorderPass(EffcPass):
    """Sort reduction-axis channels by magnitude inside every propagatable channel domain (exact).

    Stats: ``domains`` (list of size, readers, producers, unpermute gathers), ``skipped`` (node, reason),
    ``channels_permuted``.

    Raises:
        CalibrationError: ``score=act`` without calibration data.
    """

    name = "channel-reorder"
    summary = "exact reduction-axis channel permutation grouping outliers into the same blocks (before block-quant)"
    Options = ChannelReorderOptions
    exact = True
    uses_calibration = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Find domains, score channels, apply the permutations."""
        score = self.options.score
        if score == "act" and self.calibration is None:
            raise CalibrationError("channel-reorder(score=act) needs calibration data",
                                   "give --data, use a zoo: model, or use score=weight")
        if score == "product" and self.calibration is None:
            score = "weight"
        domains, skipped = find_domains(model)
        taps = {}
        if score != "weight" and domains:
            names = sorted({r[0].inputs[0].name for d in domains for r in d.readers})
            taps = self.calibration.tap(model, names, progress=False)
        report, permuted = [], 0
        for i, dom in enumerate(domains):
            s = np.zeros(dom.size)
            for _, w in dom.readers:
                s += np.abs(w.const_value.numpy()).max(axis=1)
            if score != "weight":
                act = np.zeros(dom.size)
                for node, _ in dom.readers:
                    for x in taps[node.inputs[0].name]:
                        act = np.maximum(act, np.abs(x.reshape(-1, dom.size)).max(axis=0))
                s = act if score == "act" else s * act
            perm = np.argsort(-s, kind="stable")
            if np.array_equal(perm, np.arange(dom.size)):
                continue
            self._apply(model, dom, perm, f"reorder{i}")
            permuted += dom.size
            report.append({"size": dom.size, "readers": len(dom.readers), "producers": len(dom.cols),
                           "constants": len(dom.vecs), "unpermute": len(dom.unpermute) + len(dom.outputs)})
        self.stats = {"domains": report, "skipped": skipped, "channels_permuted": permuted, "score": score}
        logger.info("channel-reorder: %d domain(s), %d skipped", len(report), len(skipped))
        return ir.passes.PassResult(model, modified=bool(report))

    def _apply(self, model: ir.Model, dom: Domain, perm: np.ndarray, tag: str) -> None:
        for _, w in dom.readers:
            if id(w) not in dom.cols:
                _permute(w, perm, 0)
        for w in dom.cols.values():
            _permute(w, perm, -1)
        for v in dom.vecs.values():
            _permute(v, perm, -1)
        inv = np.argsort(perm).astype(np.int64)
        if not dom.unpermute and not dom.outputs:
            return
        idx = ir.Value(name=f"{tag}_inverse", const_value=ir.Tensor(inv, name=f"{tag}_inverse"))
        model.graph.register_initializer(idx)
        for user, i in dom.unpermute:
            src = user.inputs[i]
            g = ir.node("Gather", [src, idx], {"axis": -1}, name=f"{src.name}/{tag}_unpermute")
            g.outputs[0].shape, g.outputs[0].type = src.shape, src.type
            model.graph.insert_before(user, [g])
            user.replace_input_with(i, g.outputs[0])
        for out in dom.outputs:
            g = ir.node("Gather", [out, idx], {"axis": -1}, name=f"{out.name}/{tag}_unpermute")
            model.graph.insert_after(out.producer(), [g])
            take_output_slots(model.graph, out, g.outputs[0])  # the Gather still reads ``out``
