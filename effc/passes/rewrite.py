"""Graph edits shared by every rewriting pass: replace a value, including a value that is a graph output.

``onnx_ir.convenience.replace_all_uses_with`` refuses a graph output unless told otherwise, and when told, the
graph output changes its name. A deployed model's outputs are part of its interface (the manifest, ``run``'s
result order, the user's code), so a pass that replaces a node's output must keep the output's name: the new value
takes the graph-output slot *and* the name, the old value is renamed. Every pass that swaps one value for another
goes through :func:`replace_value` (or :func:`take_output_slots` when the old value stays in use).
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["replace_value", "take_output_slots"]


def take_output_slots(graph: ir.Graph, old: ir.Value, new: ir.Value) -> int:
    """Put ``new`` in every graph-output slot of ``graph`` that holds ``old``; ``new`` takes ``old``'s name.

    ``old`` is renamed ``<name>__replaced`` (it may still be read, e.g. by the node that computes ``new`` from it).
    ``new`` also takes ``old``'s shape and type where it has none (a replacement computes the same tensor).

    Args:
        graph: the graph whose outputs are edited.
        old: the value being replaced.
        new: its replacement.

    Returns:
        The number of output slots that now hold ``new`` (0 when ``old`` is not a graph output).
    """
    slots = [i for i, out in enumerate(graph.outputs) if out is old]
    if slots:
        name = old.name
        old.name = f"{name}__replaced"
        new.name = name
        for i in slots:
            graph.outputs[i] = new
    if new.shape is None:
        new.shape = old.shape
    if new.type is None:
        new.type = old.type
    return len(slots)


def replace_value(graph: ir.Graph, old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` read ``new``; a graph output keeps its name (``new`` takes it over).

    Args:
        graph: the graph holding ``old`` (its outputs are edited when ``old`` is one of them).
        old: the value being replaced; afterwards nothing reads it, so its producer can be removed.
        new: the replacement, computing the same tensor (shape and type copied from ``old`` where unset).
    """
    take_output_slots(graph, old, new)
    ir.convenience.replace_all_uses_with(old, new)
