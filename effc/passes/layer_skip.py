"""``layer-skip``: find residual blocks, rank them on calibration data and remove the least useful ones.

The structure comes from :mod:`effc.ir.residual`: residual sub-blocks ``y = x + f(x)`` (attention, FFN, residual
conv) and the transformer layers they form. ``mode=report`` only lists them (with their block influence when
calibration data is given); ``mode=static`` removes candidates for good: the residual ``Add`` is replaced by its
skip input, so the branch (its nodes and weights) is dead and deleted, and the graph shrinks. A post-norm after
the ``Add`` (BERT) stays, ``y = LN(x)``: on MiniLM-L6 dropping one FFN sub-block keeps an embedding cosine of
0.954 with its LayerNorm against 0.904 without (../shared/notes/fidelity.md).

Ranking (``rank``):

* ``influence`` — ShortGPT's block influence ``1 − cos(input, output)`` (Men et al. 2024), lowest first;
* ``sleb`` — SLEB's iterative search (Song et al. 2024): each step removes the candidate whose removal, together
  with those already removed, changes the output least (cosine; perplexity for a decoder);
* ``last`` — the last candidates first: the naive baseline the other two are compared with.

How many go: ``count`` candidates, or ``ratio`` of them, bounded by ``min_cosine`` (outputs vs the original on the
calibration feeds) or, for a decoder, ``max_ppl_increase`` (relative perplexity on the calibration windows); with
none of these one candidate goes. With a quality bound, removal stops at the first candidate (in rank order) that
would break it. For a decoder, removing a whole layer also removes its slice of the KV cache
(:func:`effc.ir.decoder.remove_cache_layers`).

``mode=draft`` (decoders, whole layers) removes nothing either: the layers a draft step of self-speculative
decoding skips are chosen (``count``/``ratio``, or measured on calibration: :mod:`effc.passes.skip_draft`) and
recorded in the decoder metadata, from which the compiler adds ``draft`` and ``verify`` entry points
(:mod:`effc.decoder.speculative`; ``effc generate --speculate``).

``mode=adaptive`` (encoders, ``blocks=ffn``) removes nothing: each FFN sub-block runs under a per-sequence gate,
``If(s < τ)``, with ``τ`` calibrated to skip ``ratio`` of the calibration sequences (:mod:`effc.passes.skip_gate`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from effc.decoder.speculative import DEFAULT_DRAFT_TOKENS
from effc.errors import CalibrationError, PassError
from effc.ir import decoder as decoder_ir
from effc.ir.calibration import Calibration
from effc.ir.residual import ResidualBlock, find_layers, find_residual_blocks
from effc.ops.base import EFFC_DOMAIN
from effc.passes import skip_draft, skip_gate, skip_token_gate
from effc.passes.base import EffcPass, PassOptions, register_pass
from effc.passes.rewrite import replace_value
from effc.passes.skip_scoring import GatedEvaluator, block_influence

logger = logging.getLogger(__name__)

_UNCHANGED_HINT = "give count=, ratio= or a looser min_cosine/max_ppl_increase; mode=report lists the candidates"
MODES = ("static", "adaptive", "draft", "report")
BLOCKS = ("layer", "ffn", "attention", "sublayer", "conv", "all")
RANKS = ("influence", "sleb", "last")
NORMS = ("keep", "drop")
ALLOCATIONS = ("uniform", "global")
#: Candidates that take a decoder layer's keys and values (its KV cache) with them.
CACHE_KINDS = ("layer", "attention")


@dataclasses.dataclass(frozen=True)
class LayerSkipOptions(PassOptions):
    """Options of ``layer-skip``."""

    mode: str = dataclasses.field(default="static", metadata={
        "help": "static (remove) | adaptive (FFNs under a run-time gate, blocks=ffn) | draft (decoders: a draft entry "
                "point skips the layers, for effc generate --speculate) | report", "choices": MODES})
    blocks: str | None = dataclasses.field(default=None, metadata={
        "help": "candidates: layer | ffn | attention | sublayer (ffn+attention) | conv | all (default: layer; ffn "
                "with mode=adaptive)", "choices": BLOCKS})
    rank: str = dataclasses.field(default="influence", metadata={"help": "influence | sleb | last", "choices": RANKS})
    count: int | None = dataclasses.field(default=None, metadata={"help": "candidates removed"})
    ratio: float | None = dataclasses.field(default=None, metadata={
        "help": "static: fraction of candidates removed; adaptive: target fraction of FFN calls skipped, [0, 1)"})
    min_cosine: float | None = dataclasses.field(default=None, metadata={
        "help": "keep output cosine vs the original >= this on the calibration feeds"})
    max_ppl_increase: float | None = dataclasses.field(default=None, metadata={
        "help": "decoders: keep calibration perplexity within (1 + this) x the original's"})
    norm: str = dataclasses.field(default="keep", metadata={
        "help": "post-norm after a removed block: keep (y = LN(x)) | drop (y = x)", "choices": NORMS})
    include: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "only candidates whose name matches one of these patterns (e.g. [layers.1,layers.3])"})
    output: str | None = dataclasses.field(default=None, metadata={"help": "graph output compared (default: all)"})
    samples: int = dataclasses.field(default=16, metadata={"help": "calibration feeds used for ranking"})
    allocate: str = dataclasses.field(default="uniform", metadata={
        "help": "adaptive, decoders: uniform (each FFN skips ratio of the tokens) | global (one threshold for all: "
                "FFNs after attention that changes the state less skip more)", "choices": ALLOCATIONS})
    sinks: int = dataclasses.field(default=4, metadata={
        "help": "adaptive, decoders: the first positions always run every FFN (attention-sink tokens)"})
    tokens: int = dataclasses.field(default=DEFAULT_DRAFT_TOKENS, metadata={
        "help": "draft: tokens drafted per verify call at most (the verify entry point takes tokens + 1)"})

    @property
    def kind(self) -> str:
        """The candidates' kind: ``blocks``, else ``ffn`` for ``mode=adaptive`` and ``layer`` otherwise."""
        return self.blocks or ("ffn" if self.mode == "adaptive" else "layer")

    def validate(self) -> None:
        """Check the option values.

        Raises:
            PipelineError: a negative count, a ratio outside [0, 1), both count and ratio, a bound out of range.
        """
        if self.count is not None and self.count < 0:
            self.fail("count", self.count, "a non-negative integer")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            self.fail("ratio", self.ratio, "a fraction in [0, 1)")
        if self.count is not None and self.ratio is not None:
            self.fail("count", self.count, "left out when ratio= is given (one of count= or ratio=)")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            self.fail("min_cosine", self.min_cosine, "a cosine in [-1, 1]")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            self.fail("max_ppl_increase", self.max_ppl_increase, "a non-negative fraction (0.1 = +10%)")
        if self.samples < 1:
            self.fail("samples", self.samples, "a positive integer")
        if self.sinks < 0:
            self.fail("sinks", self.sinks, "a non-negative number of positions")
        if not 1 <= self.tokens <= 16:
            self.fail("tokens", self.tokens, "an integer in [1, 16]")


