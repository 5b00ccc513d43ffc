"""How much a residual block matters, measured on calibration data (used by ``layer-skip``).

Two signals, as the field defines them:

* **block influence** (ShortGPT, Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant
  Than You Expect"): ``BI = 1 − mean over tokens of cos(block input, block output)``, one tap run of the model;
* **measured effect on the output** (SLEB, Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy
  Verification and Elimination of Transformer Blocks"): the model is run with the block removed and its outputs
  compared with the original's; greedy and iterative (each step removes the block whose removal, together with
  those already removed, hurts least).

Removal is evaluated without copying the model per candidate: :class:`GatedEvaluator` builds one copy in which
each replaced value ``y`` becomes ``x + g·(y − x)`` with a scalar gate input ``g`` per candidate (1 = run, 0 = removed;
exactly ``x``) and one onnxruntime session serves every trial.

The output metric is the cosine similarity of the outputs (per row along the last axis, mean over rows and
samples; the smallest over the compared outputs) or, for a decoder graph, the perplexity of the calibration
windows (next-token negative log-likelihood from ``logits`` ``(1, T, V)`` and ``input_ids`` ``(1, T)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from effc.ir.calibration import Calibration
from effc.ir.reference import Reference
from effc.ir.residual import ResidualBlock
from effc.passes.rewrite import take_output_slots

logger = logging.getLogger(__name__)

GATE_PREFIX = "effc_skip_gate_"


def row_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean cosine similarity of ``a`` and ``b`` row by row along the last axis (float64; zero rows count as 1)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, a.shape[-1] if a.ndim else 1)
    b = np.asarray(b, dtype=np.float64).reshape(a.shape)
    dot, na, nb = (a * b).sum(-1), np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-30))
    return float(cos.mean())


def block_influence(model: ir.Model, groups: Sequence[Sequence[ResidualBlock]],
                    calibration: Calibration) -> list[float]:
    """ShortGPT block influence of each group of consecutive sub-blocks (input of the first, output of the last).

    Args:
        model: the model (unchanged).
        groups: candidates, each a list of sub-blocks in graph order (one sub-block, or a layer's two).
        calibration: the feeds; every token row of every feed counts once.

    Returns:
        ``1 − mean cos(input, output)`` per group, in [0, 2] (0: the group leaves its input's direction as it is).
    """
    pairs = [(g[0].skip.name, g[-1].output.name) for g in groups]
    taps = calibration.tap(model, [n for pair in pairs for n in pair], progress=False)
    return [1.0 - float(np.mean([row_cosine(x, y) for x, y in zip(taps[i], taps[o], strict=True)]))
            for i, o in pairs]


def _gate_input(graph: ir.Graph, index: int) -> ir.Value:
    gate = ir.Value(name=f"{GATE_PREFIX}{index}", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT))
    graph.inputs.append(gate)
    return gate


def _gate_value(graph: ir.Graph, old: ir.Value, new: ir.Value, gate: ir.Value, tag: str) -> None:
    """Every reader of ``old`` reads ``new + gate · (old − new)`` instead (``old`` with gate 1, ``new`` with 0)."""
    uses = list(old.uses())
    anchor = old.producer()
    sub = ir.node("Sub", [old, new], name=f"{tag}_sub")
    mul = ir.node("Mul", [sub.outputs[0], gate], name=f"{tag}_mul")
    add = ir.node("Add", [new, mul.outputs[0]], name=f"{tag}_add")
    graph.insert_after(anchor, [sub, mul, add])
    for use in uses:
        use.node.replace_input_with(use.idx, add.outputs[0])
    take_output_slots(graph, old, add.outputs[0])


class GatedEvaluator:
    """One onnxruntime session over a gated copy of ``model`` that scores any set of removed candidates.

    Each candidate's removal (pairs ``old → new`` of value names, as :func:`effc.passes.layer_skip` applies them)
    is mixed in as ``new + g · (old − new)`` with one scalar gate input ``g`` per candidate: ``g = 1`` computes
    the original, ``g = 0`` exactly the removal.

    Args:
        model: the model (not changed; a copy is gated).
        removals: per candidate, the ``(old, new)`` value-name pairs its removal replaces.
        calibration: the feeds scored.
        decoder: score perplexity of the ``logits`` output against ``input_ids`` instead of output cosine.
        output: the graph output compared by cosine (None: every output, the smallest cosine counts).
        threads: onnxruntime intra-op threads.

    Raises:
        EffcError: onnxruntime cannot load or run the gated copy.
    """

    def __init__(self, model: ir.Model, removals: Sequence[Sequence[tuple[str, str]]], calibration: Calibration, *,
                 decoder: bool = False, output: str | None = None, threads: int = 2) -> None:
        copy = ir.from_proto(ir.to_proto(model))
        values = {v.name: v for n in copy.graph for v in n.outputs} | {v.name: v for v in copy.graph.inputs}
        order = {id(n): i for i, n in enumerate(copy.graph)}
        gates = [_gate_input(copy.graph, k) for k in range(len(removals))]
        self.gates = [g.name for g in gates]
        edits = [(k, j, values[old], values[new])
                 for k, pairs in enumerate(removals) for j, (old, new) in enumerate(pairs)]
        # Last value first, as layer_skip.remove_blocks replaces: an earlier block's output may be a later one's skip.
        for k, j, old, new in sorted(edits, key=lambda e: -order[id(e[2].producer())]):
            _gate_value(copy.graph, old, new, gates[k], f"{GATE_PREFIX}{k}_{j}")
        self.session = Reference(copy, threads=threads)
        self.feeds = list(calibration)
        self.decoder = decoder
        names = self.session.output_names
        self.compared = ([names.index("logits")] if decoder
                         else [i for i, name in enumerate(names) if output in (None, name)])
        self.runs = 0
        self.reference = self._outputs(set())
        self.reference_value = self.score(set())

    def _outputs(self, removed: set[int]) -> list[list[np.ndarray]]:
        gates = {g: np.asarray(0.0 if k in removed else 1.0, dtype=np.float32) for k, g in enumerate(self.gates)}
        out = []
        for feed in self.feeds:
            result = self.session.run({**feed, **gates})
            out.append([result[i] for i in self.compared])
        return out

    def score(self, removed: set[int]) -> float:
        """Cosine to the original outputs (higher is better) or perplexity (lower is better) with ``removed`` gone.

        Args:
            removed: indices (into ``removals``) of the candidates removed.
        """
        self.runs += 1
        outputs = self._outputs(removed)
        if self.decoder:
            return perplexity([o[0] for o in outputs], [f["input_ids"] for f in self.feeds])
        cosines = [[row_cosine(r, c) for r, c in zip(ref, got, strict=True)]
                   for ref, got in zip(self.reference, outputs, strict=True)]
        return float(np.min(np.mean(np.asarray(cosines), axis=0)))

    def agreement(self, removed: set[int]) -> float:
        """Fraction of token positions whose top-1 ``logits`` entry is the original's with ``removed`` gone (decoders).

        The draft of self-speculative decoding is accepted where its greedy token equals the full model's: this is
        that rate with every position's context computed by the draft itself (a lower bound in practice, where the
        full model wrote the context's cache).

        Args:
            removed: indices (into ``removals``) of the candidates removed.
        """
        self.runs += 1
        same = [np.argmax(got[0], axis=-1) == np.argmax(ref[0], axis=-1)
                for ref, got in zip(self.reference, self._outputs(removed), strict=True)]
        return float(np.mean(np.concatenate([s.ravel() for s in same])))

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is better than ``b``."""
        return a < b if self.decoder else a > b


def perplexity(logits: Sequence[np.ndarray], ids: Sequence[np.ndarray]) -> float:
    """Perplexity of next-token predictions: ``logits`` ``(1, T, V)`` per window, ``ids`` ``(1, T)`` int64."""
    total, count = 0.0, 0
    for lg, tok in zip(logits, ids, strict=True):
        lg = np.asarray(lg[0, :-1], dtype=np.float64)
        nxt = np.asarray(tok[0, 1:])
        top = lg.max(-1, keepdims=True)
        logz = np.log(np.exp(lg - top).sum(-1)) + top[:, 0]
        total += float((logz - lg[np.arange(len(nxt)), nxt]).sum())
        count += len(nxt)
    return float(np.exp(total / max(count, 1)))
