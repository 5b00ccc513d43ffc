"""Readable layer names for reports: the torch module path or the ONNX node's scope instead of ``val_49``.

Exporters name nodes and weights for uniqueness, not for people: the torch dynamo exporter writes
``node_MatMul_80`` reading weight ``val_49``, but records the module path in the node's metadata
(``pkg.torch.onnx.name_scopes``: ``[..., "encoder.layer.0.attention.self.query", "linear"]``, the last entry being
the aten call). The torchscript exporter and TensorFlow converters put the scope in the node name
(``/encoder/layer.0/attention/self/query/MatMul``), Paddle in the weight name (``conv2_expand_weights``). This module
picks the first of those a node has, in that order, else the node name.
"""

from __future__ import annotations

import ast
import re

import onnx_ir as ir

__all__ = ["layer_names", "readable_name"]

_SCOPES = "pkg.torch.onnx.name_scopes"
#: Weight names that exporters generate (``val_49``, ``onnx::MatMul_1234``, ``_v_12``, ``const_fold_opt__7``).
_GENERATED = re.compile(r"^(?:_?val|_v|onnx::\w+|const\w*|initializer|param|p)_?\d+$")
_WEIGHT_SUFFIX = re.compile(r"[._](?:weights?|w|kernel)$")


def _torch_scope(node: ir.Node) -> str | None:
    text = node.metadata_props.get(_SCOPES)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    modules = [s for s in scopes[:-1] if isinstance(s, str) and s]  # the last entry is the aten call itself
    return modules[-1] if modules else None


def _weight_name(node: ir.Node) -> str | None:
    for value in node.inputs[1:]:
        if value is not None and value.name and (value.const_value is not None or value.is_initializer()):
            if not _GENERATED.match(value.name):
                return _WEIGHT_SUFFIX.sub("", value.name)
    return None


def _is_weight(value: ir.Value | None) -> bool:
    if value is None or not value.name or not value.is_initializer() or value.const_value is None:
        return False
    tensor = value.const_value
    return len(tensor.shape) >= 2 and tensor.dtype.is_floating_point()


def readable_name(node: ir.Node) -> str:
    """The name people know a node by: torch module path, ONNX scope, weight name, else the node name.

    Examples: ``encoder.layer.0.attention.self.query`` (torch dynamo export), ``encoder/layer.0/attention/self/query``
    (node ``/encoder/layer.0/attention/self/query/MatMul``), ``conv2_expand`` (Paddle ``Conv@1`` reading
    ``conv2_expand_weights``).
    """
    scope = _torch_scope(node)
    if scope:
        return scope
    name = node.name or ""
    if "/" in name.strip("/"):
        return name.strip("/").rsplit("/", 1)[0]
    return _weight_name(node) or name


def layer_names(model: ir.Model) -> dict[str, str]:
    """Readable names of the main graph's nodes that read a weight, and of those weights, where they differ.

    The layers that passes rewrite and record are such nodes. A weight is a floating-point initializer of rank >= 2
    (biases, norms and shape constants are not).

    A weight maps to the readable name of its first consumer. Repeated readable names (two MatMuls of one torch
    module) get the node name appended so rows stay distinct.

    Args:
        model: the model the names come from (for a compile: the canonical model before the passes, whose node
            names the pass stats record).

    Returns:
        ``{raw name: readable name}``.
    """
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for node in model.graph:
        weights = [v for v in node.inputs if _is_weight(v)]
        if not node.name or not weights:
            continue
        readable = readable_name(node)
        if readable in taken and taken[readable] != node.name:
            readable = f"{readable} ({node.name})"
        taken.setdefault(readable, node.name)
        if readable != node.name:
            names[node.name] = readable
            for value in weights:
                names.setdefault(value.name, readable)
    return names
