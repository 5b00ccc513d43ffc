"""Residual blocks of a graph: the sub-blocks ``y = x + f(x)`` and the transformer layers they form.

A residual sub-block is found from its ``Add``: one input ``x`` (the *skip*) is an ancestor of the other input
``f(x)`` (the *branch output*); the branch is every node that depends on ``x`` and feeds ``f(x)``. The branch must
hold at least one weight (a MatMul, Gemm or Conv with a constant weight), otherwise the ``Add`` is plain arithmetic
(positional embeddings, biases), and both inputs must have the same shape (a broadcast attention mask added to
scores that depend on it through earlier layers is no residual). A normalization right after the ``Add`` that only
it feeds (post-norm, BERT) is recorded as the block's ``norm``; pre-norm blocks (Llama) carry their norm inside the
branch.

Kinds: ``attention`` (the branch holds a Softmax), ``ffn`` (two or more weight MatMuls and no Softmax), ``conv``
(a Conv), else ``residual``. Two consecutive sub-blocks, attention then FFN, where the FFN's skip is the attention
block's output, form a :class:`TransformerLayer` ("Attention Is All You Need", Vaswani et al. 2017; the blocks
that ShortGPT, Men et al. 2024, and SLEB, Song et al. 2024, remove).

Nothing is assumed about a model family: a branch value read outside the branch (besides the ``Add``) is
recorded in ``leaks`` (a decoder's keys and values flow into its KV-cache output that way), so a caller can tell
whether removing the branch alone leaves a valid graph.
"""

from __future__ import annotations

import dataclasses
import os

import onnx_ir as ir

from effc.ir.names import readable_name
from effc.ir.queries import constant_tensor

__all__ = ["ResidualBlock", "TransformerLayer", "find_residual_blocks", "find_layers"]

NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization",
                      "SkipLayerNormalization", "BatchNormalization"})
WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv"})


@dataclasses.dataclass
class ResidualBlock:
    """One residual sub-block ``add = skip + branch_out`` (node references; recomputed on demand).

    Attributes:
        kind: ``"attention"``, ``"ffn"``, ``"conv"`` or ``"residual"``.
        add: the residual ``Add`` node.
        skip: the block input carried around the branch.
        branch_out: the branch's output (the other input of ``add``).
        nodes: the branch nodes, in graph order.
        norm: the post-norm node fed only by ``add``, else None.
        leaks: branch values read by nodes outside the branch or by graph outputs (names), besides ``add``.
        name: a readable name (the common torch module path of the branch's weight nodes, plus the kind).
    """

    kind: str
    add: ir.Node
    skip: ir.Value
    branch_out: ir.Value
    nodes: list[ir.Node]
    norm: ir.Node | None
    leaks: list[str]
    name: str

    @property
    def output(self) -> ir.Value:
        """The value leaving the block: the post-norm's output, else the ``Add``'s."""
        return (self.norm or self.add).outputs[0]

    def weight_bytes(self) -> int:
        """Bytes of the constant tensors only this branch reads (what removing it deletes)."""
        inside = {id(n) for n in self.nodes}
        seen, total = set(), 0
        for node in self.nodes:
            for value in node.inputs:
                tensor = constant_tensor(value)
                if tensor is None or id(value) in seen or any(id(u.node) not in inside for u in value.uses()):
                    continue
                seen.add(id(value))
                total += tensor.nbytes
        return total


@dataclasses.dataclass
class TransformerLayer:
    """An attention sub-block followed by the FFN sub-block that reads its output.

    Attributes:
        index: position among the layers found (0 = nearest the input).
        attention: the attention sub-block.
        ffn: the FFN sub-block (its ``skip`` is ``attention.output``).
    """

    index: int
    attention: ResidualBlock
    ffn: ResidualBlock

    @property
    def name(self) -> str:
        """The layer's readable name (common prefix of its two sub-blocks)."""
        return _common_path([self.attention.name.split(" ")[0], self.ffn.name.split(" ")[0]]) or f"layer {self.index}"


def _common_path(names: list[str]) -> str:
    prefix = os.path.commonprefix(names)
    if all(len(n) == len(prefix) or n[len(prefix)] == "." for n in names):
        return prefix.rstrip(".")
    return prefix.rsplit(".", 1)[0] if "." in prefix else prefix


