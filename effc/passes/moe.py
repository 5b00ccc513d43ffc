"""``moe``: dense FFN → mixture of experts (``effc.MoEFFN``), experts carved from calibration activations.

Each FFN block found by :func:`effc.passes.ffn_blocks.find_ffn_blocks` (``MatMul → act → MatMul`` with GELU / ReLU /
SiLU, or a gated unit ``act(x·Wg) ⊙ x·Wu``) is replaced by one ``effc.MoEFFN`` node (:mod:`effc.ops.moe`):

1. the block input is tapped on the calibration feeds (one onnxruntime run of the dense model for all blocks) and the
   activations ``A`` are computed from it;
2. its neurons are carved into a shared expert and ``experts`` equal routed experts
   (:func:`~effc.passes.moe_experts.carve`: balanced co-activation clustering, or weight clustering without data);
3. the router is ``analytic`` (activation statistics) or ``trained`` (ridge regression on each expert's share of the
   output mass);
   both are scored on held-out calibration tokens and the scores are reported;
4. ``fill=true`` gives every unchosen expert its mean output over the calibration tokens that did not choose it (a
   constant expert);
5. ``refit=true`` (the default with calibration data) refits the down projection, ``b2`` and the fill rows in
   closed form against the dense FFN's outputs (routing fixed, :func:`~effc.passes.moe_recover.refit_down`);
6. ``recover=N`` then runs N Adam steps of local distillation per FFN on every expert weight
   (:func:`~effc.passes.moe_recover.recover`).

``sequential=G`` fits the FFNs in ``G`` consecutive groups: a group's inputs are tapped on the model with the earlier
groups already rewritten (one more onnxruntime pass over the calibration feeds per group), so its carving, router and
refit see the inputs it will get at inference (sequential calibration, as GPTQ and SparseGPT do layer by layer).
``G = 1``: every FFN from the dense model's inputs. (Fitting instead to the dense FFN's outputs on the dense inputs
measured worse on MiniLM-L6 and a synthetic 3-FFN chain.)

Stats per layer (``layers``): activation, carving method, shared / expert sizes, active fraction, held-out relative
FFN error of both routers before any refit (``error_trained``, ``error_analytic``: mean per-token
``‖Δ‖² / ‖FFN output − b2‖²``) and of the rewritten FFN (``error_final``),
FFN MACs and float32 weight bytes per token (``macs_dense``/``macs_moe``, ``bytes_dense``/``bytes_moe``), recovery
refit and recovery losses and seconds; overall ``ffn_mac_fraction``, ``ffn_weight_bytes_fraction``,
``recovery_seconds`` (refit and recovery together).

Sources: Zhang et al., "MoEfication" (2022); Pei et al., "CMoE" (2025); Zhao et al., "FactorLLM" (2024); Jin et al.,
"MoE++" (2024).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time

import numpy as np
import onnx_ir as ir

from effc.errors import PassError
from effc.ops.moe import ACTIVATIONS, INPUTS, ZERO_KINDS, MoELayout, add_moe_ffn, select_experts, weight_bytes_per_token
from effc.passes import moe_experts as mx
from effc.passes.base import EffcPass, PassOptions, register_pass
from effc.passes.ffn_blocks import FFNBlock, TorchBlock, find_ffn_blocks
from effc.passes.moe_recover import recover, refit_down
from effc.passes.rewrite import replace_value
from effc.passes.structured.layers import _token_rows

logger = logging.getLogger(__name__)

ROUTERS = ("trained", "analytic")
LOOKED_FOR = ("an FFN block: MatMul(x, W1) [+ b1] → element-wise activation (GELU, ReLU, SiLU; or gated "
              "act(x·Wg) ⊙ x·Wu) → MatMul(·, W2) [+ b2], constant 2-D weights")


@dataclasses.dataclass(frozen=True)
class MoEOptions(PassOptions):
    """Options of ``moe``."""

    experts: int = dataclasses.field(default=8, metadata={"help": "routed experts per FFN"})
    top_k: int = dataclasses.field(default=2, metadata={"help": "routed experts chosen per token"})
    shared: float = dataclasses.field(default=0.0, metadata={"help": "fraction of neurons in the always-on expert"})
    router: str = dataclasses.field(default="trained", metadata={"help": "trained | analytic",
                                                                  "choices": ROUTERS})
    fill: bool = dataclasses.field(default=True, metadata={"help": "unchosen experts add their mean output"})
    refit: bool = dataclasses.field(default=True, metadata={"help": "least-squares refit of W2, b2 and fill on "
                                                                   "calibration tokens (closed form, seconds)"})
    recover: int = dataclasses.field(default=0, metadata={"help": "Adam steps of local distillation per FFN"})
    zero_experts: tuple[str, ...] = dataclasses.field(default=(), metadata={
        "help": "MoE++ zero-computation experts the router may choose, kinds zero | const | copy ([zero,const])"})
    zero_share: float = dataclasses.field(default=0.25, metadata={
        "help": "fraction of routed slots the zero-computation experts take on calibration tokens"})
    layers: str = dataclasses.field(default="all", metadata={"help": "all | block indices or up-MatMul name "
                                                                     "patterns, |-separated (0|2|*layer.5*)"})
    max_tokens: int = dataclasses.field(default=8192, metadata={"help": "calibration tokens used per FFN"})
    sequential: int = dataclasses.field(default=1, metadata={
        "help": "groups of FFNs calibrated on the inputs the earlier rewritten groups produce (1: dense inputs)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "clustering and minibatch seed"})

    def validate(self) -> None:
        """Raises: PipelineError: a value out of range."""
        if self.experts < 1:
            self.fail("experts", self.experts, "a positive integer")
        if not 1 <= self.top_k <= self.experts:
            self.fail("top_k", self.top_k, f"an integer in [1, experts={self.experts}]")
        if not 0.0 <= self.shared < 1.0:
            self.fail("shared", self.shared, "a fraction in [0, 1)")
        if self.router not in ROUTERS:
            self.fail("router", self.router, " or ".join(ROUTERS))
        bad = [z for z in self.zero_experts if z not in ZERO_KINDS]
        if bad:
            self.fail("zero_experts", ",".join(bad), " / ".join(ZERO_KINDS))
        if not 0.0 <= self.zero_share < 1.0:
            self.fail("zero_share", self.zero_share, "a fraction in [0, 1)")
        if self.sequential < 1:
            self.fail("sequential", self.sequential, "a positive integer (groups of FFNs)")
        if self.recover < 0 or self.max_tokens < 16:
            self.fail("recover" if self.recover < 0 else "max_tokens", min(self.recover, self.max_tokens),
                      "recover >= 0 and max_tokens >= 16")


def _array(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None else value.const_value.numpy().astype(np.float32)


def activation_kind(block: FFNBlock, w3: np.ndarray | None) -> str | None:
    """The :data:`~effc.ops.moe.ACTIVATIONS` key the block's activation sub-graph computes (probed), or None."""
    import torch

    rng = np.random.default_rng(0)
    k, h = block.up.inputs[1].const_value.shape
    pre = (rng.standard_normal((32, h)) * 3).astype(np.float32)
    x = rng.standard_normal((32, k)).astype(np.float32)
    with torch.no_grad():
        got = TorchBlock(block).activation(torch.from_numpy(pre), torch.from_numpy(x)).numpy()
    gate = x @ w3 if w3 is not None else 1.0
    for name, fn in ACTIVATIONS.items():
        if np.allclose(got, fn(pre) * gate, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(got).max()))):
            return name
    return None


