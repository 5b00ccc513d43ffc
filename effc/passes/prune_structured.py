"""``prune-structured``: remove whole FFN neurons and conv channels so that tensors physically shrink.

The driver plans, then applies (Torch-Pruning's structure; ../shared/CONVENTIONS.md item 5):

0. with ``heads > 0``, attention heads (:mod:`effc.passes.structured.heads`): the lowest-norm heads of each block
   leave W_q/W_k/W_v columns, W_o rows and both head reshapes;
1. :func:`effc.passes.structured.coupling.find_groups` — coupling groups (the same channel index removed everywhere it
   flows: residual ``Add``, ``Concat`` offsets, ``Split``, depthwise / ``out = k·in`` grouped conv, BN and bias
   parameters); groups that cannot be pruned safely are reported with their reason and left alone;
2. :data:`effc.passes.structured.importance.IMPORTANCE` — a score per removable unit;
3. per group, the ``ratio`` lowest-scoring units are removed (the kept count optionally rounded up to a multiple
   of ``round_to``) and :mod:`effc.passes.structured.mechanics` slices every source, sink and follower.

An FFN neuron ``j`` is a unit of the group ``MatMul W1 (K, H) → Add b1 → GELU → MatMul W2 (H, K)``: column ``j`` of
``W1``, entry ``j`` of ``b1`` and row ``j`` of ``W2`` go together. MACs drop by ``ratio`` of those two MatMuls.
Removed channels change outputs (lossy); no reconstruction is applied.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging

import numpy as np
import onnx_ir as ir

from effc.passes.base import EffcPass, PassOptions, register_pass
from effc.passes.structured import mechanics as mech
from effc.passes.structured.coupling import Group, find_groups
from effc.passes.structured.heads import apply_heads, find_head_groups, head_scores
from effc.passes.structured.importance import IMPORTANCE

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruneStructuredOptions(PassOptions):
    """Options of ``prune-structured``."""

    ratio: float = dataclasses.field(default=0.25, metadata={"help": "fraction of units removed per group, [0, 1)"})
    targets: str = dataclasses.field(default="all", metadata={"help": "all | ffn | conv | source-node patterns a|b"})
    importance: str = dataclasses.field(default="magnitude", metadata={"help": "unit score: magnitude"})
    round_to: int = dataclasses.field(default=1, metadata={"help": "kept channel count rounded up to a multiple"})
    min_keep: int = dataclasses.field(default=1, metadata={"help": "never keep fewer units than this per group"})
    heads: float = dataclasses.field(default=0.0, metadata={"help": "fraction of attention heads removed per block"})

    def validate(self) -> None:
        """Raises: PipelineError: a ratio outside [0, 1), unknown importance, or a non-positive round_to/min_keep."""
        if not 0.0 <= self.ratio < 1.0:
            self.fail("ratio", self.ratio, "a fraction in [0, 1)")
        if self.importance not in IMPORTANCE:
            self.fail("importance", self.importance, " | ".join(IMPORTANCE))
        if self.round_to < 1:
            self.fail("round_to", self.round_to, "a positive integer")
        if not 0.0 <= self.heads < 1.0:
            self.fail("heads", self.heads, "a fraction in [0, 1)")
        if self.min_keep < 1:
            self.fail("min_keep", self.min_keep, "a positive integer")


def _selected(group: Group, targets: str) -> bool:
    if targets == "all":
        return True
    if targets == "conv":
        return group.kind == "conv"
    if targets == "ffn":
        nodes = group.sources + [s[0] for s in group.sinks]
        return group.kind == "linear" and bool(group.sinks) and all(n.op_type in ("MatMul", "Gemm") for n in nodes)
    pats = targets.split("|")
    return any(fnmatch.fnmatch(n.name or "", p) for n in group.sources for p in pats)


def apply_group(model: ir.Model, group: Group, remove: set[int]) -> dict[str, np.ndarray]:
    """Remove the units with indices in ``remove`` from every tensor of ``group``; returns kept channels per value."""
    gone: dict[str, set[int]] = {n: set() for n in group.values}
    for u in remove:
        for name, c in group.units[u]:
            gone[name].add(c)
    keep = {n: np.array([c for c in range(size) if c not in gone[n]], dtype=np.int64)
            for n, (_, _, size) in group.values.items()}
    for node in group.sources:
        mech.apply_source(node, keep[node.outputs[0].name])
    done: set[int] = set()
    for node, index, name in group.sinks + group.touched:
        if id(node) in done:
            continue
        done.add(id(node))
        _, axis, size = group.values[name]
        mech.apply(node, index, keep[name], axis, size)
        if node.op_type == "Split" and len(node.inputs) > 1 and node.inputs[1] is not None:
            sizes = np.array([len(keep[o.name]) for o in node.outputs], dtype=np.int64)
            mech._set(node.inputs[1], sizes)
    for name, (value, axis, _) in group.values.items():
        dims = list(value.shape)
        dims[axis] = len(keep[name])
        value.shape = ir.Shape(dims)
    return keep


@register_pass
class PruneStructuredPass(EffcPass):
    """Remove FFN neurons / conv channels in coupling groups (see the module docstring).

    Stats: ``groups`` (per pruned group: name, kind, units before/after, values), ``skipped`` (group name, reason),
    ``units_removed``.
    """

    name = "prune-structured"
    summary = "structured pruning: FFN neurons and conv channels removed with their coupled tensors"
    Options = PruneStructuredOptions
    exact = False

    def _prune_heads(self, model: ir.Model, pruned: list, skipped: list) -> int:
        """Remove the ``heads`` fraction of lowest-norm heads in every safe attention block; returns heads removed."""
        removed = 0
        for g in find_head_groups(model):
            if g.blocked:
                skipped.append({"group": g.name, "reason": f"attention heads: {g.blocked}"})
                continue
            n_keep = max(1, g.heads - int(self.options.heads * g.heads))
            if n_keep == g.heads:
                continue
            keep = np.sort(np.argsort(-head_scores(g), kind="stable")[:n_keep])
            apply_heads(model, g, keep)
            removed += g.heads - n_keep
            pruned.append({"group": g.name, "kind": "heads", "units": g.heads, "kept": n_keep,
                           "kept_heads": keep.tolist()})
        for name in [n for n, v in model.graph.initializers.items() if not v.uses() and not v.is_graph_output()]:
            del model.graph.initializers[name]  # shape constants the new per-block ones replaced
        return removed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Plan groups, score, apply; see the class docstring."""
        o = self.options
        pruned, skipped, removed_total = [], [], 0
        if o.heads > 0:
            removed_total += self._prune_heads(model, pruned, skipped)
        for group in find_groups(model):
            if not _selected(group, o.targets):
                continue
            if group.blocked:
                skipped.append({"group": group.name, "reason": group.blocked})
                continue
            if not group.sinks:
                skipped.append({"group": group.name, "reason": "channels are never consumed by a weight"})
                continue
            n_units = len(group.units)
            n_keep = max(o.min_keep, n_units - int(o.ratio * n_units))
            n_keep = min(n_units, -(-n_keep // o.round_to) * o.round_to)
            if n_keep >= n_units:
                continue
            scores = IMPORTANCE[o.importance](group)
            remove = set(np.argsort(scores, kind="stable")[: n_units - n_keep].tolist())
            keep = apply_group(model, group, remove)
            removed_total += len(remove)
            pruned.append({"group": group.name, "kind": group.kind, "units": n_units, "kept": n_keep,
                           "values": {n: int(len(k)) for n, k in keep.items()}})
        self.stats = {"groups": pruned, "skipped": skipped, "units_removed": removed_total}
        logger.info("prune-structured: %d group(s) pruned, %d unit(s) removed, %d group(s) skipped", len(pruned),
                    removed_total, len(skipped))
        return ir.passes.PassResult(model, modified=bool(pruned))