def _has_weight(node: ir.Node) -> bool:
    return (node.op_type in WEIGHT_OPS and node.domain in ("", "ai.onnx") and len(node.inputs) > 1
            and constant_tensor(node.inputs[1]) is not None)


def _ancestors(value: ir.Value, floor: int, order: dict[int, int]) -> dict[int, ir.Node]:
    """Nodes that ``value`` depends on, among those after graph position ``floor``."""
    found: dict[int, ir.Node] = {}
    stack = [value.producer()]
    while stack:
        node = stack.pop()
        if node is None or id(node) in found or order.get(id(node), -1) <= floor:
            continue
        found[id(node)] = node
        stack.extend(i.producer() for i in node.inputs if i is not None)
    return found


def _branch(skip: ir.Value, out: ir.Value, order: dict[int, int]) -> list[ir.Node] | None:
    """Nodes that depend on ``skip`` and feed ``out`` in graph order; None when ``out`` does not depend on it."""
    producer = skip.producer()
    floor = order.get(id(producer), -1) if producer is not None else -1
    above = _ancestors(out, floor, order)
    reached: dict[int, ir.Node] = {}
    stack = [u.node for u in skip.uses()]
    while stack:
        node = stack.pop()
        if id(node) not in above or id(node) in reached:
            continue
        reached[id(node)] = node
        stack.extend(u.node for o in node.outputs for u in o.uses())
    if out.producer() is None or id(out.producer()) not in reached:
        return None
    return sorted(reached.values(), key=lambda n: order[id(n)])


def _kind(nodes: list[ir.Node]) -> str:
    ops = [n.op_type for n in nodes if _has_weight(n)]
    if any(n.op_type == "Softmax" for n in nodes):
        return "attention"
    if "Conv" in ops:
        return "conv"
    return "ffn" if len(ops) >= 2 else "residual"


def _leaks(nodes: list[ir.Node], add: ir.Node) -> list[str]:
    inside = {id(n) for n in nodes} | {id(add)}
    return sorted({o.name for n in nodes for o in n.outputs
                   if o.is_graph_output() or any(id(u.node) not in inside for u in o.uses())})


def _post_norm(add: ir.Node) -> ir.Node | None:
    out = add.outputs[0]
    users = [u.node for u in out.uses()]
    if out.is_graph_output() or len(users) != 1:
        return None
    node = users[0]
    return node if node.op_type in NORM_OPS and node.inputs[0] is out else None


def _block(add: ir.Node, order: dict[int, int]) -> ResidualBlock | None:
    a, b = add.inputs[0], add.inputs[1]
    if a is None or b is None or constant_tensor(a) is not None or constant_tensor(b) is not None:
        return None
    if a.shape is not None and b.shape is not None and a.shape != b.shape:
        return None  # a broadcasting Add (an attention mask, a bias) is not a residual connection
    for skip, out in ((a, b), (b, a)):
        nodes = _branch(skip, out, order)
        if nodes is None or not any(_has_weight(n) for n in nodes):
            continue
        kind = _kind(nodes)
        path = _common_path([readable_name(n) for n in nodes if _has_weight(n)]) or add.name
        return ResidualBlock(kind, add, skip, out, nodes, _post_norm(add), _leaks(nodes, add), f"{path} ({kind})")
    return None


def find_residual_blocks(model: ir.Model) -> list[ResidualBlock]:
    """The residual sub-blocks of the main graph, in graph order of their ``Add``.

    Returns:
        One :class:`ResidualBlock` per ``Add`` whose one input depends on the other through at least one weight.
    """
    order = {id(n): i for i, n in enumerate(model.graph)}
    blocks = []
    for node in model.graph:
        if node.op_type == "Add" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
            block = _block(node, order)
            if block is not None:
                blocks.append(block)
    return blocks


def find_layers(blocks: list[ResidualBlock]) -> list[TransformerLayer]:
    """Pairs of an attention sub-block and the FFN sub-block reading its output (see the module docstring)."""
    by_skip = {id(b.skip): b for b in blocks if b.kind == "ffn"}
    layers = []
    for block in blocks:
        ffn = by_skip.get(id(block.output)) if block.kind == "attention" else None
        if ffn is not None:
            layers.append(TransformerLayer(len(layers), block, ffn))
    return layers
