"""Replace standard ops that TVM 0.27 cannot import by their ONNX function bodies (made of ops it can).

ONNX defines some operators as functions of simpler ones in their schema (``OpSchema.function_body`` or, when the
body depends on attributes and input types, a context-dependent function). TVM's ONNX frontend looks nodes up by
``op_type`` only, so the ONNX opset 23/24 ``Attention`` meets TVM's converter for Microsoft's contrib
``Attention`` (``KeyError: 'num_heads'``). Canonicalization expands such nodes with the body that onnx itself
generates for the opset the model imports, then inlines it (``onnx.inliner``); onnxruntime computes the same
numbers on either form (the onnx backend cases ``*_expanded`` check that).
"""

from __future__ import annotations

import logging

import onnx
import onnx.inliner
import onnx_ir as ir

logger = logging.getLogger(__name__)

#: Standard op → first opset from which effc expands it: TVM 0.27 lacks a converter for these (or, for ``Attention``,
#: converts Microsoft's contrib operator of the same name) and the ONNX schema defines a function body.
EXPAND_OPS = {
    "Attention": 23, "RotaryEmbedding": 23, "CausalConvWithState": 1, "FlexAttention": 1, "LinearAttention": 1,
    "NegativeLogLikelihoodLoss": 1, "SoftmaxCrossEntropyLoss": 1, "CenterCropPad": 1, "Swish": 1, "Celu": 1,
    "SwiGLU": 1, "BlackmanWindow": 1, "HammingWindow": 1, "HannWindow": 1,
}
_DOMAIN = "effc.expand"


def default_opset(proto: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) opset ``proto`` imports (1 when it imports none)."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def value_types(graph: onnx.GraphProto) -> dict[str, onnx.TypeProto]:
    """``{value name: TypeProto}`` of ``graph``'s inputs, value_info, outputs and initializers."""
    types = {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]}
    for init in graph.initializer:
        types.setdefault(init.name, onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)))
    return types


def _function(node: onnx.NodeProto, opset: int, types: dict[str, onnx.TypeProto]) -> onnx.FunctionProto | None:
    """The function body onnx defines for ``node`` at ``opset`` (None when it defines none or types are unknown)."""
    schema = onnx.defs.get_schema(node.op_type, opset, "")
    plain = [v for v in schema.function_opset_versions if v <= opset]
    dependent = [v for v in schema.context_dependent_function_opset_versions if v <= opset]
    fn = onnx.FunctionProto()
    if plain:
        fn.ParseFromString(schema.get_function_with_opset_version(max(plain)))
        return fn
    if not dependent or any(name and name not in types for name in node.input):
        return None
    inputs = [types[name] if name else onnx.TypeProto() for name in node.input]
    fn.ParseFromString(schema.get_context_dependent_function_with_opset_version(
        max(dependent), node.SerializeToString(), [t.SerializeToString() for t in inputs]))
    return fn


def expand_function_ops(model: ir.Model) -> tuple[ir.Model, int]:
    """Expand main-graph nodes of :data:`EXPAND_OPS` into their ONNX function bodies.

    Args:
        model: a model whose values carry types (run shape inference first); not modified.

    Returns:
        ``(model, count)``: a new model with the nodes inlined, or ``model`` itself when there were none.
    """
    proto = ir.to_proto(model)
    opset = default_opset(proto)
    types = value_types(proto.graph)
    functions = []
    for k, node in enumerate(proto.graph.node):
        since = EXPAND_OPS.get(node.op_type)
        if since is None or node.domain not in ("", "ai.onnx") or opset < since:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        present = {a.name for a in node.attribute}
        node.attribute.extend(a.default_value for name, a in schema.attributes.items()
                              if name not in present and a.default_value.name)
        fn = _function(node, opset, types)
        if fn is None:
            logger.info("no ONNX function body for %s node %r; left for the frontend", node.op_type, node.name)
            continue
        fn.domain, fn.name = _DOMAIN, f"{node.op_type}_{k}"
        node.domain, node.op_type = _DOMAIN, fn.name
        functions.append(fn)
    if not functions:
        return model, 0
    proto.functions.extend(functions)
    proto.opset_import.append(onnx.helper.make_opsetid(_DOMAIN, 1))
    try:
        proto = onnx.inliner.inline_selected_functions(proto, [(f.domain, f.name) for f in functions], exclude=False)
    except RuntimeError as err:  # e.g. a body that needs another opset than the model imports (SwiGLU)
        logger.info("cannot inline the ONNX function bodies (%s); nodes left for the frontend", err)
        return model, 0
    del proto.opset_import[[o.domain for o in proto.opset_import].index(_DOMAIN)]
    return ir.from_proto(proto), len(functions)
