"""Decoder graphs: one token-generic graph, specialized into the prefill chunk and the one-token decode step.

A decoder is exported as one ONNX graph over a chunk of ``T`` tokens whose reshapes name the token axis ``-1``
(:func:`generalize_tokens` makes it so from two static exports), so its structure does not depend on ``T``.
:func:`specialize` fixes ``T`` (``P`` for prefill, 1 for decode) and canonicalizes. Passes rewrite the prefill
specialization once; :func:`regeneralize` returns the rewritten graph to token-generic form, from which the decode
graph is specialized: both entry points share the same rewritten weights by construction.

The decoder's facts travel in ``model.metadata_props["effc.decoder"]`` (JSON, :func:`decoder_info`); graph
inputs and outputs are described in :mod:`effc.decoder.llama`. Which graph inputs and outputs hold which layer's
keys and values is known in one place only, :func:`kv_layout`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.errors import LoadError, ShapeError

METADATA_KEY = "effc.decoder"
TOKENS = "tokens"
#: Graph inputs before the KV-cache inputs, and graph outputs before the new keys and values.
INPUTS = ("input_ids", "positions", "attn_mask")
OUTPUTS = ("logits",)
#: The extra input of the last-token prefill (:mod:`effc.decoder.last_token`), after the KV-cache inputs: int64
#: ``(1,)``, the row of the chunk whose logits are returned.
LAST_INDEX = "last_index"
#: The entry point that takes it and returns that row's logits only.
PREFILL_LAST = "prefill_last"


@dataclasses.dataclass(frozen=True)
class KVSlot:
    """One layer's keys or values: the cache (a graph input) and the chunk's new entries (a graph output).

    Keys are stored transposed, ``(Hkv, D, S)``, so ``q · Kᵀ`` reads the cache as it lies; values are ``(Hkv, S,
    D)``. The chunk's output has the same layout with ``T`` in place of ``S``; the runtime writes it into the cache
    at the chunk's positions along :attr:`seq_axis` (in place: the cache is never copied).

    A cache stored in MX blocks (``block-quant(mode=kv)`` with an 8-bit MX format: ``info["kv_row_bytes"]`` set)
    holds keys and values alike as ``(Hkv, S, W)`` uint8 rows, ``W`` bytes per slot (codes, then E8M0 scales:
    :mod:`effc.ops.kv_blocks`); the chunk's output is ``(Hkv, T, W)``.

    Attributes:
        layer: decoder layer index (in the original numbering, also after layers are removed).
        kind: ``"key"`` or ``"value"``.
        input: graph input name of the cache (``past_key.3``).
        output: graph output name of the chunk's entries (``key.3``).
        seq_axis: the axis of cache slots (input) and of chunk tokens (output): 2 for float32 keys, else 1.
        dtype: the stored element type, ``"float32"`` or ``"uint8"`` (MX rows).
        row_bytes: bytes per slot of an MX-row cache, None for float32.
    """

    layer: int
    kind: str
    input: str
    output: str
    seq_axis: int
    dtype: str = "float32"
    row_bytes: int | None = None

    def shape(self, info: dict[str, Any], length: int) -> tuple[int, int, int]:
        """The slot's shape with ``length`` along :attr:`seq_axis` (``S`` for the cache, ``T`` for the output)."""
        if self.row_bytes is not None:
            return int(info["kv_heads"]), int(length), int(self.row_bytes)
        dims = [int(info["kv_heads"]), int(info["head_dim"]), int(info["head_dim"])]
        dims[self.seq_axis] = int(length)
        return tuple(dims)


def kv_layout(info: dict[str, Any]) -> list[KVSlot]:
    """The KV-cache inputs/outputs of a decoder graph, in graph order: per layer its keys, then its values.

    The layers holding a cache are ``info["kv_layers"]`` when present (a pass that removes layers writes it), else
    ``range(info["layers"])``; ``info["kv_row_bytes"]`` selects the MX-row layout (:class:`KVSlot`). This is the only
    place that knows the cache's names and layouts.
    """
    layers = info.get("kv_layers")
    layers = range(int(info["layers"])) if layers is None else layers
    rows = info.get("kv_row_bytes")
    if rows is not None:  # MX rows (effc.ops.kv_blocks)
        return [KVSlot(int(i), kind, f"past_{kind}.{i}", f"{kind}.{i}", 1, "uint8", int(rows))
                for i in layers for kind in ("key", "value")]
    return [KVSlot(int(i), kind, f"past_{kind}.{i}", f"{kind}.{i}", axis)
            for i in layers for kind, axis in (("key", 2), ("value", 1))]


