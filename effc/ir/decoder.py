"""Decoder graphs: one token-generic graph, specialized into the prefill chunk and the one-token decode step.

A decoder is exported as one ONNX graph over a chunk of ``T`` tokens whose reshapes name the token axis ``-1``
(:func:`generalize_tokens` makes it so from two static exports), so its structure does not depend on ``T``.
:func:`specialize` fixes ``T`` (``P`` for prefill, 1 for decode) and canonicalizes. Passes rewrite the prefill
specialization once; :func:`regeneralize` returns the rewritten graph to token-generic form, from which the decode
graph is specialized: both entry points share the same rewritten weights by construction.

The decoder's facts travel in ``model.metadata_props["effc.decoder"]`` (JSON, :func:`decoder_info`); graph
inputs and outputs are described in :mod:`effc.decoder.llama`.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.errors import LoadError, ShapeError

METADATA_KEY = "effc.decoder"
TOKENS = "tokens"
INPUTS = ("input_ids", "positions", "attn_mask", "kv_cache")
OUTPUTS = ("logits", "kv_new")


def is_decoder(model: ir.Model) -> bool:
    """True for a graph that carries effc decoder metadata."""
    return METADATA_KEY in model.metadata_props


def decoder_info(model: ir.Model) -> dict[str, Any]:
    """The decoder facts: ``layers, hidden, heads, kv_heads, head_dim, ffn, vocab, max_cache, chunk`` and more.

    Raises:
        LoadError: the model carries no decoder metadata.
    """
    if not is_decoder(model):
        raise LoadError("the model is not an effc decoder graph (no 'effc.decoder' metadata)",
                        "export decoders through effc.decoder (e.g. zoo:smollm2-135m)")
    return json.loads(model.metadata_props[METADATA_KEY])


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def generalize_tokens(model: ir.Model, other: ir.Model) -> ir.Model:
    """Make ``model`` token-generic, given a second export ``other`` of the same module at another chunk length.

    The two graphs must have the same nodes in the same order; the only constants that may differ are entries of
    ``Reshape`` target shapes, and exactly one entry per shape (the token axis, which becomes ``-1``). Graph inputs
    and outputs get the symbolic dimension ``"tokens"`` on their token axes; other value shapes are cleared (they
    are inferred again by :func:`specialize`).

    Raises:
        LoadError: the exports differ in structure, or in a constant that is not one Reshape entry.
    """
    nodes_a, nodes_b = list(model.graph), list(other.graph)
    if [n.op_type for n in nodes_a] != [n.op_type for n in nodes_b]:
        raise LoadError("the two decoder exports differ in structure, so the graph is not token-generic",
                        "write the decoder's forward without shape-dependent control flow")
    for node_a, node_b in zip(nodes_a, nodes_b, strict=True):
        for index, (value_a, value_b) in enumerate(zip(node_a.inputs, node_b.inputs, strict=True)):
            a, b = _const(value_a), _const(value_b)
            if a is None or b is None or (a.shape == b.shape and np.array_equal(a, b)):
                continue
            differs = np.flatnonzero(a != b) if a.shape == b.shape else np.array([])
            if node_a.op_type != "Reshape" or index != 1 or differs.size != 1:
                raise LoadError(f"constant input {index} of {node_a.op_type} node {node_a.name!r} depends on the "
                                "chunk length in a way a -1 cannot express",
                                "write the decoder's forward with the token axis as the one -1 of each reshape")
            generic = a.copy()
            generic[differs[0]] = -1
            name = f"{value_a.name}_generic"
            replacement = model.graph.initializers.get(name)
            if replacement is None:
                replacement = ir.val(name, const_value=ir.tensor(generic))
                model.graph.register_initializer(replacement)
            node_a.replace_input_with(index, replacement)
    _mark_token_axes(model)
    return model


def _clear_inner_shapes(model: ir.Model) -> None:
    keep = {id(v) for v in model.graph.inputs} | {id(v) for v in model.graph.outputs}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.outputs:
            if id(value) not in keep:
                value.shape = None


def regeneralize(model: ir.Model) -> ir.Model:
    """A copy of a specialized (possibly rewritten) decoder graph with the chunk length symbolic again.

    Inputs and outputs get ``"tokens"`` on their token axes and inner shapes are cleared. Whether the rewritten
    graph really is token-generic is checked by running both specializations
    (:func:`effc.decoder.compile.check_consistency`), not assumed.
    """
    copy = ir.from_proto(ir.to_proto(model))
    _mark_token_axes(copy)
    return copy


def _mark_token_axes(model: ir.Model) -> None:
    for value in [*model.graph.inputs, *model.graph.outputs]:
        axes = _token_axes().get(value.name)
        if axes is None or value.shape is None:
            continue
        dims = list(value.shape)
        for axis in axes:
            dims[axis] = TOKENS
        value.shape = ir.Shape(dims)
    _clear_inner_shapes(model)


def _token_axes() -> dict[str, tuple[int, ...]]:
    """Token axes of the graph inputs/outputs (see :mod:`effc.decoder.llama`)."""
    return {"input_ids": (1,), "positions": (1,), "attn_mask": (0,), "logits": (1,), "kv_new": (3,)}


def io_shapes(info: dict[str, Any], tokens: int) -> dict[str, tuple[int, ...]]:
    """Input shapes of the graph specialized to ``tokens`` per call (``attn_mask`` is ``(T, S + T)``)."""
    s = info["max_cache"]
    return {"input_ids": (1, tokens), "positions": (1, tokens), "attn_mask": (tokens, s + tokens),
            "kv_cache": (info["layers"], 2, info["kv_heads"], s, info["head_dim"])}


def specialize(model: ir.Model, tokens: int) -> ir.Model:
    """A canonical copy of the token-generic ``model`` for chunks of ``tokens`` tokens (static shapes).

    Raises:
        ShapeError: ``tokens`` is not a positive integer, or shape inference fails for it.
    """
    from effc.ir.canonicalize import canonicalize

    if isinstance(tokens, bool) or not isinstance(tokens, (int, np.integer)) or tokens < 1:
        raise ShapeError(f"a decoder chunk of {tokens!r} tokens is not a positive integer", "give 1 or more")
    info = decoder_info(model)
    copy = ir.from_proto(ir.to_proto(model))
    for value in copy.graph.outputs:
        value.shape = None
    shapes = io_shapes(info, int(tokens))
    for value in copy.graph.inputs:
        value.shape = ir.Shape(shapes[value.name])
    return canonicalize(copy, input_shapes=shapes)


def cache_leak_reason(model: ir.Model, leaks: list[str]) -> str | None:
    """Placeholder until the KV-cache layout function lands."""
    return "decoder layers are not removable yet"


def remove_cache_layers(model: ir.Model, layers: list[int]) -> None:
    """Placeholder."""
    raise NotImplementedError
