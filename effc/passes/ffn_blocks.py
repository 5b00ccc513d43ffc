"""FFN blocks found in the ONNX graph, and a torch replica of one block for block-wise reconstruction.

A block is the chain ``MatMul(x, W1) [+ b1] → act → MatMul(·, W2) [+ b2] [+ x] [→ LayerNormalization]`` where:

* ``W1`` ``(K, H)`` and ``W2`` ``(H, C)`` are constant 2-D MatMul weights (ONNX layout ``(Cin, Cout)``), ``b1``
  ``(H,)`` / ``b2`` ``(C,)`` constant biases added right after each MatMul;
* ``act`` is a sub-graph of element-wise ops (``Gelu``, the exported Erf form ``x·0.5·(1+erf(x/√2))``, ``Tanh``,
  ``Relu``, ``Sigmoid`` ...) with one entry value and one exit value, whose other inputs are constants and whose
  inner values are used nowhere else;
* a gated unit (SwiGLU / GeGLU, Shazeer 2020, "GLU Variants Improve Transformer": ``down(act(x·Wg) ⊙ x·Wu)``)
  is learned from the graph: one activation node may read the output of a second MatMul ``x·W3`` (constant
  ``(K, H)``) of the same block input, recorded as ``gate_linear``;
* the optional residual ``Add`` adds the block input ``x`` back, and the optional ``LayerNormalization`` (constant
  scale/bias, last axis) follows the residual.

:func:`find_ffn_blocks` derives that structure from the graph (nothing about a model family is assumed) and says
why a candidate MatMul did not match. :class:`TorchBlock` evaluates the block in torch from the same graph
nodes, so only this one block is re-implemented; everything around it runs in onnxruntime through calibration
taps. The block shape follows the transformer FFN of Vaswani et al., "Attention Is All You Need" (2017).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from effc.ir.elementwise import ELEMENTWISE, torch_elementwise

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FFNBlock:
    """One FFN block of the graph (node references into the model; recomputed on demand, never stored on nodes).

    Attributes:
        up: ``MatMul(x, W1)``, ``W1`` constant ``(K, H)``.
        up_bias: the constant ``(H,)`` bias value added after ``up``, or None.
        act: the element-wise nodes between the (biased) up output and the down input, in graph order.
        act_in: the value entering ``act`` (up output, after its bias).
        down: ``MatMul(a, W2)``, ``W2`` constant ``(H, C)``.
        down_bias: the constant ``(C,)`` bias value, or None.
        out: the block's FFN output (down output, after its bias).
        residual: the output of ``Add(out, x)`` when the block input is added back, else None.
        norm: the ``LayerNormalization`` node fed by the residual (or by ``out``), else None.
        gate_linear: in a gated unit, the second projection ``MatMul(x, W3)`` whose output the activation
            multiplies in (SwiGLU's ``up_proj`` when ``up`` is its ``gate_proj``), else None.
    """

    up: ir.Node
    up_bias: ir.Value | None
    act: list[ir.Node]
    act_in: ir.Value
    down: ir.Node
    down_bias: ir.Value | None
    out: ir.Value
    residual: ir.Value | None
    norm: ir.Node | None
    gate_linear: ir.Node | None = None

    @property
    def x(self) -> ir.Value:
        """The block input (first input of ``up``)."""
        return self.up.inputs[0]

    @property
    def name(self) -> str:
        """``up name → down name`` (for logs and stats)."""
        return f"{self.up.name}→{self.down.name}"

    def output(self, point: str) -> ir.Value:
        """The value at ``point``: ``"ffn"`` (down output + bias), ``"residual"`` or ``"norm"``.

        Raises:
            ValueError: the block has no residual / norm at that point.
        """
        if point == "ffn":
            return self.out
        if point == "residual" and self.residual is not None:
            return self.residual
        if point == "norm" and self.norm is not None:
            return self.norm.outputs[0]
        raise ValueError(f"block {self.name} has no {point} output")


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _single_consumer(value: ir.Value) -> ir.Node | None:
    users = {id(u.node): u.node for u in value.uses()}
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users.values()))


def _bias_after(value: ir.Value, width: int) -> tuple[ir.Value | None, ir.Value]:
    """``(bias, biased output)`` when ``value`` feeds only ``Add(value, const (width,))``, else ``(None, value)``."""
    node = _single_consumer(value)
    if node is None or node.op_type != "Add" or node.domain not in ("", "ai.onnx"):
        return None, value
    other = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
    arr = _const(other)
    if arr is None or arr.shape != (width,):
        return None, value
    return other, node.outputs[0]


def _weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = _const(node.inputs[1])
    return w if w is not None and w.ndim == 2 and len(node.inputs[1].uses()) == 1 else None


def _gate_linear(value: ir.Value, x: ir.Value | None) -> ir.Node | None:
    """The ``MatMul(x, W3)`` (constant 2-D ``W3``) producing ``value``, when ``x`` is the block input."""
    node = value.producer()
    if node is None or x is None or _weight(node) is None or node.inputs[0] is not x:
        return None
    return node


def _activation(start: ir.Value, order: dict[int, int],
                x: ir.Value | None = None) -> tuple[list[ir.Node], ir.Node, ir.Node | None] | str:
    """Element-wise nodes from ``start`` to the down MatMul, or the reason they don't fit.

    Returns ``(act nodes, down MatMul, gated unit's second projection reading block input x or None)``.
    """
    inside: dict[int, ir.Node] = {}
    frontier, down = [start], None
    while frontier:
        value = frontier.pop()
        if value.is_graph_output():
            return f"{value.name} is a graph output"
        for use in value.uses():
            node = use.node
            if id(node) in inside:
                continue
            if node.op_type == "MatMul" and _weight(node) is not None and node.inputs[0] is value:
                if down is not None and down is not node:
                    return "the activation feeds more than one MatMul"
                down = node
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in ELEMENTWISE:
                return f"{node.op_type} node {node.name!r} after the MatMul is not element-wise"
            inside[id(node)] = node
            frontier.extend(node.outputs)
    if down is None:
        return "no MatMul with a constant weight after the activation"
    known = {id(start)} | {id(o) for nd in inside.values() for o in nd.outputs}
    gate = None
    for nd in inside.values():
        for inp in nd.inputs:
            if inp is not None and id(inp) not in known and _const(inp) is None:
                linear = _gate_linear(inp, x) if gate is None else None
                if linear is None or len(inp.uses()) != 1:
                    return (f"{nd.op_type} node {nd.name!r} reads a non-constant value {inp.name!r} from outside the "
                            "block")
                gate, known = linear, known | {id(inp)}
    if id(down.inputs[0]) not in known or (down.inputs[0] is start and inside):
        return "the down MatMul does not read the activation's output"
    return sorted(inside.values(), key=lambda nd: order[id(nd)]), down, gate


def _match(up: ir.Node, order: dict[int, int]) -> FFNBlock | str:
    """The FFN block starting at ``up``, or the reason it is not one."""
    w1 = _weight(up)
    if w1 is None:
        return "not a MatMul with a constant 2-D weight"
    up_bias, act_in = _bias_after(up.outputs[0], w1.shape[1])
    found = _activation(act_in, order, up.inputs[0])
    if isinstance(found, str):
        return found
    act, down, gate = found
    if gate is not None and _weight(gate).shape != w1.shape:
        return f"the gated unit's two projections differ in shape ({w1.shape} vs {_weight(gate).shape})"
    if not act:
        return "no activation between the two MatMuls"
    w2 = _weight(down)
    if w2.shape[0] != w1.shape[1]:
        return f"hidden widths differ ({w1.shape[1]} vs {w2.shape[0]})"
    down_bias, out = _bias_after(down.outputs[0], w2.shape[1])
    residual, norm, tail = None, None, out
    nxt = _single_consumer(out)
    if nxt is not None and nxt.op_type == "Add" and w2.shape[1] == w1.shape[0]:
        other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
        if other is up.inputs[0]:
            residual = tail = nxt.outputs[0]
            nxt = _single_consumer(tail)
    if nxt is not None and nxt.op_type == "LayerNormalization" and nxt.inputs[0] is tail:
        scale, bias = _const(nxt.inputs[1]), _const(nxt.inputs[2] if len(nxt.inputs) > 2 else None)
        axis = nxt.attributes.get_int("axis", -1)
        if scale is not None and scale.shape == (w2.shape[1],) and axis in (-1, len(tail.shape or [0, 0, 0]) - 1):
            if len(nxt.inputs) <= 2 or nxt.inputs[2] is None or bias is not None:
                norm = nxt
    return FFNBlock(up, up_bias, act, act_in, down, down_bias, out, residual, norm, gate)


def find_ffn_blocks(model: ir.Model) -> tuple[list[FFNBlock], list[dict]]:
    """All FFN blocks of the main graph in graph order, plus why other MatMuls with constant weights did not match.

    Returns:
        ``(blocks, skipped)``; ``skipped`` holds ``{"name", "reason"}`` for MatMuls that are not a block's
        up projection (down projections of found blocks are not listed).
    """
    blocks, skipped, downs = [], [], set()
    order = {id(nd): i for i, nd in enumerate(model.graph)}
    for node in model.graph:
        if node.op_type != "MatMul" or _weight(node) is None or id(node) in downs:
            continue
        found = _match(node, order)
        if isinstance(found, str):
            skipped.append({"name": node.name, "reason": found})
            continue
        blocks.append(found)
        downs.add(id(found.down))
    inner = {b.down.name for b in blocks} | {b.gate_linear.name for b in blocks if b.gate_linear is not None}
    skipped = [s for s in skipped if s["name"] not in inner]
    return blocks, skipped


class TorchBlock:
    """The FFN block evaluated in torch from its graph nodes (float32), for one token matrix at a time.

    Args:
        block: the matched block; its activation nodes and LayerNorm attributes are read here, weights are
            passed to :meth:`forward`.

    ``forward(x, w1, b1, w2, b2, point)`` takes ``x`` ``(N, K)`` token rows and ONNX-layout weights ``w1`` ``(K, H)``,
    ``w2`` ``(H, C)`` (biases may be None) and returns the value at ``point`` (``"ffn"``, ``"residual"`` or
    ``"norm"``, see :meth:`FFNBlock.output`) as ``(N, C)``.
    """

    def __init__(self, block: FFNBlock) -> None:
        import torch

        self.torch, self.block, self.ops = torch, block, torch_elementwise(torch)
        self.consts = {}
        for nd in block.act:
            for inp in nd.inputs:
                if inp is not None and _const(inp) is not None:
                    self.consts[id(inp)] = torch.tensor(np.asarray(_const(inp), dtype=np.float32))
        if block.gate_linear is not None:  # a gated unit's second projection stays as it is in the graph
            self.gate_weight = torch.tensor(np.asarray(_const(block.gate_linear.inputs[1]), dtype=np.float32))
        self.norm = None
        if block.norm is not None:
            scale, bias = _const(block.norm.inputs[1]), _const(block.norm.inputs[2] if len(block.norm.inputs) > 2
                                                                else None)
            eps = block.norm.attributes.get_float("epsilon", 1e-5)
            self.norm = (torch.tensor(scale, dtype=torch.float32),
                         None if bias is None else torch.tensor(bias, dtype=torch.float32), eps)

    def activation(self, h, x=None):
        """The activation sub-graph applied to ``h`` ``(N, H)`` (a gated unit also reads block input ``x``)."""
        env = {id(self.block.act_in): h}
        if self.block.gate_linear is not None:
            env[id(self.block.gate_linear.outputs[0])] = x @ self.gate_weight
        for nd in self.block.act:
            args = [env[id(i)] if id(i) in env else self.consts[id(i)] for i in nd.inputs if i is not None]
            env[id(nd.outputs[0])] = self.ops[nd.op_type](*args, nd)
        return env[id(self.block.down.inputs[0])]

    def forward(self, x, w1, b1, w2, b2, point: str = "ffn"):
        """Block output at ``point`` for token rows ``x`` ``(N, K)``; see the class docstring."""
        h = x @ w1 if b1 is None else x @ w1 + b1
        o = self.activation(h, x) @ w2
        o = o if b2 is None else o + b2
        if point == "ffn":
            return o
        o = o + x if self.block.residual is not None else o
        if point == "residual":
            return o
        scale, bias, eps = self.norm
        y = self.torch.nn.functional.layer_norm(o, (o.shape[-1],), scale, bias, eps)
        return y

