"""Recovery of a carved MoE FFN against the dense FFN, routing fixed (``moe(refit=true)``, ``moe(recover=N)``).

Two fits, both on calibration tokens with the router's choice ``R`` ``(N, E)`` computed once and kept fixed (top-k
is not differentiable; the expert shapes and the neuron layout do not change), so they teach the chosen experts
(and the fill of the unchosen ones) to cover what the skipped neurons did:

* :func:`refit_down` (``refit``): closed-form weighted least squares of the down projection ``W2``, ``b2`` and the
  ``fill`` rows with the up projections fixed. The MoE output is linear in them::

      y_t ≈ [a_t ⊙ m_t, 1, 1 − R_t] · [W2; b2; fill]        (a_t: activations, m_t: the token's neuron mask)

  solved once per FFN from the ``(H + 1 + E)²`` Gram matrix (seconds for SmolLM2's 1,545 features), with a ridge
  that pulls toward the carved weights (so ``top_k = E`` keeps the dense weights, and a feature no calibration
  token exercised keeps its carved value) whose strength is chosen on held-out tokens.
* :func:`recover` (``recover=N``): N Adam steps on every expert weight (``W1``, ``b1``, ``W3``, ``W2``, ``b2``,
  ``fill``) — slower (each step is a forward and backward pass of the whole FFN on a minibatch).

Both minimize the same per-token relative error ``mean_t ‖moe(x_t) − y_t‖² / ‖y_t − b2‖²`` (``y_t`` the dense FFN
on the same input), so the few tokens with massive activations do not decide the fit alone. A held-out split
(every 5th calibration sample) picks the ridge and stops the Adam iterations; if a fit never improves on it the
previous weights are kept.

The same idea as ``reconstruct=block`` (:mod:`effc.passes.block_recon`): only the one block is evaluated.

Source: Li et al., "BRECQ" (ICLR 2021) for block-wise reconstruction; FactorLLM (Zhao et al., 2024) for
distilling a factorized FFN from the dense one; the least-squares refit of the layer after a pruned one follows
"Fluctuation-based Adaptive Structured Pruning" (An et al., AAAI 2024, bias compensation) and SparseGPT's
closed-form weight update (Frantar & Alistarh, 2023).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

from effc.passes.block_recon import SMALL_STEP_MACS, _torch_threads

#: Ridge strengths tried by :func:`refit_down`, relative to each feature's own Gram diagonal.
RIDGES = (3e-3, 3e-2, 0.3, 3.0)


def _features(rows: tuple, shared: int, expert_size: int, fill: bool) -> np.ndarray:
    """``(N, H + 1 + E + Z)`` float64 regressors ``[a ⊙ m, 1, 1 − R, Z_const]`` of ``[W2; b2; fill; zero_values]``.

    ``Z_const`` (``rows[3]``, ``(N, Z)``, when given) marks the chosen zero-computation experts. The fill columns
    are zero when the fill is not fitted: those rows then keep their prior.
    """
    acts, chosen = rows[0], rows[1]
    mask = np.repeat(chosen, expert_size, axis=1)
    routed = acts[:, shared:] * mask
    extra = [rows[3]] if len(rows) > 3 and rows[3] is not None and rows[3].size else []
    return np.concatenate([acts[:, :shared], routed, np.ones((len(acts), 1)), (1.0 - chosen) * float(fill), *extra],
                          axis=1, dtype=np.float64)


def refit_down(prior: dict[str, np.ndarray], shared: int, expert_size: int, train: tuple, val: tuple | None,
               fill: bool = True, ridges: tuple[float, ...] = RIDGES) -> tuple[dict, dict]:
    """Closed-form refit of ``W2``, ``b2`` and ``fill`` with the routing and up projections fixed (module docstring).

    Args:
        prior: ``w2`` ``(H, C)``, ``b2`` ``(C,)``, ``fill`` ``(E, C)`` of the carved FFN (MoE neuron layout:
            ``shared`` neurons first, then ``expert_size`` per routed expert), ``zero_values`` ``(Z, C)`` or None.
        shared: ``S``.
        expert_size: ``He``.
        train: ``(A (N, H) activations, chosen (N, E) float, Y (N, C) targets[, Z (N, Z) float])`` to fit on:
            ``Y`` the dense FFN's outputs less what fixed zero-computation experts add, ``Z`` the chosen
            zero-computation experts whose constants are fitted (zero columns for the others).
        val: held-out rows of the same form choosing the ridge (None: the smallest of ``ridges`` above 0.01).
        fill: fit the fill rows too (False: they keep the prior's values).
        ridges: ridge strengths relative to each regressor's weighted Gram diagonal; the penalty is
            ``λ Σ_j G_jj ‖W_j − prior_j‖²``.

    Returns:
        ``(params, info)``: ``w2``/``b2``/``fill``/``zero_values`` float32 and ``{"ridge", "val_loss_before",
        "val_loss_after", "loss_before", "loss_after", "seconds", "train_tokens"}``; the prior comes back
        unchanged when no ridge improves the held-out loss.
    """
    t0 = time.perf_counter()
    b2_ref = prior["b2"].astype(np.float64)
    zv = prior.get("zero_values")
    zv = np.zeros((0, prior["b2"].shape[0])) if zv is None else zv
    stack = np.concatenate([prior["w2"], prior["b2"][None], prior["fill"], zv]).astype(np.float64)

    def loss(rows, weights) -> float:  # float32 products: only compared between candidates
        f = _features(rows, shared, expert_size, fill).astype(np.float32)
        y = rows[2].astype(np.float32)
        err = np.sum((f @ weights.astype(np.float32) - y) ** 2, 1, dtype=np.float64)
        return float(np.mean(err / np.maximum(np.sum((y - b2_ref) ** 2, 1), 1e-30)))

    f = _features(train, shared, expert_size, fill).astype(np.float32)
    y = train[2].astype(np.float32)
    raw = 1.0 / np.maximum(np.sum((y.astype(np.float64) - b2_ref) ** 2, 1), 1e-30)  # per-token relative error
    fw = f * (raw / raw.mean()).astype(np.float32)[:, None]
    # the Gram by float32 BLAS (twice the speed of float64), solved in float64
    gram, rhs = (fw.T @ f).astype(np.float64), (fw.T @ y).astype(np.float64)
    yy = float(np.sum((raw / raw.mean()) * np.sum(y.astype(np.float64) ** 2, 1)))
    del f, fw

    def train_loss(weights) -> float:  # from the Gram: Σ_t w_t ‖f_t·W − y_t‖² = tr(WᵀGW) − 2 tr(Wᵀ rhs) + Σ w_t ‖y_t‖²
        total = float(np.sum(weights * (gram @ weights)) - 2.0 * np.sum(weights * rhs) + yy)
        return max(total, 0.0) * float(raw.mean()) / len(y)

    diag = np.diag(gram).copy() + 1e-9 * float(np.mean(np.diag(gram)))
    candidates = {0.0: stack}
    for lam in ridges:
        reg = lam * diag
        factor = scipy.linalg.cho_factor(gram + np.diag(reg), overwrite_a=True, check_finite=False)
        candidates[lam] = scipy.linalg.cho_solve(factor, rhs + reg[:, None] * stack, check_finite=False)
    if val is not None:
        scores = {lam: loss(val, sol) for lam, sol in candidates.items()}
        best = min(scores, key=scores.get)
    else:
        scores, best = {}, min((lam for lam in ridges if lam >= 1e-2), default=ridges[-1])
    sol = candidates[best]
    h, e = prior["w2"].shape[0], prior["fill"].shape[0]
    out = {"w2": sol[:h].astype(np.float32), "b2": sol[h].astype(np.float32), "fill": sol[h + 1:h + 1 + e]
           .astype(np.float32), "zero_values": sol[h + 1 + e:].astype(np.float32) if prior.get("zero_values")
           is not None else None}
    info = {"ridge": best, "val_loss_before": scores.get(0.0), "val_loss_after": scores.get(best),
            "loss_before": train_loss(stack), "loss_after": train_loss(sol),
            "seconds": round(time.perf_counter() - t0, 2), "train_tokens": int(len(train[0]))}
    return out, info


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
