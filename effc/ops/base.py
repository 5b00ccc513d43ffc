"""effc operators: nodes in the ``effc`` domain whose reference body is an ONNX model-local function.

An effc operator (``effc.NMSparseMatMul``, ``effc.BlockQuantMatMul``, ``effc.MoEFFN``, ...) is a node with
``domain="effc"``. Its semantics are given by an ``ir.Function`` of standard ONNX ops attached to the model
(``model.functions``), so onnxruntime — which inlines model-local functions — runs the rewritten model unchanged.
TVM lowers the same node to a dedicated kernel through a converter registered in ``effc.codegen``; a test per
operator keeps the two equal.

Source: ONNX IR spec, "Functions" (model-local functions, opset_import of the function's domain).
"""

from __future__ import annotations

import onnx_ir as ir

EFFC_DOMAIN = "effc"
EFFC_OPSET_VERSION = 1


def add_function(model: ir.Model, function: ir.Function) -> ir.Function:
    """Attach ``function`` to ``model`` (once) and import the ``effc`` opset.

    Args:
        model: the model to extend, modified in place.
        function: a function with ``domain == "effc"``; when the model already holds a function with the same
            identifier it is kept and returned instead (bodies of one operator name must be identical).

    Returns:
        The function now attached to the model under ``function.identifier()``.

    Raises:
        ValueError: the function is not in the ``effc`` domain.
    """
    if function.domain != EFFC_DOMAIN:
        raise ValueError(f"effc operator functions must be in domain {EFFC_DOMAIN!r}, got {function.domain!r}")
    key = function.identifier()
    if key not in model.functions:
        model.functions[key] = function
    model.opset_imports.setdefault(EFFC_DOMAIN, EFFC_OPSET_VERSION)
    model.graph.opset_imports.setdefault(EFFC_DOMAIN, EFFC_OPSET_VERSION)
    return model.functions[key]


def effc_nodes(model: ir.Model, op_type: str | None = None) -> list[ir.Node]:
    """Nodes of the main graph in the ``effc`` domain (optionally only those of one ``op_type``)."""
    return [
        node
        for node in model.graph
        if node.domain == EFFC_DOMAIN and (op_type is None or node.op_type == op_type)
    ]


def remove_unused_functions(model: ir.Model) -> int:
    """Drop effc functions that no node of the main graph calls any more; returns how many were removed."""
    used = {(n.domain, n.op_type, n.overload) for n in model.graph}
    unused = [key for key in model.functions if key[0] == EFFC_DOMAIN and key not in used]
    for key in unused:
        del model.functions[key]
    return len(unused)
