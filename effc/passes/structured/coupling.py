"""Coupling-group analysis: which channels of which tensors must be removed together.

Starting from every *source* (MatMul/Gemm/Conv whose output channels are free, see
:func:`effc.passes.structured.mechanics.source_axis`), channel spaces are followed through the graph with the
per-op :func:`~effc.passes.structured.mechanics.flow` rules. A ``networkx`` graph has one node per
``(value name, channel)`` and an edge for every "same channel" relation (elementwise ops, residual ``Add``, the
two halves of ``Concat(x, x)``, depthwise conv input ↔ its ``k`` outputs, ...). A **group** is a connected
component of the value-level graph; its **units** are the connected components of the channel-level graph — each
unit is removed as a whole. A group is blocked (with a reason) when any of its channels reaches a graph output,
an op whose rule blocks, or a tensor whose channels no source controls (a graph input).

After Fang et al., "DepGraph: Towards Any Structural Pruning" (CVPR 2023).
"""

from __future__ import annotations

import dataclasses
from collections import deque

import networkx as nx
import onnx_ir as ir

from effc.passes.structured import mechanics as mech


@dataclasses.dataclass
class Group:
    """A set of coupled channel spaces.

    Attributes:
        values: value name -> ``(value, channel axis, channel count)``.
        sources: nodes whose output channels (weight rows/columns) belong to the group.
        sinks: ``(node, input index, value name)`` that consume the channels (reduction-axis weights).
        touched: ``(node, input index, value name)`` whose parameters follow the channels (bias, BN, group conv).
        units: each unit is a list of ``(value name, channel)``; removing a unit removes all of them.
        blocked: None, or why the group must stay as it is.
    """

    values: dict[str, tuple[ir.Value, int, int]]
    sources: list[ir.Node]
    sinks: list[tuple[ir.Node, int, str]]
    touched: list[tuple[ir.Node, int, str]]
    units: list[list[tuple[str, int]]]
    blocked: str | None = None

    @property
    def kind(self) -> str:
        """``"conv"`` when a Conv produces the channels, else ``"linear"``."""
        return "conv" if any(n.op_type.startswith("Conv") for n in self.sources) else "linear"

    @property
    def name(self) -> str:
        """Name of the first source node (for reports)."""
        return self.sources[0].name if self.sources else next(iter(self.values))


def _size(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or not isinstance(value.shape[axis], int):
        return None
    return int(value.shape[axis])


def find_groups(model: ir.Model) -> list[Group]:
    """All coupling groups of ``model`` (blocked ones included, with their reason).

    Requires static shapes on the values along the channel flow (run ``canonicalize`` first).
    """
    outputs = {v.name for v in model.graph.outputs}
    chan = nx.Graph()
    vgraph = nx.Graph()
    info: dict[str, tuple[ir.Value, int, int]] = {}
    origin: set[str] = set()
    reasons: dict[str, str] = {}
    sources: dict[str, ir.Node] = {}
    edges: list[tuple[str, ir.Node, int, str]] = []  # (kind, node, index, value)
    queue: deque[str] = deque()

    def visit(value: ir.Value, axis: int) -> None:
        size = _size(value, axis)
        if size is None:
            reasons.setdefault(value.name, f"value {value.name!r} has no static channel count")
            return
        if value.name not in info:
            info[value.name] = (value, axis % len(value.shape), size)
            vgraph.add_node(value.name)
            chan.add_nodes_from((value.name, c) for c in range(size))
            queue.append(value.name)

    for node in model.graph:
        if node.domain in ("", "ai.onnx") and mech.source_axis(node) is not None:
            out = node.outputs[0]
            visit(out, mech.source_axis(node)[1])
            if out.name in info:
                origin.add(out.name)
                sources[out.name] = node
    while queue:
        name = queue.popleft()
        value, axis, size = info[name]
        if name in outputs:
            reasons.setdefault(name, f"channels of {name!r} reach a graph output")
        for node, index in value.uses():
            rule = mech.flow(node, index, axis, size)
            if isinstance(rule, mech.Block):
                reasons.setdefault(name, f"{node.op_type} {node.name!r}: {rule.reason}")
                continue
            if rule == mech.SINK:
                edges.append(("sink", node, index, name))
                continue
            edges.append(("touch", node, index, name))
            for fl in rule:
                visit(fl.value, fl.axis)
                if fl.value.name not in info:
                    reasons.setdefault(name, f"{node.op_type} {node.name!r}: output shape unknown")
                    continue
                vgraph.add_edge(name, fl.value.name)
                if fl.value.name not in origin and fl.value.producer() is node:
                    origin.add(fl.value.name)
                chan.add_edges_from(((name, a), (fl.value.name, b)) for a, b in fl.pairs)
    for name, (value, _, _) in info.items():
        if name not in origin:  # reached only as the other operand of a join (e.g. a residual Add)
            producer = value.producer()
            what = f"{producer.op_type} {producer.name!r}" if producer is not None else "a graph input or constant"
            reasons.setdefault(name, f"channels of {name!r} come from {what}, which structured pruning cannot shrink")
    groups = []
    for comp in nx.connected_components(vgraph):
        names = sorted(comp, key=list(info).index)
        group_edges = [e for e in edges if e[3] in comp]
        units = [sorted(u) for u in nx.connected_components(chan.subgraph((n, c) for n in names
                                                                           for c in range(info[n][2])))]
        blocked = next((reasons[n] for n in names if n in reasons), None)
        groups.append(Group(
            values={n: info[n] for n in names},
            sources=[sources[n] for n in names if n in sources],
            sinks=[(nd, i, v) for k, nd, i, v in group_edges if k == "sink"],
            touched=[(nd, i, v) for k, nd, i, v in group_edges if k == "touch"],
            units=units,
            blocked=blocked,
        ))
    return groups
