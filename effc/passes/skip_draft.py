"""``layer-skip(mode=draft)``: choose the layers the draft entry point of self-speculative decoding skips.

The candidates are whole decoder layers in the pass's ranking order (block influence, SLEB or last). With ``count``
or ``ratio`` the first ones go; otherwise a few prefixes of the ranking (1 to half of the layers) are measured on the
calibration windows: the draft's top-1 agreement with the full model (:meth:`GatedEvaluator.agreement`, a proxy for
the acceptance rate) and its cost, the weight bytes a draft step still reads as a fraction of a decode step's (batch-1
decoding is bound by weight bytes). The prefix with the most tokens per unit of time under
:func:`effc.decoder.speculative.best_draft_length` wins, with a verify call costed as one decode step (it reads every
weight once for ``tokens + 1`` tokens). DEL (Zarch et al. 2025) picks its exit layer from measured acceptance in the
same spirit, per context at run time; here the layer set is fixed at compile time and the draft length adapts at run
time (:mod:`effc.runtime.speculate`).

The graph is not changed: the choice goes into the decoder metadata (``info["draft"]``), from which the compiler
builds the ``draft`` and ``verify`` entry points (:func:`effc.decoder.speculative.entry_graphs`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.decoder.speculative import best_draft_length
from effc.ir import decoder as decoder_ir
from effc.passes.skip_scoring import GatedEvaluator

#: Prefixes of the ranking measured when neither ``count`` nor ``ratio`` is given (at most this many).
MEASURED_PREFIXES = 6


def draft_cost(model: ir.Model, blocks_bytes: int) -> float:
    """Weight bytes a draft step reads as a fraction of a full decode step's, when ``blocks_bytes`` are skipped."""
    from effc.decoder.compile import bytes_read_per_token

    total = bytes_read_per_token(model)
    return max(1.0 - blocks_bytes / max(total, 1), 0.0)


def prefixes(n: int) -> list[int]:
    """Prefix lengths of the ranking measured for ``n`` candidates: up to :data:`MEASURED_PREFIXES` in [1, n // 2]."""
    top = max(n // 2, 1)
    return sorted({int(round(x)) for x in np.linspace(1, top, min(MEASURED_PREFIXES, top))})


def choose(model: ir.Model, ranked: Sequence[Any], counts: Sequence[int], evaluator: GatedEvaluator | None,
           index_of: dict[int, int], tokens: int) -> tuple[int, list[dict[str, Any]]]:
    """The number of ranked candidates the draft skips, and one record per measured prefix.

    Args:
        model: the decoder graph (its weight bytes set the cost).
        ranked: candidates (whole layers) in removal order.
        counts: prefix lengths to measure; one length is taken as it is.
        evaluator: a decoder :class:`GatedEvaluator` over the candidates, or None (nothing measured).
        index_of: ``id(candidate)`` → its index in the evaluator's removals.
        tokens: the most tokens drafted per verify call.
    """
    trials = []
    for count in counts:
        chosen = ranked[:count]
        cost = draft_cost(model, sum(b.weight_bytes() for c in chosen for b in c.blocks))
        trial: dict[str, Any] = {"count": count, "layers": [c.name for c in chosen], "draft_cost": round(cost, 4)}
        if evaluator is not None:
            agreement = evaluator.agreement({index_of[id(c)] for c in chosen})
            k, rate = best_draft_length(agreement, cost, 1.0, tokens)
            trial.update(agreement=round(agreement, 4), draft_tokens=k, modeled_speedup=round(rate, 4))
        trials.append(trial)
    best = max(trials, key=lambda t: t.get("modeled_speedup", 0.0)) if len(trials) > 1 else trials[0]
    return best["count"], trials


def record(model: ir.Model, layers: list[int], tokens: int, trial: dict[str, Any]) -> dict[str, Any]:
    """Write the draft (skipped original layer indices, tokens, measured numbers) into the decoder metadata."""
    info = decoder_ir.decoder_info(model)
    draft = {"skip_layers": sorted(layers), "tokens": tokens,
             **{k: trial[k] for k in ("agreement", "draft_cost", "modeled_speedup") if k in trial}}
    model.metadata_props[decoder_ir.METADATA_KEY] = json.dumps({**info, "draft": draft}, sort_keys=True)
    return draft