def select_blocks(blocks: list[FFNBlock], layers: str) -> list[tuple[int, FFNBlock]]:
    """``(index, block)`` chosen by ``layers`` (``all``, or ``|``-separated indices / fnmatch name patterns).

    Raises:
        PassError: a pattern that matches no block.
    """
    if layers == "all":
        return list(enumerate(blocks))
    pats = [p.strip() for p in layers.split("|") if p.strip()]
    chosen = [(i, b) for i, b in enumerate(blocks)
              if any(p == str(i) or fnmatch.fnmatch(b.up.name or "", p) for p in pats)]
    if not chosen:
        names = ", ".join(f"{i}: {b.up.name}" for i, b in enumerate(blocks[:4]))
        raise PassError(f"moe(layers={layers!r}) matches no FFN block", f"use all, indices or names like {names}")
    return chosen


def _rows(taps: list[np.ndarray], feeds: list[dict], ids: list[int], cap: int, rng) -> np.ndarray | None:
    if not ids:
        return None
    x = np.concatenate([_token_rows(taps[i], feeds[i]) for i in ids]).astype(np.float32)
    return x[np.sort(rng.choice(len(x), cap, replace=False))] if len(x) > cap else x


def _rewrite(model: ir.Model, block: FFNBlock, arrays: dict[str, np.ndarray | None], layout: MoELayout) -> None:
    """Replace the block's nodes by one ``effc.MoEFFN`` reading the block input and writing its FFN output."""
    base = block.up.name or block.up.outputs[0].name
    weights = {}
    for key in INPUTS[1:]:
        if arrays.get(key) is None:
            weights[key] = None
            continue
        name = f"{base}.moe_{key}"
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(arrays[key]), name=name))
        value.shape, value.type = value.const_value.shape, ir.TensorType(value.const_value.dtype)
        model.graph.register_initializer(value)
        weights[key] = value
    node = add_moe_ffn(model, block.x, weights, layout, f"{base}/moe")
    node.metadata_props["effc.pass"] = "moe"
    out = block.out
    old = [block.up, *([block.act_in.producer()] if block.up_bias is not None else []), *block.act,
           *([block.gate_linear] if block.gate_linear is not None else []), block.down]
    if out.producer() is not block.down:
        old.append(out.producer())
    new_out = node.outputs[0]
    new_out.name, new_out.shape, new_out.type = out.name + "_moe", out.shape, out.type
    model.graph.insert_after(out.producer(), node)
    name = out.name
    replace_value(model.graph, out, new_out)
    # the dense weights, collected before ``remove`` detaches the nodes' inputs
    read = {id(v): v for nd in old for v in nd.inputs if v is not None}.values()
    model.graph.remove(old, safe=True)
    new_out.name = name
    for value in read:
        if value.is_initializer() and not value.uses():
            del model.graph.initializers[value.name]