def remove_kv_layer(model: ir.Model, layer: int) -> None:
    """Drop layer ``layer``'s cache from the decoder graph (in place), once nothing computed reads it any more.

    Removes the graph inputs ``past_key.i`` / ``past_value.i`` and the outputs ``key.i`` / ``value.i``, and writes
    the remaining layers to the metadata as ``kv_layers`` (so :func:`kv_layout`, the runtime's cache and the
    artifact's entry points agree). Nodes that only fed the removed outputs become dead: run dead-code removal next.

    Raises:
        ShapeError: the layer has no cache in this graph, or a node still reads one of its cache inputs.
    """
    info = decoder_info(model)
    slots = [slot for slot in kv_layout(info) if slot.layer == layer]
    if not slots:
        raise ShapeError(f"decoder layer {layer} has no KV cache in this graph",
                         f"remove one of the layers {sorted({s.layer for s in kv_layout(info)})}")
    inputs = {v.name: v for v in model.graph.inputs}
    for slot in slots:
        readers = [use.node.name for use in inputs[slot.input].uses()] if slot.input in inputs else []
        if readers:
            raise ShapeError(f"the cache input {slot.input} of layer {layer} is still read by {readers[:3]}",
                             "bypass the layer's attention before removing its cache")
    names = {n for slot in slots for n in (slot.input, slot.output)}
    for values in (model.graph.inputs, model.graph.outputs):
        for value in [v for v in values if v.name in names]:
            values.remove(value)
    kept = [i for i in dict.fromkeys(slot.layer for slot in kv_layout(info)) if i != layer]
    model.metadata_props[METADATA_KEY] = json.dumps({**info, "kv_layers": kept}, sort_keys=True)


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
    and outputs get the symbolic dimension ``"tokens"`` on their token axes (``model`` must carry the decoder
    metadata already: it names the KV-cache outputs); other value shapes are cleared (they are inferred again by
    :func:`specialize`).

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
    token_axes = _token_axes(decoder_info(model))
    for value in [*model.graph.inputs, *model.graph.outputs]:
        axes = token_axes.get(value.name)
        if axes is None or value.shape is None:
            continue
        dims = list(value.shape)
        for axis in axes:
            dims[axis] = TOKENS
        value.shape = ir.Shape(dims)
    _clear_inner_shapes(model)


def _token_axes(info: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Token axes of the graph inputs/outputs (see :mod:`effc.decoder.llama`)."""
    axes = {"input_ids": (1,), "positions": (1,), "attn_mask": (0,), "logits": (1,)}
    if info.get("ffn_gates"):  # layer-skip(mode=adaptive): each FFN gate's decision per token, (T, G)
        axes[info["ffn_gates"]["output"]] = (0,)
    return {**axes, **{slot.output: (slot.seq_axis,) for slot in kv_layout(info)}}


def io_shapes(info: dict[str, Any], tokens: int) -> dict[str, tuple[int, ...]]:
    """Input shapes of the graph specialized to ``tokens`` per call (``attn_mask`` is ``(T, S + T)``).

    ``last_index`` ``(1,)`` is listed too; only the last-token prefill graph has that input.
    """
    s = info["max_cache"]
    return {"input_ids": (1, tokens), "positions": (1, tokens), "attn_mask": (tokens, s + tokens),
            **{slot.input: slot.shape(info, s) for slot in kv_layout(info)}, LAST_INDEX: (1,)}


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
    names = {value.name for value in copy.graph.inputs}
    shapes = {name: dims for name, dims in io_shapes(info, int(tokens)).items() if name in names}
    for value in copy.graph.inputs:
        value.shape = ir.Shape(shapes[value.name])
    return canonicalize(copy, input_shapes=shapes)


def cache_layers(info: dict[str, Any]) -> list[int]:
    """The original indices of the layers that hold a KV cache, in order (:func:`kv_layout`)."""
    return list(dict.fromkeys(slot.layer for slot in kv_layout(info)))


def cache_leak_reason(model: ir.Model, leaks: list[str], nodes: list[ir.Node]) -> str | None:
    """Why a layer whose values named ``leaks`` are read outside its ``nodes`` cannot go with its cache, or None.

    A decoder layer's keys and values leave it only towards its KV-cache outputs (:func:`kv_layout`); anything else
    (a value read by the logits, another layer) blocks the removal.
    """
    allowed = {slot.output for slot in kv_layout(decoder_info(model))}
    values = {o.name: o for n in model.graph for o in n.outputs}
    seen, stack = {id(n) for n in nodes}, [values[name] for name in leaks if name in values]
    while stack:
        value = stack.pop()
        if value.is_graph_output() and value.name not in allowed:
            return f"its value {value.name!r} reaches the graph output {value.name!r}, not only the KV cache"
        for use in value.uses():
            if id(use.node) not in seen:
                seen.add(id(use.node))
                stack.extend(use.node.outputs)
    return None


def remove_cache_layers(model: ir.Model, positions: list[int]) -> None:
    """Take layers whose blocks no longer feed the logits out of the KV cache (:func:`remove_kv_layer` each).

    Their cache outputs go first, so the nodes computing them and the attention reading their cache inputs become
    dead and are deleted; then the inputs go and the metadata's ``kv_layers`` follows.

    Args:
        model: a decoder graph (prefill specialization or token-generic).
        positions: the layers' positions among those holding a cache now (0 = first), as the residual blocks are
            found in graph order.

    Raises:
        ShapeError: a position out of range, or a cache input still read (the layer still feeds the logits).
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    layers = cache_layers(decoder_info(model))
    if any(not 0 <= p < len(layers) for p in positions) or len(set(positions)) >= len(layers):
        raise ShapeError(f"cannot remove layers at {sorted(positions)} of a decoder with {len(layers)}",
                         "keep at least one layer")
    gone = {layers[p] for p in positions}
    outputs = {slot.output for slot in kv_layout(decoder_info(model)) if slot.layer in gone}
    for value in [v for v in model.graph.outputs if v.name in outputs]:
        model.graph.outputs.remove(value)
    RemoveUnusedNodesPass()(model)
    for layer in sorted(gone):
        remove_kv_layer(model, layer)
