"""Recovery of a carved MoE FFN: local distillation against the dense FFN, routing fixed (``moe(recover=N)``).

The experts' weights, biases and fill rows of one rewritten FFN are fitted with Adam so that, on calibration
tokens, the MoE output matches the dense FFN's output on the same inputs::

    min  mean_t ‖moe(x_t; W1, b1, W3, W2, b2, fill | R) − y_t‖² / ‖y_t − b2‖²

* ``X`` ``(N, K)``: block inputs tapped from the dense model; ``Y`` ``(N, C)``: the dense FFN on them. The error is
  relative per token, so the few tokens with massive activations do not decide the fit alone.
* ``R`` ``(N, E)``: the router's choice per token, computed once and kept fixed (top-k is not differentiable; the
  expert shapes and the neuron layout do not change), so the fit teaches the chosen experts (and the fill of the
  unchosen ones) to cover what the skipped neurons did.
* A held-out split (every 5th calibration sample) stops the iterations early; if the fit never improves on it the
  carved weights are kept.

The same idea as ``reconstruct=block`` (:mod:`effc.passes.block_recon`): only the one block is evaluated in torch.

Source: Li et al., "BRECQ" (ICLR 2021) for block-wise reconstruction; FactorLLM (Zhao et al., 2024) for
distilling a factorized FFN from the dense one.
"""

from __future__ import annotations

import time

import numpy as np

from effc.passes.block_recon import SMALL_STEP_MACS, _torch_threads

TORCH_ACTIVATIONS = {
    "gelu": lambda F, t: F.gelu(t),
    "gelu_tanh": lambda F, t: F.gelu(t, approximate="tanh"),
    "relu": lambda F, t: F.relu(t),
    "silu": lambda F, t: F.silu(t),
}


def recover(params: dict[str, np.ndarray | None], activation: str, neuron_mask, train: tuple, val: tuple | None,
            steps: int, lr: float = 2e-3, batch_tokens: int = 2048, seed: int = 0,
            threads: int = 2) -> tuple[dict, dict]:
    """Adam on one MoE FFN's weights with routing fixed (module docstring).

    Args:
        params: ``w1`` ``(K, H)``, ``b1`` ``(H,)``, ``w3`` ``(K, H)`` or None, ``w2`` ``(H, C)``, ``b2`` ``(C,)``,
            ``fill`` ``(E, C)``, neurons in the MoE layout (shared first).
        activation: a key of :data:`TORCH_ACTIVATIONS`.
        neuron_mask: ``fn(chosen (N, E) float) -> (N, H)`` neuron mask (shared neurons 1).
        train: ``(X (N, K), chosen (N, E) float32, Y (N, C))`` rows to fit on.
        val: held-out rows of the same form, or None (then the last step is kept).
        steps: Adam iterations.
        lr: learning rate relative to each tensor's RMS value.
        batch_tokens: tokens per step.
        seed: minibatch order.
        threads: torch threads (one when a step is below ``SMALL_STEP_MACS`` forward MACs).

    Returns:
        ``(params, info)``: fitted arrays (same keys) and ``{"loss_before", "loss_after", "val_loss_before",
        "val_loss_after", "best_step", "seconds", "train_tokens"}`` (mean per-token relative squared errors).
    """
    work = min(len(train[0]), batch_tokens) * sum(v.size for k, v in params.items()
                                                  if k.startswith("w") and v is not None)
    with _torch_threads(threads if work >= SMALL_STEP_MACS else 1):
        return _fit(params, activation, neuron_mask, train, val, steps, lr, batch_tokens, seed)


def _fit(params, activation, neuron_mask, train, val, steps, lr, batch_tokens, seed) -> tuple[dict, dict]:
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    var = {k: None if v is None else torch.tensor(v, dtype=torch.float32).requires_grad_(True)
           for k, v in params.items()}
    groups = [{"params": [v], "lr": lr * float(v.detach().pow(2).mean().sqrt().clamp_min(1e-6))}
              for v in var.values() if v is not None]
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    act = TORCH_ACTIVATIONS[activation]

    def rows(split):
        x, chosen, y = (torch.tensor(np.asarray(a, np.float32)) for a in split)
        return x, chosen, torch.tensor(neuron_mask(chosen.numpy())), y

    def loss_on(x, chosen, mask, y):
        a = act(F, x @ var["w1"] + var["b1"])
        if var["w3"] is not None:
            a = a * (x @ var["w3"])
        out = (a * mask) @ var["w2"] + var["b2"] + (1.0 - chosen) @ var["fill"]
        # per token, as effc.passes.moe_experts.relative_error: massive tokens ([CLS]) must not swamp the others
        return ((out - y).pow(2).sum(1) / (y - var["b2"].detach()).pow(2).sum(1).clamp_min(1e-30)).mean()

    def evaluate(split):
        with torch.no_grad():
            return float(loss_on(*split))

    tr = rows(train)
    vr = rows(val) if val is not None else None
    start = {"train": evaluate(tr), "val": evaluate(vr) if vr is not None else None}
    snapshot = lambda: {k: None if v is None else v.detach().clone() for k, v in var.items()}  # noqa: E731
    best = (start["val"] if vr is not None else np.inf, 0, snapshot())
    n = tr[0].shape[0]
    for step in range(1, steps + 1):
        idx = torch.randperm(n, generator=gen)[:batch_tokens] if n > batch_tokens else slice(None)
        loss = loss_on(*(t[idx] for t in tr))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == steps:
            score = evaluate(vr) if vr is not None else -step
            if score < best[0]:
                best = (score, step, snapshot())
    _, best_step, state = best
    with torch.no_grad():
        for k, v in state.items():
            if v is not None:
                var[k].copy_(v)
    out = {k: None if v is None else v.detach().numpy().astype(np.float32) for k, v in var.items()}
    info = {"loss_before": start["train"], "loss_after": evaluate(tr), "val_loss_before": start["val"],
            "val_loss_after": evaluate(vr) if vr is not None else None, "best_step": best_step,
            "seconds": round(time.perf_counter() - t0, 2), "train_tokens": int(n)}
    return out, info
