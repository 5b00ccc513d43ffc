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



def _cache_layout(model: ir.Model) -> tuple[ir.Value, dict[int, list[ir.Node]], ir.Node]:
    """The KV-cache plumbing of :mod:`effc.decoder.llama`'s layout (the one place that knows it).

    Returns:
        ``(kv_cache input, {layer: Gather nodes reading kv_cache[layer] along axis 0}, the Concat along axis 0
        that stacks the layers' new keys and values into the kv_new output)``.

    Raises:
        ShapeError: the graph's cache plumbing is not that layout.
    """
    inputs = {v.name: v for v in model.graph.inputs}
    outputs = {v.name: v for v in model.graph.outputs}
    cache, new = inputs.get("kv_cache"), outputs.get("kv_new")
    concat = new.producer() if new is not None else None
    if cache is None or concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) != 0:
        raise ShapeError("the decoder graph has no kv_cache input read per layer and kv_new output stacked per layer",
                         "remove decoder layers from graphs exported by effc.decoder")
    reads: dict[int, list[ir.Node]] = {}
    for use in cache.uses():
        index = _const(use.node.inputs[1]) if len(use.node.inputs) > 1 else None
        if use.node.op_type != "Gather" or use.node.attributes.get_int("axis", 0) != 0 or index is None \
                or index.ndim != 0:
            raise ShapeError(f"{use.node.op_type} node {use.node.name!r} reads kv_cache other than kv_cache[layer]",
                             "remove decoder layers from graphs exported by effc.decoder")
        reads.setdefault(int(index), []).append(use.node)
    return cache, reads, concat


def cache_leak_reason(model: ir.Model, leaks: list[str], nodes: list[ir.Node]) -> str | None:
    """Why a layer whose values named ``leaks`` are read outside its ``nodes`` cannot go with its cache, or None.

    A decoder layer's keys and values leave it only towards the ``kv_new`` output; anything else (a value read by
    the logits, another layer) blocks the removal.
    """
    values = {o.name: o for n in model.graph for o in n.outputs}
    seen, stack = {id(n) for n in nodes}, [values[name] for name in leaks if name in values]
    while stack:
        value = stack.pop()
        if value.is_graph_output() and value.name != "kv_new":
            return f"its value {value.name!r} reaches the graph output {value.name!r}, not only the KV cache"
        for use in value.uses():
            if id(use.node) not in seen:
                seen.add(id(use.node))
                stack.extend(use.node.outputs)
    return None


def remove_cache_layers(model: ir.Model, layers: list[int]) -> None:
    """Take layers out of the KV cache, with every per-layer fact that follows.

    ``kv_cache`` ``(L, 2, Hkv, S, D)`` and ``kv_new`` ``(L, 2, Hkv, T, D)`` lose the layers' rows, the cache reads
    of the kept layers are renumbered, and the metadata's ``layers`` (and ``source_layers``, the original index of
    each kept layer) follow. The removed layers' nodes become dead (the caller deletes them).

    Args:
        model: a decoder graph (prefill specialization or token-generic) whose layers ``layers`` no longer feed
            the logits.
        layers: current layer indices, ``0 <= i < L``.

    Raises:
        ShapeError: an index out of range, or a graph whose cache plumbing is not effc's layout.
    """
    info = decoder_info(model)
    count = int(info["layers"])
    gone = sorted(set(int(i) for i in layers))
    if any(not 0 <= i < count for i in gone) or len(gone) >= count:
        raise ShapeError(f"cannot remove layers {gone} of a decoder with {count}", "keep at least one layer")
    cache, reads, concat = _cache_layout(model)
    keep = [i for i in range(count) if i not in gone]
    for new, old in enumerate(keep):
        for node in reads.get(old, []):
            if new != old:
                index = ir.val(f"{node.name}_layer_{new}", const_value=ir.tensor(np.asarray(new, dtype=np.int64)))
                model.graph.register_initializer(index)
                node.replace_input_with(1, index)
    stacked = ir.node("Concat", [concat.inputs[i] for i in keep], attributes={"axis": 0}, name=f"{concat.name}_kept")
    model.graph.insert_after(concat, stacked)
    out = concat.outputs[0]
    slot = list(model.graph.outputs).index(out)
    stacked.outputs[0].name, out.name = out.name, f"{out.name}__all_layers"
    stacked.outputs[0].type = out.type
    model.graph.outputs[slot] = stacked.outputs[0]
    for value, shape in ((cache, cache.shape), (stacked.outputs[0], out.shape)):
        if shape is not None:
            value.shape = ir.Shape([len(keep), *list(shape)[1:]])
    sources = info.get("source_layers", list(range(count)))
    info.update(layers=len(keep), source_layers=[sources[i] for i in keep])
    model.metadata_props[METADATA_KEY] = json.dumps(info, sort_keys=True)
