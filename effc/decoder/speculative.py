"""Self-speculative decoding: the ``draft`` and ``verify`` entry points of a decoder artifact, and their cost model.

``layer-skip(mode=draft)`` (:mod:`effc.passes.layer_skip`) chooses, on calibration data, the layers a draft step
skips and records them in the decoder metadata (``info["draft"]``); it changes no weight. From the rewritten
token-generic graph the compiler then builds two more entry points beside ``prefill`` and ``decode``:

* ``draft`` — the one-token ``decode`` graph (with ``effc.DecodeAttention``) whose skipped layers are bypassed
  (each residual ``Add`` replaced by its skip input): their weights are not read and their cache is neither read
  nor written (their ``key.i``/``value.i`` outputs are gone; the cache inputs stay in the signature, unused, so
  every entry point takes the same arguments). The kept layers read the cache the full model wrote;
* ``verify`` — the graph specialized to ``tokens + 1`` tokens (a small prefill chunk: positions and mask are
  inputs), which writes every layer's keys and values of the drafted positions (overwriting the draft's) and
  returns the logits of every position. Its attention is ``effc.DecodeAttention`` too (the kernel takes a chunk of
  ``T`` tokens), so it reads only the filled prefix of the cache, not all ``S`` slots.

All four are merged into one library; structurally equal weight constants are stored once (:mod:`effc.codegen.
entries`), so the draft and verify entry points add code, not weights. Method: Zhang et al. 2024, "Draft & Verify:
Lossless Large Language Model Acceleration via Self-Speculative Decoding" (layer skipping drafts, greedy
verification); the draft length adapts to measured acceptance as in DEL (Zarch et al. 2025, "DEL: Context-Aware
Dynamic Exit Layer for Efficient Self-Speculative Decoding"). The run-time loop is
:mod:`effc.runtime.speculate`.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

logger = logging.getLogger(__name__)

#: Entry-point names of the two graphs added here.
DRAFT, VERIFY = "draft", "verify"
#: Tokens drafted per verify call at most, unless ``layer-skip(tokens=...)`` says otherwise.
DEFAULT_DRAFT_TOKENS = 4


def expected_tokens(acceptance: float, drafted: int) -> float:
    """Tokens one verify call yields on average when each drafted token is accepted with probability ``acceptance``.

    A verify of ``drafted`` tokens accepts the longest matching prefix and adds the full model's own next token:
    ``1 + a + a² + … + a^k = (1 − a^(k+1)) / (1 − a)`` for independent acceptances (Leviathan et al. 2023, "Fast
    Inference from Transformers via Speculative Decoding", eq. 1).
    """
    a = min(max(float(acceptance), 0.0), 1.0)
    return float(drafted + 1) if a >= 1.0 else (1.0 - a ** (drafted + 1)) / (1.0 - a)


def best_draft_length(acceptance: float, draft_cost: float, verify_cost: float, most: int) -> tuple[int, float]:
    """The draft length ``k`` in ``1..most`` with the most tokens per unit of time, and that rate.

    Args:
        acceptance: probability that a drafted token is accepted, in [0, 1].
        draft_cost: time of one draft call, in units of one plain decode step (or any unit shared by both costs).
        verify_cost: time of one verify call, same unit.
        most: the verify chunk's draft tokens (``tokens``).

    Returns:
        ``(k, tokens per unit time)``; speculation pays when the rate exceeds ``1 / decode_cost``.
    """
    rates = [(expected_tokens(acceptance, k) / (k * draft_cost + verify_cost), k) for k in range(1, most + 1)]
    rate, k = max(rates)
    return k, rate


def draft_layers(info: dict[str, Any]) -> list[int] | None:
    """The original indices of the layers the draft skips (``info["draft"]["skip_layers"]``), or None without one."""
    draft = info.get("draft")
    return None if not draft else [int(i) for i in draft["skip_layers"]]


def entry_graphs(generic: ir.Model, info: dict[str, Any]) -> dict[str, ir.Model]:
    """The ``draft`` and ``verify`` graphs of a decoder whose metadata holds a draft (else ``{}``).

    Args:
        generic: the rewritten token-generic graph (:func:`effc.ir.decoder.regeneralize`; not changed).
        info: the decoder facts with ``draft = {"skip_layers": [...], "tokens": k}``.

    Raises:
        ShapeError: a skipped layer has no cache in this graph, or its layer cannot be found in the decode graph.
    """
    from effc.decoder.attention import fuse_decode_attention
    from effc.ir.decoder import specialize

    skipped = draft_layers(info)
    if skipped is None:
        return {}
    draft = specialize(generic, 1)
    bypass_layers(draft, skipped)  # before the fusion: the layers are found by their Softmax attention
    fuse_decode_attention(draft)
    verify = specialize(generic, int(info["draft"].get("tokens", DEFAULT_DRAFT_TOKENS)) + 1)
    fuse_decode_attention(verify)  # the kernel takes a chunk too: only the filled prefix of the cache is read
    return {DRAFT: draft, VERIFY: verify}


def bypass_layers(model: ir.Model, layers: list[int]) -> None:
    """Bypass decoder layers ``layers`` (original indices) in place; their cache inputs stay, unread.

    Each layer's attention and FFN residual ``Add`` is replaced by its skip input, its ``key.i``/``value.i``
    outputs are removed and the nodes that became dead are deleted (weights included).

    Raises:
        ShapeError: a layer holds no cache here, or the residual layers found do not match the cache layers.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from effc.errors import ShapeError
    from effc.ir.decoder import cache_layers, decoder_info, kv_layout
    from effc.ir.residual import find_layers, find_residual_blocks
    from effc.passes.rewrite import replace_value

    info = decoder_info(model)
    held = cache_layers(info)
    found = find_layers(find_residual_blocks(model))
    missing = sorted(set(layers) - set(held))
    if missing or len(found) != len(held):
        raise ShapeError(f"the draft skips layers {sorted(layers)} but this decoder graph holds the cache of "
                         f"{held} and {len(found)} residual layers were found",
                         "put layer-skip(mode=draft) after any pass that removes layers")
    order = {id(n): i for i, n in enumerate(model.graph)}
    pairs = [(b.add.outputs[0], b.skip) for la in found if held[la.index] in layers for b in (la.attention, la.ffn)]
    for old, new in sorted(pairs, key=lambda p: -order[id(p[0].producer())]):
        replace_value(model.graph, old, new)
    names = {slot.output for slot in kv_layout(info) if slot.layer in layers}
    for value in [v for v in model.graph.outputs if v.name in names]:
        model.graph.outputs.remove(value)
    RemoveUnusedNodesPass()(model)
    logger.info("draft entry: layers %s bypassed (%d nodes left)", sorted(layers), len(model.graph))


def draft_layout(info: dict[str, Any]) -> list[Any]:
    """The cache slots (:class:`effc.ir.decoder.KVSlot`) whose new entries the draft entry returns, in order."""
    from effc.ir.decoder import kv_layout

    skipped = set(draft_layers(info) or ())
    return [slot for slot in kv_layout(info) if slot.layer not in skipped]
