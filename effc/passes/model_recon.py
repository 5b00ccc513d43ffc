"""Model-level reconstruction of pruned layers with the sparsity masks fixed (``reconstruct=model``).

Layer-wise (SparseGPT) and block-wise (:mod:`effc.passes.block_recon`) reconstruction each match one local output;
the errors they leave still add up over the depth of the network. This stage fits the kept weights and the biases
of ALL pruned layers jointly so that the pruned model's outputs match the dense model's on calibration feeds
(knowledge distillation from the unpruned model, with the masks frozen):

    min_{W_l, b_l}  Σ_feeds Σ_outputs ‖y(x; W⊙M, b) − y_dense(x)‖² / ‖y_dense(x)‖²

* ``y_dense``: the unpruned model's outputs, run by onnxruntime before any weight changes.
* Rows of an output whose leading axes equal the feed's ``attention_mask`` shape (a transformer's ``(batch, seq)``)
  are compared at real tokens only (padding never reaches a masked-mean-pooled output).
* Gradients come from :class:`effc.ir.torch_graph.TorchGraph`, which evaluates the canonical graph in torch.
* Pruned weights stay exactly zero: the N:M / unstructured pattern and the packed form are unchanged.
* Every ``val_every``-th feed is held out; the weights at the epoch with the lowest held-out loss are kept (the
  starting weights if no epoch improves on them).

Sources: Hinton et al., "Distilling the Knowledge in a Neural Network" (2015); Kurtic et al., "Sparse Fine-tuning
for Inference Acceleration of Large Language Models" (2023) for distillation of a sparse student from its dense
parent with the masks fixed.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import onnx_ir as ir

from effc.errors import CalibrationError, PassError
from effc.ir.calibration import _progress

logger = logging.getLogger(__name__)


#: Calibration samples below which a reconstruction fit is warned about (it generalizes poorly): on MiniLM 2:4 FFN,
#: reconstruct=block gave embedding cosine 0.931 with 64 samples and 0.967 with 488 (docs/BENCHMARKS.md).
FEW_SAMPLES = 128


def warn_small_calibration(n: int, mode: str) -> None:
    """Log a warning when ``n`` calibration samples are too few for the ``reconstruct=mode`` fit."""
    if n < FEW_SAMPLES:
        logger.warning("reconstruct=%s fits many weights from only %d calibration sample(s); below %d distinct "
                       "samples the fit generalizes poorly: raise --calibration-samples (256-512 is a good range)",
                       mode, n, FEW_SAMPLES)


@dataclasses.dataclass(frozen=True)
class ModelReconConfig:
    """Settings of the model-level fit.

    Attributes:
        epochs: passes over the training feeds at most.
        lr: Adam learning rate, relative to each tensor's RMS value (so units do not matter).
        batch: feeds per Adam step.
        val_every: every ``val_every``-th calibration feed is held out for choosing the epoch (0: none).
        seed: feed order.
        threads: torch intra-op threads.

    Raises:
        PassError: a value out of range.
    """

    epochs: int = 4
    lr: float = 5e-4
    batch: int = 8
    val_every: int = 5
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch < 1 or self.val_every < 0:
            raise PassError("model reconstruction settings out of range",
                            "epochs ≥ 0, lr > 0, batch ≥ 1, val_every ≥ 0")


def layer_bias(node: ir.Node) -> ir.Value | None:
    """The constant bias of a linear node that only this node uses, or None.

    ``Gemm``: its ``C`` input. ``MatMul``: the constant 1-D operand of the single ``Add`` consuming its output.
    """
    if node.op_type == "Gemm":
        c = node.inputs[2] if len(node.inputs) > 2 else None
        return c if c is not None and c.is_initializer() and len(c.uses()) == 1 else None
    users = list(node.outputs[0].uses())
    if len(users) != 1 or users[0].node.op_type != "Add":
        return None
    for v in users[0].node.inputs:
        if v is not node.outputs[0] and v is not None and v.is_initializer() and v.const_value is not None \
                and len(v.const_value.shape) == 1 and len(v.uses()) == 1:
            return v
    return None


def dense_outputs(model: ir.Model, calibration) -> list[list[np.ndarray]]:
    """The model's outputs on every calibration feed (onnxruntime), in graph-output order."""
    from effc.ir.reference import Reference

    ref = Reference(model)
    return [ref.run(feed) for feed in calibration]