@register_pass
class MoEFFNPass(EffcPass):
    """Turn dense FFN blocks into ``effc.MoEFFN`` (module docstring); lossy unless ``top_k = experts``.

    Raises:
        PassError: the model has no FFN block (the message names what was looked for), or ``layers`` matches none.
    """

    name = "moe"
    summary = "dense FFN -> mixture of experts (shared + routed experts, top-k router) as effc.MoEFFN"
    Options = MoEOptions
    exact = False
    uses_calibration = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Carve, route, optionally recover and rewrite every chosen FFN block; see the module docstring."""
        o = self.options
        blocks, unmatched = find_ffn_blocks(model)
        if not blocks:
            reasons = ("; ".join(f"{s['name']}: {s['reason']}" for s in unmatched[:3])
                       or "no MatMul with a constant 2-D weight")
            raise PassError(f"moe found no FFN block; it looks for {LOOKED_FOR} ({reasons})",
                            "the model has no transformer-style FFN to split; drop moe from the pipeline")
        chosen = select_blocks(blocks, o.layers)
        cal, rng = self.calibration, np.random.default_rng(o.seed)
        feeds = list(cal) if cal is not None else []
        if cal is None and (o.router == "trained" or o.recover):
            logger.warning("moe: no calibration data: weight clustering, analytic router, no fill, no recovery")
        val_ids = [i for i in range(len(feeds)) if len(feeds) >= 10 and i % 5 == 4]
        train_ids = [i for i in range(len(feeds)) if i not in set(val_ids)]
        records, skipped = [], [{"name": s["name"], "reason": s["reason"]} for s in unmatched]
        groups = np.array_split(np.arange(len(chosen)), min(o.sequential, len(chosen)) if cal is not None else 1)
        taps, tap_seconds = {}, 0.0
        for members in groups:
            if cal is not None:  # the inputs this group gets once the earlier groups are rewritten
                t0 = time.perf_counter()
                taps = cal.tap(model, list(dict.fromkeys(chosen[i][1].x.name for i in members)), progress=False)
                tap_seconds += time.perf_counter() - t0
            for index, block in (chosen[i] for i in members):
                xs = (None, None) if not taps else (
                    _rows(taps[block.x.name], feeds, train_ids, o.max_tokens, rng),
                    _rows(taps[block.x.name], feeds, val_ids, max(o.max_tokens // 4, 16), rng))
                found = self._one(model, block, xs)
                if isinstance(found, str):
                    skipped.append({"name": block.name, "reason": found})
                else:
                    records.append({"index": index, **found})
        dense, dense_bytes = (sum(r[key] for r in records) for key in ("macs_dense", "bytes_dense"))
        self.stats.update(layers=records, skipped=skipped, experts=o.experts, top_k=o.top_k,
                          ffn_mac_fraction=sum(r["macs_moe"] for r in records) / dense if dense else None,
                          ffn_weight_bytes_fraction=(sum(r["bytes_moe"] for r in records) / dense_bytes
                                                     if dense_bytes else None),
                          recovery_seconds=round(sum((r[key] or {}).get("seconds", 0.0) for r in records
                                                     for key in ("refit", "recovery")), 2),
                          calibration_taps=len(groups) if cal is not None else 0, tap_seconds=round(tap_seconds, 2),
                          calibration_tokens=0 if xs[0] is None else int(len(xs[0])), sequential=len(groups))
        logger.info("moe: %d FFN(s) rewritten, %d skipped", len(records), len(skipped))
        return ir.passes.PassResult(model, modified=bool(records))

    def _one(self, model: ir.Model, block: FFNBlock, xs) -> dict | str:
        """Rewrite one block; returns its stats record, or the reason it was left dense."""
        o, (x, xv) = self.options, xs
        w1, w2 = _array(block.up.inputs[1]), _array(block.down.inputs[1])
        w3 = _array(block.gate_linear.inputs[1]) if block.gate_linear is not None else None
        (k, h), c = w1.shape, w2.shape[1]
        b1 = _array(block.up_bias) if block.up_bias is not None else np.zeros(h, np.float32)
        b2 = _array(block.down_bias) if block.down_bias is not None else np.zeros(c, np.float32)
        kind = activation_kind(block, w3)
        if kind is None:
            return f"activation is none of {', '.join(ACTIVATIONS)} (probed numerically)"
        if mx.expert_size(h, o.experts, o.shared) < 2:
            return (f"{h} neurons cannot form {o.experts} experts of 2 or more neurons next to a {o.shared:.0%} "
                    "shared expert")

        def acts(rows, w1, b1, w3):
            a = ACTIVATIONS[kind](rows @ w1 + b1)
            return a * (rows @ w3) if w3 is not None else a

        a = acts(x, w1, b1, w3) if x is not None else None
        carving = mx.carve(w1, w2, a, o.experts, o.shared, o.seed)
        perm = carving.order
        w1, b1, w2 = w1[:, perm], b1[perm], w2[perm]
        w3 = w3[:, perm] if w3 is not None else None
        a = a[:, perm] if a is not None else None
        outs = mx.expert_outputs(a, w2, carving) if a is not None else None
        zk = o.zero_experts
        routers = {"analytic": mx.analytic_router(x, w1, b1, w2, carving)}
        if x is not None:
            routers["trained"] = mx.trained_router(x, outs)
        routers = {name: mx.with_zero_experts(r, x, o.top_k, zk, o.zero_share) for name, r in routers.items()}
        zero_values = np.zeros((len(zk), c), np.float32) if zk else None

        def chosen_of(rows, r):
            return select_experts(rows @ r[0] + r[1], o.top_k)

        fills = {name: mx.expert_fill(outs if o.fill else None, None if x is None else
                                      chosen_of(x, r)[:, :o.experts], o.experts, c)
                 for name, r in routers.items()}
        router = o.router if o.router in routers else "analytic"
        av = acts(xv, w1, b1, w3) if xv is not None else None  # the permuted weights: neurons in the MoE layout
        held_out = {}
        if xv is not None:
            ref = av @ w2 + b2
            held_out = {name: mx.relative_error(mx.moe_rows(xv, av, w2, b2, fills[name], r, carving, o.top_k, zk,
                                                            zero_values), ref, b2) for name, r in routers.items()}
        layout = MoELayout(k, c, carving.shared, o.experts, carving.expert_size, o.top_k, w3 is not None, kind, zk)
        arrays = {"router_w": routers[router][0], "router_b": routers[router][1], "W1": w1, "b1": b1, "W3": w3,
                  "W2": w2, "b2": b2, "fill": fills[router], "zero_values": zero_values}
        route = (arrays["router_w"], arrays["router_b"])
        refit = recovery = None
        if o.refit and x is not None:
            arrays, refit = self._refit(arrays, carving, (x, a), (xv, av) if xv is not None else None, (w2, b2))
        if o.recover and x is not None:
            arrays, recovery = self._recover(arrays, kind, carving, x, xv, o, (w1, b1, w3, w2, b2))
        final = zero_share = None
        if xv is not None:
            final = mx.relative_error(mx.moe_rows(xv, acts(xv, arrays["W1"], arrays["b1"], arrays["W3"]),
                                                  arrays["W2"], arrays["b2"], arrays["fill"], route, carving,
                                                  o.top_k, zk, arrays["zero_values"]), av @ w2 + b2, b2)
        if x is not None:  # measured on the calibration rows (held-out rows when there are)
            zero_share = float(chosen_of(xv if xv is not None else x, route)[:, o.experts:].sum(1).mean() / o.top_k)
        _rewrite(model, block, arrays, layout)
        g = 2 if w3 is not None else 1
        routed_he = carving.expert_size * o.top_k * (1.0 - (zero_share or 0.0))
        return {"name": block.name, "activation": kind, "gated": w3 is not None, "hidden": h,
                "shared": carving.shared, "expert_size": carving.expert_size, "carving": carving.method,
                "router": router, "active_fraction": layout.active / h, "zero_experts": list(zk),
                "zero_slot_share": zero_share, "active_fraction_measured": (carving.shared + routed_he) / h,
                "error_trained": held_out.get("trained"), "error_analytic": held_out.get("analytic"),
                "error_final": final, "refit": refit,
                "macs_dense": h * (k * g + c), "macs_moe": k * layout.routes + layout.active * (k * g + c),
                "bytes_dense": 4 * (h * (k * g + 1 + c) + c), "bytes_moe": weight_bytes_per_token(layout),
                "recovery": recovery}

    def _refit(self, arrays: dict, carving: mx.Carving, train: tuple, val: tuple | None, dense: tuple):
        """Closed-form refit of ``W2``, ``b2``, fill and zero-expert constants; returns (arrays, info).

        ``train`` / ``val``: ``(X rows, activations)`` in the MoE neuron order; ``dense`` = ``(W2, b2)``.
        """
        o, zk = self.options, self.options.zero_experts
        w2, b2 = dense
        copy_only = tuple("copy" if z == "copy" else "zero" for z in zk)
        const = np.array([z == "const" for z in zk], np.float32)

        def rows(xr, ar):  # (A, chosen routed, dense output less the fixed copy experts, chosen const experts)
            picked = select_experts(xr @ arrays["router_w"] + arrays["router_b"], o.top_k)
            copy = mx.zero_rows(xr, picked, o.experts, copy_only, arrays["zero_values"])
            return ar, picked[:, :o.experts].astype(np.float32), ar @ w2 + b2 - copy, picked[:, o.experts:] * const

        prior = {"w2": w2, "b2": b2, "fill": arrays["fill"], "zero_values": arrays["zero_values"]}
        fitted, info = refit_down(prior, carving.shared, carving.expert_size, rows(*train),
                                  rows(*val) if val is not None else None, fill=o.fill)
        return {**arrays, "W2": fitted["w2"], "b2": fitted["b2"], "fill": fitted["fill"],
                "zero_values": fitted["zero_values"]}, info

    @staticmethod
    def _recover(arrays: dict, kind: str, carving: mx.Carving, x: np.ndarray, xv: np.ndarray | None, o: MoEOptions,
                 dense: tuple):
        """Local distillation of one MoE FFN against the dense FFN; returns (arrays, info).

        ``dense`` = ``(W1, b1, W3, W2, b2)`` in the MoE neuron order; routing fixed.
        """
        t0 = time.perf_counter()
        w1, b1, w3, w2, b2 = dense

        def split(rows):
            a = ACTIVATIONS[kind](rows @ w1 + b1)
            a = a * (rows @ w3) if w3 is not None else a
            picked = select_experts(rows @ arrays["router_w"] + arrays["router_b"], o.top_k)
            zc = mx.zero_rows(rows, picked, o.experts, o.zero_experts, arrays["zero_values"])  # kept fixed
            return rows, picked[:, :o.experts].astype(np.float32), a @ w2 + b2 - zc

        def neuron_mask(chosen):
            return np.concatenate([np.ones((len(chosen), carving.shared), np.float32),
                                   np.repeat(chosen, carving.expert_size, axis=1)], axis=1)

        params = {"w1": arrays["W1"], "b1": arrays["b1"], "w3": arrays["W3"], "w2": arrays["W2"],
                  "b2": arrays["b2"], "fill": arrays["fill"]}
        fitted, info = recover(params, kind, neuron_mask, split(x), split(xv) if xv is not None else None,
                               o.recover, seed=o.seed)
        info["seconds"] = round(time.perf_counter() - t0, 2)
        return {**arrays, "W1": fitted["w1"], "b1": fitted["b1"], "W3": fitted["w3"], "W2": fitted["w2"],
                "b2": fitted["b2"], "fill": fitted["fill"]}, info