@dataclasses.dataclass
class Candidate:
    """What one removal takes out: one sub-block, or a layer's two (``index``: position among the layers)."""

    name: str
    kind: str
    blocks: list[ResidualBlock]
    index: int | None = None  # a layer's or attention sub-block's position: its KV-cache layer in a decoder

    def replacements(self, norm: str) -> list[tuple[ir.Value, ir.Value]]:
        """``(old, new)`` value pairs whose replacement removes the candidate (``norm`` as the option)."""
        if norm == "drop":
            return [(self.blocks[-1].output, self.blocks[0].skip)]
        return [(b.add.outputs[0], b.skip) for b in self.blocks]


def _effc_ops(model: ir.Model) -> list[str]:
    """The effc operator types in ``model`` (weights an earlier pass rewrote, which layer-skip cannot see)."""
    return sorted({n.op_type for n in model.graph if n.domain == EFFC_DOMAIN})


def candidates(model: ir.Model, which: str) -> tuple[list[Candidate], list[ResidualBlock]]:
    """The removable candidates of ``model`` for ``blocks=which``, and every residual sub-block found.

    Raises:
        PassError: the model has no residual sub-block at all.
    """
    found = find_residual_blocks(model)
    if not found:
        rewritten = _effc_ops(model)
        if rewritten:  # an earlier pass (block-quant, nm-sparsity, moe, ...) turned the weights into effc operators
            raise PassError(
                f"layer-skip found no residual block: an earlier pass turned the weight MatMul/Gemm/Conv nodes it "
                f"looks for into effc operators ({', '.join(rewritten)})",
                "put layer-skip first in --passes, e.g. \"layer-skip(mode=adaptive,ratio=0.25),block-quant(...)\"")
        raise PassError(
            "layer-skip found no residual block: it looks for Add(x, f(x)) where f depends on x through a MatMul, "
            "Gemm or Conv with a constant weight (transformer layers, attention/FFN sub-blocks, residual conv blocks)",
            "this model has no skip connection whose branch could be removed; make it smaller with prune-structured")
    if which == "layer":
        return [Candidate(la.name, "layer", [la.attention, la.ffn], la.index) for la in find_layers(found)], found
    kinds = {"ffn": ("ffn",), "attention": ("attention",), "sublayer": ("ffn", "attention"), "conv": ("conv",)}
    wanted = kinds.get(which)
    attention = [b for b in found if b.kind == "attention"]
    return [Candidate(b.name, b.kind, [b], attention.index(b) if b.kind == "attention" else None)
            for b in found if wanted is None or b.kind in wanted], found