def _loss(torch, outputs: dict, targets: list, names: list[str], feed: dict):
    total = 0.0
    mask = feed.get("attention_mask")
    count = 0
    for name, target in zip(names, targets, strict=True):
        y = outputs[name]
        if not y.is_floating_point():
            continue
        t = torch.from_numpy(np.asarray(target, dtype=np.float32))
        if mask is not None and tuple(np.shape(mask)) == tuple(y.shape[:-1]):
            keep = torch.from_numpy(np.asarray(mask) != 0)
            y, t = y[keep], t[keep]
        total = total + (y - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
        count += 1
    return total / max(count, 1)


def fit_model(model: ir.Model, weights: list[ir.Value], calibration, targets: list[list[np.ndarray]],
              cfg: ModelReconConfig | None = None, progress: bool = True) -> dict:
    """Adam on the kept entries of ``weights`` and their biases against ``targets``; writes the result into ``model``.

    Args:
        model: the pruned model, modified in place (weights and biases only; the graph is unchanged).
        weights: initializer values of the pruned layers (any layout; the mask is their non-zero pattern).
        calibration: the feeds ``targets`` were computed on.
        targets: :func:`dense_outputs` of the unpruned model on the same feeds.
        cfg: settings (defaults when None).
        progress: rich progress bar over the steps (stderr TTY only).

    Returns:
        ``{"loss_before", "loss_after", "val_loss_before", "val_loss_after", "best_epoch", "kept", "train_feeds",
        "val_feeds", "tensors", "seconds"}`` (relative squared errors, averaged over feeds).

    Raises:
        PassError: the graph has an op the torch evaluator lacks (named), or nothing to fit.
    """
    from effc.ir.torch_graph import TorchGraph

    cfg = cfg or ModelReconConfig()
    started = time.perf_counter()
    feeds = list(calibration)
    warn_small_calibration(len(feeds), "model")
    if len(feeds) != len(targets):
        raise PassError("model reconstruction: targets do not match the calibration feeds",
                        "compute the targets with dense_outputs() on the same calibration data")
    graph = TorchGraph(model)
    names = graph.outputs
    weights = [w for w in weights if w.const_value is not None and w.const_value.dtype == ir.DataType.FLOAT]
    if not weights:
        raise PassError("model reconstruction: no float32 weight to fit", "prune float32 MatMul/Gemm weights first")
    biases = [b for b in (layer_bias(n) for n in _producers(model, weights)) if b is not None]
    import torch

    before_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        init = {v.name: torch.from_numpy(np.array(v.const_value.numpy(), dtype=np.float32)) for v in weights + biases}
        mask = {v.name: (init[v.name] != 0).float() for v in weights}
        var = {k: t.clone().requires_grad_(True) for k, t in init.items()}
        opt = torch.optim.Adam([{"params": [var[k]], "lr": cfg.lr * float(init[k].pow(2).mean().sqrt().clamp_min(1e-8))}
                                for k in var])
        every = cfg.val_every if cfg.val_every and len(feeds) >= 2 * cfg.val_every else 0
        val_ids = [i for i in range(len(feeds)) if every and i % every == every - 1]
        train_ids = [i for i in range(len(feeds)) if i not in set(val_ids)]
        steps_per_epoch = -(-len(train_ids) // cfg.batch)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.epochs * steps_per_epoch, 1))

        def current():
            return {k: var[k] * mask[k] if k in mask else var[k] for k in var}

        def mean_loss(ids):
            if not ids:
                return None
            with torch.no_grad():
                w = current()
                return float(np.mean([float(_loss(torch, graph.run(feeds[i], w), targets[i], names, feeds[i]))
                                      for i in ids]))

        logger.info("model reconstruction: %d tensor(s), %d training / %d held-out feed(s), %d epoch(s) of %d "
                    "step(s); each feed runs forward and backward once per epoch", len(var), len(train_ids),
                    len(val_ids), cfg.epochs, steps_per_epoch)
        start_train, start_val = mean_loss(train_ids), mean_loss(val_ids)
        best = (start_val if val_ids else np.inf, 0, {k: v.detach().clone() for k, v in var.items()})
        gen = np.random.default_rng(cfg.seed)
        plan = [(epoch, train_ids_batch) for epoch in range(1, cfg.epochs + 1)
                for train_ids_batch in np.array_split(gen.permutation(train_ids), steps_per_epoch)]
        for k, (epoch, batch) in enumerate(_progress(plan, "model reconstruction", progress)):
            opt.zero_grad(set_to_none=True)
            for i in batch:
                out = graph.run(feeds[int(i)], current())
                (_loss(torch, out, targets[int(i)], names, feeds[int(i)]) / len(batch)).backward()
            opt.step()
            sched.step()
            if k + 1 == len(plan) or plan[k + 1][0] != epoch:
                score = mean_loss(val_ids) if val_ids else -epoch
                logger.info("model reconstruction epoch %d/%d: held-out rel. loss %.4g (start %.4g), %.0f s",
                            epoch, cfg.epochs, score, start_val if val_ids else float("nan"),
                            time.perf_counter() - started)
                if score < best[0]:
                    best = (score, epoch, {k2: v.detach().clone() for k2, v in var.items()})
        _, best_epoch, state = best
        var = state
        end = current()
        for v in weights + biases:
            v.const_value = ir.tensor(np.ascontiguousarray(end[v.name].detach().numpy().astype(np.float32)),
                                      name=v.name)
        info = {"loss_before": start_train, "loss_after": mean_loss(train_ids), "val_loss_before": start_val,
                "val_loss_after": mean_loss(val_ids), "best_epoch": best_epoch, "kept": best_epoch > 0,
                "train_feeds": len(train_ids), "val_feeds": len(val_ids), "tensors": len(var),
                "config": dataclasses.asdict(cfg), "seconds": time.perf_counter() - started}
    finally:
        torch.set_num_threads(before_threads)
    logger.info("model reconstruction: rel. loss %.4g → %.4g, held-out %.4g → %.4g, epoch %d kept, %.1f s",
                info["loss_before"], info["loss_after"], _nan(info["val_loss_before"]), _nan(info["val_loss_after"]),
                info["best_epoch"], info["seconds"])
    return info


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _producers(model: ir.Model, weights: list[ir.Value]) -> list[ir.Node]:
    """The linear nodes (MatMul / Gemm) consuming each weight."""
    wanted = {id(w) for w in weights}
    return [nd for nd in model.graph if nd.op_type in ("MatMul", "Gemm") and any(id(v) in wanted for v in nd.inputs)]


def check_model_fit(model: ir.Model, calibration) -> None:
    """Refuse ``reconstruct=model`` up front: no calibration data, or ops the torch evaluator lacks.

    Raises:
        CalibrationError: no calibration data.
        PassError: unsupported op types (named).
    """
    from effc.ir.torch_graph import check_supported

    if calibration is None:
        raise CalibrationError("reconstruct=model needs calibration data (inputs and the dense model's outputs)",
                               "give --data FILE.npz (or a zoo: model with samples), or use reconstruct=true")
    missing = check_supported(model)
    if missing:
        raise PassError(f"reconstruct=model evaluates the graph in torch, which lacks op(s) {', '.join(missing)}",
                        "use reconstruct=true (SparseGPT on 2-D MatMul/Gemm weights; other layers are pruned by the "
                        "criterion alone) or reconstruct=false")
