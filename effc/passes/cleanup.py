"""Exact clean-up passes wrapping onnx_ir's common passes: ``dce``, ``identity-elim``, ``cse`` and ``cleanup``.

Each keeps the model's outputs bit-identical (only dead, duplicate or Identity nodes go away), reports
``modified`` exactly (a second run returns False), and records in ``stats`` how many nodes, initializers and
model-local functions it removed.

Source: onnx/ir-py ``onnx_ir/passes/common`` (``RemoveUnusedNodesPass``, ``RemoveUnusedFunctionsPass``,
``IdentityEliminationPass``, ``CommonSubexpressionEliminationPass``, ``TopologicalSortPass``).
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from effc.passes.base import EffcPass, PassOptions, register_pass

__all__ = ["CleanupPass", "DeadCodeEliminationPass", "EliminateCommonSubexpressionPass", "EliminateIdentityPass"]

logger = logging.getLogger(__name__)


def _count_nodes(model: ir.Model) -> int:
    """Nodes in the main graph (subgraphs included) and in every model-local function."""
    count = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    return count + sum(sum(1 for _ in ir.traversal.RecursiveGraphIterator(f)) for f in model.functions.values())


def _snapshot(model: ir.Model) -> dict[str, int]:
    return {
        "nodes": _count_nodes(model),
        "initializers": len(model.graph.initializers),
        "functions": len(model.functions),
    }


class _WrappedCleanupPass(EffcPass):
    """Runs onnx_ir passes in order and records what they removed in ``stats``."""

    exact = True

    def _inner_passes(self) -> list[ir.passes.PassBase]:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Run the wrapped onnx_ir passes (each through ``__call__``, so their requires/ensures run)."""
        before = _snapshot(model)
        modified = False
        for inner in self._inner_passes():
            result = inner(model)
            modified |= result.modified
            model = result.model
        after = _snapshot(model)
        self.stats = {
            "nodes_before": before["nodes"],
            "nodes_after": after["nodes"],
            "nodes_removed": before["nodes"] - after["nodes"],
            "initializers_removed": before["initializers"] - after["initializers"],
            "functions_removed": before["functions"] - after["functions"],
        }
        logger.debug("%s: %s", self.name, self.stats)
        return ir.passes.PassResult(model, modified=modified)


@register_pass
class DeadCodeEliminationPass(_WrappedCleanupPass):
    """Remove nodes whose outputs nobody uses, unused initializers and unused model-local functions.

    The model's inputs and outputs never change. Subgraphs (If/Loop bodies) and functions are cleaned too.
    """

    name = "dce"
    summary = "remove unused nodes, initializers and model-local functions (exact)"

    def _inner_passes(self) -> list[ir.passes.PassBase]:
        return [ir_common.RemoveUnusedNodesPass(), ir_common.RemoveUnusedFunctionsPass()]


@register_pass
class EliminateIdentityPass(_WrappedCleanupPass):
    """Remove ``Identity`` nodes, rewiring their users to the Identity's input.

    An Identity between a graph input (or initializer) and a graph output stays: removing it would rename an
    input or output of the model.
    """

    name = "identity-elim"
    summary = "remove Identity nodes (exact)"

    def _inner_passes(self) -> list[ir.passes.PassBase]:
        return [ir_common.IdentityEliminationPass()]


@dataclasses.dataclass(frozen=True)
class CSEOptions(PassOptions):
    """Options of ``cse``.

    Attributes:
        size_limit: Constant tensors with more elements than this are never merged (comparing big constants
            costs more than it saves), in elements.
    """

    size_limit: int = dataclasses.field(default=10, metadata={"help": "largest Constant (elements) to merge"})

    def validate(self) -> None:
        """Raises: PipelineError: size_limit is negative."""
        if self.size_limit < 0:
            self.fail("size_limit", self.size_limit, "a non-negative number of elements")


@register_pass
class EliminateCommonSubexpressionPass(_WrappedCleanupPass):
    """Merge nodes that compute the same op with the same inputs and attributes (non-deterministic ops excluded)."""

    name = "cse"
    summary = "merge duplicate subexpressions (exact)"
    Options = CSEOptions

    def _inner_passes(self) -> list[ir.passes.PassBase]:
        return [ir_common.CommonSubexpressionEliminationPass(size_limit=self.options.size_limit)]


@register_pass
class CleanupPass(_WrappedCleanupPass):
    """``identity-elim``, ``cse``, ``dce`` then a stable topological sort, in one pass.

    The sort only reorders nodes when the graph was out of order; ``modified`` is True when anything moved.
    """

    name = "cleanup"
    summary = "identity elimination + CSE + dead-code elimination + topological sort (exact)"
    Options = CSEOptions

    def _inner_passes(self) -> list[ir.passes.PassBase]:
        return [
            ir_common.IdentityEliminationPass(),
            ir_common.CommonSubexpressionEliminationPass(size_limit=self.options.size_limit),
            ir_common.RemoveUnusedNodesPass(),
            ir_common.RemoveUnusedFunctionsPass(),
            ir_common.TopologicalSortPass(),
        ]