def remove_blocks(model: ir.Model, chosen: list[Candidate], norm: str = "keep") -> None:
    """Replace each chosen block's output by its input and delete what became dead.

    With ``norm="keep"`` the residual ``Add`` is replaced (a post-norm stays: ``y = LN(x)``), with ``"drop"`` the
    block's output after its post-norm (``y = x``). Values are replaced last first: an earlier block's output may
    be a later block's skip input. A decoder's removed layers also leave its KV cache
    (:func:`effc.ir.decoder.remove_cache_layers`).
    """
    order = {id(n): i for i, n in enumerate(model.graph)}
    pairs = [pair for cand in chosen for pair in cand.replacements(norm)]
    for old, new in sorted(pairs, key=lambda p: -order[id(p[0].producer())]):
        replace_value(model.graph, old, new)
    layers = sorted(c.index for c in chosen if c.kind in CACHE_KINDS)
    if decoder_ir.is_decoder(model) and layers:
        decoder_ir.remove_cache_layers(model, layers)
    ir_common.RemoveUnusedNodesPass()(model)


@register_pass
class LayerSkipPass(EffcPass):
    """Remove whole residual blocks ranked on calibration data (see the module docstring).

    Stats: ``found`` (every candidate: name, kind, weight bytes, block influence when calibrated, ``removable``),
    ``removed`` (in removal order, with the measured score after each step), ``score_before``/``score_after``
    (output cosine, or perplexity for a decoder), ``metric``, ``weight_bytes_removed``, ``skipped``; adaptive:
    ``gates`` (name, threshold, calibration skip rate) and ``calibration_skip_rate``.

    Raises:
        PassError: no residual block in the model; options that do not fit it (``max_ppl_increase`` on an
            encoder, ``min_cosine`` on a decoder, ``mode=adaptive`` without ``blocks=ffn`` and ``ratio``, a
            ``count`` above the number of removable blocks).
        CalibrationError: a ranking or bound that measures without calibration data.
    """

    name = "layer-skip"
    summary = ("remove residual blocks (layers, attention/FFN sub-blocks) ranked by influence or measured effect, "
               "or gate FFNs at run time")
    Options = LayerSkipOptions
    exact = False
    uses_calibration = True

    def unchanged_reason(self) -> str | None:
        """None for ``mode=report`` (it changes nothing by design), else the lossy pass's reason.

        A model with no block of the asked kind at all (e.g. ``mode=adaptive``, FFN sub-blocks, on a conv net) says
        so, rather than suggesting count=/ratio=, which cannot help.
        """
        if self.options.mode == "report":
            return None
        if self.stats.get("found") == []:
            kinds = ", ".join(f"{n} {k}" for k, n in (self.stats.get("blocks_found") or {}).items()) or "none"
            verb = "gate" if self.options.mode == "adaptive" else "remove"
            return f"the model has no {self.options.kind} block to {verb} (residual blocks found: {kinds})"
        return super().unchanged_reason()

    @property
    def unchanged_hint(self) -> str:  # type: ignore[override]
        """The fix for :meth:`unchanged_reason`: another order or ``blocks=`` when the model has none of the kind."""
        if self.stats.get("found") != []:
            return _UNCHANGED_HINT
        rewritten = getattr(self, "_rewritten", [])
        if rewritten:
            return (f"put layer-skip first in --passes: an earlier pass turned weights into effc operators "
                    f"({', '.join(rewritten)}) that layer-skip does not look into")
        if self.options.mode == "adaptive":
            return "mode=adaptive gates transformer FFN sub-blocks only, and this model has none"
        return "pick blocks= among the kinds found (mode=report lists the candidates)"

    def _removable(self, model: ir.Model, cand: Candidate, attention_blocks: int) -> str | None:
        """Why ``cand`` cannot be removed alone, or None (``attention_blocks``: how many the model has)."""
        leaks = [v for b in cand.blocks for v in b.leaks]
        if not leaks:
            return None
        if decoder_ir.is_decoder(model) and cand.kind in CACHE_KINDS:
            layers = len(decoder_ir.cache_layers(decoder_ir.decoder_info(model)))
            if attention_blocks != layers:
                return (f"{attention_blocks} attention blocks found for {layers} cache layers: the cache rows cannot "
                        "be matched")
            return decoder_ir.cache_leak_reason(model, leaks, [n for b in cand.blocks for n in [*b.nodes, b.add]])
        return f"values of the block are read outside it: {', '.join(leaks[:3])}"

    def _check(self, model: ir.Model) -> bool:
        """Validate the options against the model; True when the model is a decoder."""
        o, decoder = self.options, decoder_ir.is_decoder(model)
        if o.max_ppl_increase is not None and not decoder:
            raise PassError("layer-skip(max_ppl_increase=...) needs a decoder graph (perplexity of next tokens)",
                            "use min_cosine= for this model")
        if o.min_cosine is not None and decoder:
            raise PassError("layer-skip(min_cosine=...) compares outputs; a decoder is bounded by perplexity",
                            "use max_ppl_increase= (0.1 = +10%) for a decoder")
        needs = o.rank != "last" or o.min_cosine is not None or o.max_ppl_increase is not None
        needs = needs or (o.mode == "draft" and o.count is None and o.ratio is None)  # the draft is measured
        if needs and o.mode != "report" and self.calibration is None:
            raise CalibrationError(f"layer-skip(rank={o.rank}) measures blocks on calibration data but got none",
                                   "give calibration inputs (--data FILE.npz, or a zoo: model), or use rank=last "
                                   "with count=")
        return decoder

    def _limit(self, n: int) -> int:
        o = self.options
        if o.count is not None:
            if o.count > n:
                raise PassError(f"layer-skip(count={o.count}) asks for more blocks than the {n} removable "
                                f"{o.kind} blocks", f"give count= up to {n} (mode=report lists the candidates)")
            return o.count
        if o.ratio is not None:
            return int(o.ratio * n)
        return n if o.min_cosine is not None or o.max_ppl_increase is not None else min(1, n)

    def _within(self, evaluator: GatedEvaluator, score: float) -> bool:
        o = self.options
        if o.min_cosine is not None:
            return score >= o.min_cosine
        if o.max_ppl_increase is not None:
            return score <= evaluator.reference_value * (1.0 + o.max_ppl_increase)
        return True

    def _select(self, pool: list[Candidate], influence: list[float] | None, evaluator: GatedEvaluator | None,
                limit: int | None = None) -> list[tuple[Candidate, float | None]]:
        """Candidates to remove in removal order (``limit`` at most), each with the score measured after its removal."""
        limit, rank = self._limit(len(pool)) if limit is None else limit, self.options.rank
        chosen: list[tuple[Candidate, float | None]] = []
        gone: set[int] = set()
        order = list(reversed(range(len(pool)))) if rank == "last" else list(np.argsort(influence, kind="stable"))
        while len(chosen) < limit and order:
            if rank == "sleb":
                trials = [(evaluator.score(gone | {k}), k) for k in order]
                score, k = trials[0]
                for trial in trials[1:]:
                    score, k = trial if evaluator.better(trial[0], score) else (score, k)
            else:
                k = order[0]
                score = evaluator.score(gone | {k}) if evaluator else None
            if score is not None and not self._within(evaluator, score):
                break
            order.remove(k)
            gone.add(k)
            chosen.append((pool[k], score))
        return chosen

    def _adaptive(self, model: ir.Model, usable: list[Candidate], found: list[ResidualBlock]) -> bool:
        """``mode=adaptive``: put each usable FFN under its calibrated gate.

        Per sequence for an encoder (:mod:`effc.passes.skip_gate`), per token for a decoder
        (:mod:`effc.passes.skip_token_gate`).
        """
        o, decoder = self.options, decoder_ir.is_decoder(model)
        if decoder and (o.count is not None or o.max_ppl_increase is not None or o.norm != "keep"):
            raise PassError("layer-skip(mode=adaptive) on a decoder skips a ratio= of the FFN calls per token; count=, "
                            "max_ppl_increase= and norm=drop apply to removing blocks (mode=static)",
                            "give only ratio= (and include= to restrict the layers)")
        if o.kind != "ffn" or o.ratio is None or self.calibration is None:
            scope = "per token in decode" if decoder else "per sequence"
            raise PassError(f"layer-skip(mode=adaptive) gates FFN sub-blocks {scope}: it needs blocks=ffn, a target "
                            "skip rate ratio= and calibration data",
                            "e.g. layer-skip(mode=adaptive,ratio=0.25) (blocks=ffn is the default of mode=adaptive)")
        after = {id(la.ffn.add): la.attention for la in find_layers(found)}
        self.stats["skipped"] += [{"name": c.name, "reason": "no attention sub-block before it gives the signal"}
                                  for c in usable if id(c.blocks[0].add) not in after]
        pairs = [(c.name, after[id(c.blocks[0].add)], c.blocks[0]) for c in usable if id(c.blocks[0].add) in after]
        if decoder:
            return self._adaptive_tokens(model, pairs)
        gates = [skip_gate.Gate(*pair) for pair in pairs]
        for k, gate in enumerate(gates):  # in graph order, each calibrated on the graph with the earlier gates
            skip_gate.calibrate(model, gate, self.calibration, o.ratio)
            skip_gate.insert_gate(model, gate, k)
        rates = [float(np.mean(np.asarray(g.signals) >= g.threshold)) for g in gates]
        self.stats.update(gates=[{"name": g.name, "threshold": g.threshold, "calibration_skip_rate": r}
                                 for g, r in zip(gates, rates, strict=True)],
                          calibration_skip_rate=float(np.mean(rates)) if rates else 0.0)
        return bool(gates)

    def _adaptive_tokens(self, model: ir.Model, pairs: list[tuple[str, ResidualBlock, ResidualBlock]]) -> bool:
        """A decoder's FFNs under per-token gates, calibrated in graph order (:mod:`effc.passes.skip_token_gate`)."""
        if not pairs:
            return False
        o = self.options
        gates = [skip_token_gate.TokenGate(*pair) for pair in pairs]
        sink = skip_token_gate.sink_tokens(model, o.sinks)
        for k in reversed(range(len(gates))):  # last first: a gate's signal reads the FFN output before it, which
            skip_token_gate.insert_gate(model, gates[k], k, sink)  # the earlier gate's If then takes over
        feeds = type(self.calibration)(list(self.calibration)[:o.samples], self.calibration.source)
        rates = skip_token_gate.calibrate(model, gates, feeds, o.ratio, o.allocate, o.sinks)
        skip_token_gate.add_gates_output(model, gates)
        self.stats.update(gates=[{"name": g.name, "threshold": g.tau, "calibration_skip_rate": round(r, 4)}
                                 for g, r in zip(gates, rates, strict=True)],
                          calibration_skip_rate=round(float(np.mean(rates)), 4), granularity="token")
        logger.info("layer-skip: %d FFNs gated per token, calibration skip rate %.3f", len(gates), np.mean(rates))
        return True

    def _draft(self, model: ir.Model, usable: list[Candidate], influence: list[float] | None,
               feeds: Calibration | None, decoder: bool) -> bool:
        """``mode=draft``: record the layers a draft step skips (:mod:`effc.passes.skip_draft`); weights unchanged."""
        o = self.options
        if not decoder or o.kind != "layer":
            raise PassError("layer-skip(mode=draft) adds a draft entry point that skips whole layers of a decoder",
                            "compile a decoder (e.g. zoo:smollm2-135m) with blocks=layer (the default)")
        fixed = o.count is not None or o.ratio is not None
        counts = [self._limit(len(usable))] if fixed else skip_draft.prefixes(len(usable))
        if not usable or counts[0] < 1:
            raise PassError(f"layer-skip(mode=draft) has no layer to skip ({len(usable)} removable, "
                            f"{counts[0]} asked)", "give count= of at least 1 (mode=report lists the candidates)")
        evaluator = None
        if feeds is not None:
            removals = [[(old.name, new.name) for old, new in c.replacements("keep")] for c in usable]
            evaluator = GatedEvaluator(model, removals, feeds, decoder=True)
        ranked = [c for c, _ in self._select(usable, influence, evaluator if o.rank == "sleb" else None,
                                             limit=max(counts))]
        count, trials = skip_draft.choose(model, ranked, counts, evaluator, {id(c): k for k, c in enumerate(usable)},
                                          o.tokens)
        held = decoder_ir.cache_layers(decoder_ir.decoder_info(model))
        draft = skip_draft.record(model, [held[c.index] for c in ranked[:count]], o.tokens, trials[counts.index(count)])
        self.stats.update(draft={**draft, "layers": [c.name for c in ranked[:count]]}, draft_trials=trials)
        logger.info("layer-skip: the draft skips %d of %d layers (%s)", count, len(held),
                    ", ".join(c.name for c in ranked[:count]))
        return True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Find, rank, remove (or gate); see the class docstring."""
        o = self.options
        decoder = self._check(model)
        pool, found = candidates(model, o.kind)
        self._rewritten = _effc_ops(model)
        skipped, usable = [], []
        attention_blocks = sum(b.kind == "attention" for b in found)
        for cand in pool:
            reason = self._removable(model, cand, attention_blocks)
            if reason is None and o.include and not any(fnmatch.fnmatchcase(cand.name, p) for p in o.include):
                reason = "not matched by include"
            (skipped.append({"name": cand.name, "reason": reason}) if reason else usable.append(cand))
        calib = self.calibration
        feeds = None if calib is None else type(calib)(list(calib)[:o.samples], calib.source)
        influence = block_influence(model, [c.blocks for c in usable], feeds) if feeds and usable else None
        found_stats = []
        for cand in pool:
            entry = {"name": cand.name, "kind": cand.kind, "removable": cand in usable,
                     "weight_bytes": sum(b.weight_bytes() for b in cand.blocks)}
            if influence and cand in usable:
                entry["influence"] = round(influence[usable.index(cand)], 6)
            found_stats.append(entry)
        self.stats = {"mode": o.mode, "blocks_found": {k: sum(b.kind == k for b in found)
                                                         for k in sorted({b.kind for b in found})},
                      "found": found_stats, "skipped": skipped}
        if o.mode == "adaptive":
            return ir.passes.PassResult(model, modified=self._adaptive(model, usable, found))
        if o.mode == "draft":
            return ir.passes.PassResult(model, modified=self._draft(model, usable, influence, feeds, decoder))
        if o.mode == "report" or not usable:
            if not usable and o.mode == "static":
                skipped.append({"name": o.kind, "reason": f"no candidate of kind {o.kind!r} can be removed"})
            return ir.passes.PassResult(model, modified=False)
        evaluator = None
        if feeds is not None:
            removals = [[(old.name, new.name) for old, new in c.replacements(o.norm)] for c in usable]
            evaluator = GatedEvaluator(model, removals, feeds, decoder=decoder, output=o.output)
        chosen = self._select(usable, influence, evaluator)
        self.stats.update(
            metric="perplexity" if decoder else "cosine",
            score_before=None if evaluator is None else evaluator.reference_value,
            score_after=chosen[-1][1] if chosen else None, trials=0 if evaluator is None else evaluator.runs,
            removed=[{"name": c.name, "kind": c.kind, "score_after": s} for c, s in chosen],
            weight_bytes_removed=sum(b.weight_bytes() for c, _ in chosen for b in c.blocks))
        if chosen:
            remove_blocks(model, [c for c, _ in chosen], o.norm)
        logger.info("layer-skip: removed %d of %d candidate(s) (%s)", len(chosen), len(usable),
                    ", ".join(c.name for c, _ in chosen))
        return ir.passes.PassResult(model, modified=bool(chosen))
