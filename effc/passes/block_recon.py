"""Block-wise reconstruction of pruned FFN blocks with the sparsity masks fixed (``reconstruct=block``).

After SparseGPT has chosen the masks and first weights of an FFN block's two MatMuls (layer by layer, each against
its own linear output), the kept weights and the biases of both are optimized jointly, through the activation, so
that the block's output on calibration tokens matches the DENSE model at the same point:

    min_{W1,b1,W2,b2}  ‖f(X_pruned; W1⊙M1, b1, W2⊙M2, b2) − Y_dense‖² / ‖Y_dense‖²  +  λ Σ ‖W − W_sgpt‖² / ‖W_sgpt‖²

* ``X_pruned`` ``(N, K)``: the block input tapped (onnxruntime) from the model pruned so far, so the fit also
  corrects the error that upstream layers left; ``N`` = real (non-padding) calibration tokens.
* ``Y_dense`` ``(N, C)``: the unpruned model's value at the block's output point, by default after the residual add
  and the LayerNormalization that follows it (``point="norm"``), tapped once from a dense copy of the model;
  ``target="local"`` instead uses the dense block applied to ``X_pruned`` (no upstream correction).
* ``M1``, ``M2``: the N:M (or unstructured) masks, fixed: pruned weights stay exactly zero, so the pattern and the
  packed form are unchanged. Unpruned matrices of a block stay as they are.
* λ pulls the weights toward the SparseGPT solution; a held-out split of the calibration sentences (every 5th)
  stops the Adam iterations early and the SparseGPT solution is kept if the fit never improves on that split.

Blocks are processed in graph order; the next block's Hessians and inputs are tapped from the model with this
block already reconstructed. Only the one block being fitted is evaluated in torch (:class:`TorchBlock`, built from
its graph nodes); everything else runs in onnxruntime.

Sources: Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction" (ICLR 2021);
Frantar & Alistarh, "SparseGPT" (2023); Boža, "Fast and Optimal Weight Update for Pruned Large Language Models"
(2024) for the mask-fixed weight update view of pruning reconstruction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import numpy as np
import onnx_ir as ir

from effc.errors import PassError
from effc.ir.calibration import _progress
from effc.passes import sparsegpt as sg
from effc.passes.ffn_blocks import FFNBlock, TorchBlock, find_ffn_blocks
from effc.passes.model_recon import warn_small_calibration
from effc.passes.structured.layers import _token_rows

logger = logging.getLogger(__name__)

RECONSTRUCT = ("true", "false", "block", "model")  # values of the reconstruct option of prune and nm-sparsity
RECONSTRUCT_HELP = ("with calibration: true = SparseGPT updates; block = SparseGPT, then each FFN block's kept "
                    "weights and biases fitted jointly to the dense model's output (masks fixed); model = SparseGPT, "
                    "then all pruned layers' kept weights and biases fitted jointly to the dense model's outputs "
                    "(masks fixed; any graph of ops effc can run in torch, no Conv; on MiniLM it gains less than "
                    "block); block and model want 256+ calibration samples; false = none")
POINTS = ("ffn", "residual", "norm")
SMALL_STEP_MACS = 1 << 26  # forward MACs per step below which the fit runs on one thread
TARGETS = ("dense", "local")


@dataclasses.dataclass(frozen=True)
class BlockReconConfig:
    """Settings of one block fit.

    Attributes:
        point: where the loss compares: ``"norm"`` (after residual + LayerNorm; falls back to the last point the
            block has), ``"residual"`` or ``"ffn"`` (the down projection's biased output).
        target: ``"dense"`` (the unpruned model's tapped value) or ``"local"`` (the dense block on pruned inputs).
        steps: Adam iterations at most (300: the setting that reached cosine 0.967 on MiniLM 2:4 FFN, 488 samples).
        lr: Adam learning rate, relative to each matrix's RMS weight (so units do not matter).
        decay: λ of the pull toward the SparseGPT weights (relative squared distance).
        batch_tokens: tokens per step (all training tokens when fewer).
        eval_every: steps between held-out evaluations (early stopping).
        val_every: every ``val_every``-th calibration sentence is held out for early stopping (0: none).
        seed: minibatch order.
        threads: torch intra-op threads (one when a step is below ``SMALL_STEP_MACS`` forward MACs).

    Raises:
        PassError: a value out of range.
    """

    point: str = "norm"
    target: str = "dense"
    steps: int = 300
    lr: float = 2e-3
    decay: float = 0.0
    batch_tokens: int = 4096
    eval_every: int = 10
    val_every: int = 5
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.point not in POINTS:
            raise PassError(f"block reconstruction point {self.point!r} unknown", f"use one of {', '.join(POINTS)}")
        if self.target not in TARGETS:
            raise PassError(f"block reconstruction target {self.target!r} unknown",
                            f"use one of {', '.join(TARGETS)}")
        if self.steps < 0 or self.lr <= 0 or self.decay < 0 or self.batch_tokens < 1 or self.eval_every < 1:
            raise PassError("block reconstruction settings out of range",
                            "steps ≥ 0, lr > 0, decay ≥ 0, batch_tokens ≥ 1, eval_every ≥ 1")


def normalize_reconstruct(options) -> None:
    """Turn ``reconstruct=True/False`` given through the Python API into ``"true"``/``"false"`` (frozen options).

    Raises:
        PipelineError: a value that is not one of :data:`RECONSTRUCT`.
    """
    if isinstance(options.reconstruct, bool):
        object.__setattr__(options, "reconstruct", "true" if options.reconstruct else "false")
    if options.reconstruct not in RECONSTRUCT:
        options.fail("reconstruct", options.reconstruct,
                     "true (SparseGPT), block (SparseGPT + FFN block fit), model (SparseGPT + whole-model fit) "
                     "or false")


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)


def _point(block: FFNBlock, point: str) -> str:
    """``point`` if the block has it, else the last point it has (``norm`` → ``residual`` → ``ffn``)."""
    chain = POINTS[: POINTS.index(point) + 1]
    for p in reversed(chain):
        try:
            block.output(p)
            return p
        except ValueError:
            continue
    return "ffn"


def _rows(taps: list[np.ndarray], feeds: list[dict], pick: list[int]) -> np.ndarray:
    return np.concatenate([_token_rows(taps[i], feeds[i]) for i in pick]).astype(np.float32)


def fit_block(tblock: TorchBlock, params: dict[str, np.ndarray | None], masks: dict[str, np.ndarray | None],
              train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray] | None, point: str,
              cfg: BlockReconConfig, frozen: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray | None], dict]:
    """Adam on the kept weights and the biases of one block, masks fixed (see the module docstring).

    Args:
        tblock: the block in torch.
        params: ``w1`` ``(K, H)``, ``b1`` ``(H,)``, ``w2`` ``(H, C)``, ``b2`` ``(C,)`` (biases may be None): the
            SparseGPT solution, the start and the anchor of the decay term.
        masks: ``w1``/``w2`` keep-masks (same shapes) for pruned matrices, None for a matrix left dense (frozen).
        train: ``(X (N, K), Y (N, C))`` token rows for fitting.
        val: held-out ``(X, Y)`` rows for early stopping, or None (then the last step is kept).
        point: output point compared (``"ffn"``, ``"residual"``, ``"norm"``).
        cfg: settings.
        frozen: bias names (``"b1"``, ``"b2"``) kept fixed (e.g. shared with other nodes).

    Returns:
        ``(new params, info)``: masked entries stay exactly 0; ``info`` has relative losses before/after on the
        train and held-out rows, the best step and whether the fit was kept.
    """
    n_tok = train[0].shape[0]
    work = min(n_tok, cfg.batch_tokens) * sum(v.size for k, v in params.items() if k.startswith("w"))
    threads = cfg.threads if work >= SMALL_STEP_MACS else 1  # a thread pool only costs on small steps
    with _torch_threads(threads) as torch:
        gen = torch.Generator().manual_seed(cfg.seed)
        anchor = {k: None if v is None else torch.tensor(v) for k, v in params.items()}
        mask = {k: None if v is None else torch.tensor(v.astype(np.float32)) for k, v in masks.items()}
        var = {}
        for k, v in anchor.items():
            trainable = v is not None and k not in frozen and (k.startswith("b") or mask.get(k) is not None)
            var[k] = None if v is None else v.clone().requires_grad_(trainable)
        groups = [{"params": [var[k]], "lr": cfg.lr * float(anchor[k].pow(2).mean().sqrt().clamp_min(1e-8))}
                  for k in var if var[k] is not None and var[k].requires_grad]
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.steps, 1))
        xt, yt = (torch.tensor(a) for a in train)
        xv, yv = (None, None) if val is None else (torch.tensor(a) for a in val)
        norms = {k: float(anchor[k].pow(2).sum()) + 1e-30 for k in ("w1", "w2") if mask.get(k) is not None}

        def weights():
            return {k: (var[k] * mask[k] if mask.get(k) is not None else var[k]) for k in var}

        def loss_on(x, y, w):
            out = tblock.forward(x, w["w1"], w["b1"], w["w2"], w["b2"], point)
            return (out - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-30)

        def evaluate(x, y):
            with torch.no_grad():
                return float(loss_on(x, y, weights()))

        start = {"train": evaluate(xt, yt), "val": None if xv is None else evaluate(xv, yv)}
        best = (start["val"] if xv is not None else np.inf, 0, {k: None if v is None else v.detach().clone()
                                                             for k, v in var.items()})
        n = xt.shape[0]
        for step in range(1, cfg.steps + 1):
            idx = torch.randperm(n, generator=gen)[: cfg.batch_tokens] if n > cfg.batch_tokens else slice(None)
            w = weights()
            loss = loss_on(xt[idx], yt[idx], w)
            if cfg.decay:
                loss = loss + cfg.decay * sum((var[k] - anchor[k]).mul(mask[k]).pow(2).sum() / norms[k] for k in norms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % cfg.eval_every == 0 or step == cfg.steps:
                score = evaluate(xv, yv) if xv is not None else -step
                if score < best[0]:
                    best = (score, step, {k: None if v is None else v.detach().clone() for k, v in var.items()})
        _, best_step, state = best
        var = state
        out = {k: None if v is None else (v * mask[k] if mask.get(k) is not None else v).numpy().astype(np.float32)
               for k, v in var.items()}
        info = {"loss_before": start["train"], "loss_after": evaluate(xt, yt), "val_loss_before": start["val"],
                "val_loss_after": None if xv is None else evaluate(xv, yv), "best_step": best_step,
                "kept": best_step > 0, "train_tokens": int(n), "val_tokens": 0 if xv is None else int(xv.shape[0])}
    return out, info


def _bias(value: ir.Value | None) -> np.ndarray | None:
    """The constant bias array, or None when the block has no bias there."""
    return None if value is None else value.const_value.numpy().astype(np.float32)


def _shared(value: ir.Value | None) -> bool:
    """True when a bias may not change: used by other nodes too, or not an initializer."""
    return value is not None and (len(value.uses()) != 1 or not value.is_initializer())


def _set(value: ir.Value, arr: np.ndarray) -> None:
    value.const_value = ir.tensor(np.ascontiguousarray(arr.astype(np.float32)), name=value.name)


def reconstruct_sequential(model: ir.Model, layers: list, calibration, prune_fn,
                           cfg: BlockReconConfig | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Prune ``layers`` in graph order with ``prune_fn`` and refit every FFN block they belong to.

    Layers outside any FFN block are pruned as by :func:`effc.passes.sparsegpt.prune_sequential`.

    Args:
        model: modified in place.
        layers: ``(node, weight value, transposed)`` tuples (see :func:`effc.passes.sparsegpt.linear_matmuls`).
        calibration: feeds with ``.tap``; required.
        prune_fn: ``(layer, (Cout, Cin) weight, hessian) -> pruned weight`` (SparseGPT: it fixes the masks).
        cfg: fit settings (defaults when None).
        progress: show a progress bar over blocks (stderr TTY only).

    Returns:
        ``(records, info)``: one ``prune_sequential`` record per layer, and ``info`` with ``blocks`` (one dict per
        fitted block: name, point, target, losses, tokens, seconds), ``skipped`` (layers in no block, with the
        reason) and ``seconds``.

    Raises:
        CalibrationError: no calibration data.
    """
    from effc.errors import CalibrationError

    if calibration is None:
        raise CalibrationError("block reconstruction needs calibration data (inputs and dense targets)",
                               "give --data FILE.npz (or a zoo: model with samples), or use reconstruct=true")
    cfg = cfg or BlockReconConfig()
    started = time.perf_counter()
    warn_small_calibration(len(calibration), "block")
    order = {id(nd): i for i, nd in enumerate(model.graph)}
    layers = sorted(layers, key=lambda lay: order[id(lay[0])])
    chosen = {id(lay[0]) for lay in layers}
    blocks, unmatched = find_ffn_blocks(model)
    blocks = [b for b in blocks if id(b.up) in chosen or id(b.down) in chosen]
    in_block = {id(n) for b in blocks for n in (b.up, b.down)}
    reasons = {s["name"]: s["reason"] for s in unmatched}
    skipped = [{"name": lay[0].name, "reason": reasons.get(lay[0].name, "not the up/down MatMul of an FFN block")}
               for lay in layers if id(lay[0]) not in in_block]
    feeds = list(calibration)
    points = {id(b.up): _point(b, cfg.point) for b in blocks}
    targets: dict[int, list[np.ndarray]] = {}
    if cfg.target == "dense" and blocks:
        dense_names = [b.output(points[id(b.up)]).name for b in blocks]
        taps = calibration.tap(model, dense_names, progress=False)  # the model is still dense here
        targets = {id(b.up): taps[name] for b, name in zip(blocks, dense_names, strict=True)}
    dense_w = {id(b.up): {"w1": b.up.inputs[1].const_value.numpy().copy(), "b1": _bias(b.up_bias),
                          "w2": b.down.inputs[1].const_value.numpy().copy(), "b2": _bias(b.down_bias)}
               for b in blocks} if cfg.target == "local" else {}
    last_of = {}
    for b in blocks:
        last = b.down if id(b.down) in chosen else b.up
        last_of[id(last)] = b
    records, fitted, segment = [], [], []
    block_iter = iter(_progress(list(blocks), "block reconstruction", progress))
    for lay in layers:
        segment.append(lay)
        block = last_of.get(id(lay[0]))
        if block is None:
            continue
        records += sg.prune_sequential(model, segment, calibration, prune_fn)
        segment = []
        next(block_iter, None)
        fitted.append(_fit_one(model, block, calibration, feeds, points[id(block.up)], targets.get(id(block.up)),
                               dense_w.get(id(block.up)), chosen, cfg))
    if segment:
        records += sg.prune_sequential(model, segment, calibration, prune_fn)
    for _ in block_iter:  # drain the progress bar
        pass
    info = {"blocks": fitted, "skipped": skipped, "seconds": time.perf_counter() - started,
            "config": dataclasses.asdict(cfg)}
    logger.info("block reconstruction: %d block(s) in %.1f s", len(fitted), info["seconds"])
    if not layers:
        logger.warning("reconstruct=block: no 2-D MatMul/Gemm weight among the pruned layers, so neither SparseGPT "
                       "nor a block fit ran (other layers are pruned by the criterion alone)")
    elif not fitted:  # the layers were still pruned (with SparseGPT); say why no block was refitted
        reasons = sorted({s["reason"] for s in skipped})
        logger.warning("reconstruct=block found no FFN block to refit (SparseGPT only): %s", "; ".join(reasons)[:300])
    return records, info


def _fit_one(model, block: FFNBlock, calibration, feeds, point, dense_taps, dense_w, chosen, cfg) -> dict:
    """Tap the block input from the pruned model, fit, write the weights back; returns the block's info."""
    t0 = time.perf_counter()
    x_taps = calibration.tap(model, [block.x.name], progress=False)[block.x.name]
    params = {"w1": block.up.inputs[1].const_value.numpy().astype(np.float32), "b1": _bias(block.up_bias),
              "w2": block.down.inputs[1].const_value.numpy().astype(np.float32), "b2": _bias(block.down_bias)}
    masks = {"w1": params["w1"] != 0 if id(block.up) in chosen else None,
             "w2": params["w2"] != 0 if id(block.down) in chosen else None}
    tblock = TorchBlock(block)
    every = cfg.val_every if cfg.val_every and len(feeds) >= 2 * cfg.val_every else 0
    val_ids = [i for i in range(len(feeds)) if every and i % every == every - 1]
    train_ids = [i for i in range(len(feeds)) if i not in set(val_ids)]

    def rows(ids):
        x = _rows(x_taps, feeds, ids)
        if dense_taps is not None:
            return x, _rows(dense_taps, feeds, ids)
        import torch

        with _torch_threads(cfg.threads), torch.no_grad():
            d = {k: None if v is None else torch.tensor(v) for k, v in dense_w.items()}
            y = tblock.forward(torch.tensor(x), d["w1"], d["b1"], d["w2"], d["b2"], point).numpy()
        return x, y

    frozen = tuple(k for k, v in (("b1", block.up_bias), ("b2", block.down_bias)) if _shared(v))
    new, info = fit_block(tblock, params, masks, rows(train_ids), rows(val_ids) if val_ids else None, point, cfg,
                          frozen)
    sg.set_weight((block.up, block.up.inputs[1], False), new["w1"].T)
    sg.set_weight((block.down, block.down.inputs[1], False), new["w2"].T)
    for key, value in (("b1", block.up_bias), ("b2", block.down_bias)):
        if new[key] is not None and key not in frozen:
            _set(value, new[key])
    info.update(name=block.name, point=point, target=cfg.target, seconds=time.perf_counter() - t0)
    logger.info("block %s (%s, %s): rel. loss %.4g → %.4g, held-out %s → %s, step %d, %.1f s", block.name, point,
                cfg.target, info["loss_before"], info["loss_after"], info["val_loss_before"],
                info["val_loss_after"], info["best_step"], info["seconds"])
    return info
