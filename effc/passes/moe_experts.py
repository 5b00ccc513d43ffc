"""Carving a dense FFN's neurons into experts, the routers, and the MoE output on token rows (for the ``moe`` pass).

Notation: ``X`` ``(N, K)`` block inputs (calibration tokens), ``A`` ``(N, H)`` the activation the down projection
reads (``act(X·W1 + b1)``, times ``X·W3`` in a gated unit), ``W2`` ``(H, C)``. An expert is a set of neurons
(columns of ``A``); its output on token ``t`` is ``A[t, N_e] · W2[N_e]``.

* :func:`carve`: the ``S`` neurons of largest mean contribution ``E|A_j|·‖W2_j‖`` form the shared expert (CMoE's
  "always active" neurons); the rest are split into ``E`` equal groups by balanced spherical k-means over each
  neuron's co-activation profile ``|A[:, j]|`` (MoEfication's balanced clustering), or over its ``W1`` column when
  no calibration data is given.
* :func:`analytic_router`: from activation statistics only: the logit of expert ``e`` is the mean standardized
  pre-activation of its neurons, ``mean_j ‖W2_j‖ (x·w1_j + b1_j − μ_j) / σ_j`` (a linear map, CMoE-like).
* :func:`trained_router`: ridge least squares from ``[X, 1]`` to each expert's share of the output mass
  ``‖out_e(x) − mean_e‖`` on calibration tokens (MoEfication's router trained to predict an expert's activation
  mass; D2DMoE regresses the output norm).
* :func:`expert_fill`: an unchosen expert contributes its mean output over the tokens that did not choose it
  (MoE++'s constant expert, as a conditional mean).

Sources: Zhang et al., "MoEfication" (2022); Pei et al., "CMoE: Fast Carving of Mixture-of-Experts" (2025);
Szatkowski et al., "Exploiting Activation Sparsity with Dense to Dynamic-k Mixture-of-Experts Conversion" (D2DMoE,
2024); Jin et al., "MoE++" (2024).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from effc.ops.moe import select_experts


@dataclasses.dataclass(frozen=True)
class Carving:
    """Which neurons form which expert.

    Attributes:
        order: ``(H,)`` neuron permutation: shared neurons first, then expert 0's, expert 1's, ...
        shared: ``S``, the shared expert's neuron count.
        experts: ``E``.
        expert_size: ``He`` (``H = S + E·He``).
        method: ``"co-activation"`` (calibration activations) or ``"weight"`` (``W1`` columns, no data).
    """

    order: np.ndarray
    shared: int
    experts: int
    expert_size: int
    method: str

    def groups(self) -> list[np.ndarray]:
        """Positions (in the permuted order) of each routed expert's neurons."""
        return [np.arange(self.shared + e * self.expert_size, self.shared + (e + 1) * self.expert_size)
                for e in range(self.experts)]


def balanced_assign(sim: np.ndarray, capacity: int) -> np.ndarray:
    """Greedy balanced assignment: pairs ``(item, group)`` by descending ``sim`` ``(n, E)``, ``capacity`` per group.

    Returns:
        ``(n,)`` group labels; every group receives exactly ``capacity`` items (``n = E·capacity``).
    """
    n, groups = sim.shape
    labels, load = np.full(n, -1), np.zeros(groups, int)
    for flat in np.argsort(-sim, axis=None, kind="stable"):
        item, group = divmod(int(flat), groups)
        if labels[item] < 0 and load[group] < capacity:
            labels[item], load[group] = group, load[group] + 1
    return labels


def balanced_kmeans(features: np.ndarray, groups: int, seed: int = 0, iterations: int = 15) -> np.ndarray:
    """Spherical k-means with equal cluster sizes on the rows of ``features`` ``(n, d)``; ``n`` divisible by groups.

    Returns:
        ``(n,)`` labels in ``[0, groups)``, ``n / groups`` of each.
    """
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centroids = f[rng.choice(len(f), groups, replace=False)]
    labels = np.full(len(f), -1)
    for _ in range(iterations):
        new = balanced_assign(f @ centroids.T, len(f) // groups)
        if np.array_equal(new, labels):
            break
        labels = new
        centroids = np.stack([f[labels == g].mean(0) for g in range(groups)])
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return labels


#: Routed expert sizes are multiples of this many neurons (vector width of the MoE kernel's weight panels).
SIZE_MULTIPLE = 8


def expert_size(h: int, experts: int, shared: float) -> int:
    """Neurons per routed expert when ``h`` neurons form a ``shared`` fraction plus ``experts`` equal experts.

    The equal share is rounded down to a multiple of :data:`SIZE_MULTIPLE` (of 2 below it); 0 or 1 means the
    split is impossible (the caller refuses it).
    """
    size = (h - int(round(shared * h))) // experts
    return size // SIZE_MULTIPLE * SIZE_MULTIPLE if size >= SIZE_MULTIPLE else size // 2 * 2


def carve(w1: np.ndarray, w2: np.ndarray, acts: np.ndarray | None, experts: int, shared: float,
          seed: int = 0) -> Carving:
    """Split the ``H`` neurons into a shared expert and ``experts`` equal routed experts (module docstring).

    Args:
        w1: ``(K, H)`` up projection.
        w2: ``(H, C)`` down projection.
        acts: ``(N, H)`` calibration activations, or None (weight clustering).
        experts: ``E`` routed experts.
        shared: fraction of neurons in the shared expert, in [0, 1); the neurons that do not fill a routed
            expert join the shared expert too. A routed expert's size is rounded down to a multiple of
            :data:`SIZE_MULTIPLE` (or of 2 when smaller): the kernel's weight panels are vectors of that width.
        seed: k-means initialization.

    Returns:
        The carving.
    """
    h = w1.shape[1]
    size = expert_size(h, experts, shared)
    n_shared = h - experts * size
    w2n = np.linalg.norm(w2, axis=1)
    score = (np.abs(acts).mean(0) if acts is not None else np.linalg.norm(w1, axis=0)) * w2n
    by_score = np.argsort(-score, kind="stable")
    shared_idx, routed = np.sort(by_score[:n_shared]), np.sort(by_score[n_shared:])
    if acts is not None:
        features, method = np.abs(acts[:, routed]).T, "co-activation"
    else:
        features, method = w1[:, routed].T, "weight"
    labels = balanced_kmeans(features, experts, seed) if experts > 1 else np.zeros(len(routed), int)
    order = np.concatenate([shared_idx, *(routed[labels == e] for e in range(experts))])
    return Carving(order, n_shared, experts, size, method)


def expert_outputs(acts: np.ndarray, w2: np.ndarray, carving: Carving) -> np.ndarray:
    """``(E, N, C)`` outputs of each routed expert on the token rows (``acts``/``w2`` in the permuted order)."""
    return np.stack([acts[:, g] @ w2[g] for g in carving.groups()])


def expert_fill(outputs: np.ndarray | None, chosen: np.ndarray | None, experts: int, c: int) -> np.ndarray:
    """``(E, C)`` conditional mean: each expert's mean output over the calibration tokens that did NOT choose it.

    Args:
        outputs: ``(E, N, C)`` expert outputs (None: no data, zeros).
        chosen: ``(N, E)`` bool, the router's choice on the same tokens.
        experts: ``E``.
        c: ``C``.

    An expert with a few huge outputs (the massive activations of a [CLS] / first token) has a large plain mean
    that would be added to every ordinary token not choosing it; the conditional mean avoids that. An expert every
    token chose gets zeros.
    """
    if outputs is None:
        return np.zeros((experts, c), np.float32)
    off = (~chosen).T.astype(np.float64)  # (E, N)
    sums = np.einsum("en,enc->ec", off, outputs)
    return (sums / np.maximum(off.sum(1, keepdims=True), 1.0)).astype(np.float32)


def analytic_router(x: np.ndarray | None, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
                    carving: Carving) -> tuple[np.ndarray, np.ndarray]:
    """Router ``(K, E)``, ``(E,)`` from pre-activation statistics (``x`` None: weight norms, zero means).

    ``w1``/``b1``/``w2`` in the permuted neuron order.
    """
    if x is not None:
        pre = x @ w1 + b1
        mu, sigma = pre.mean(0), pre.std(0) + 1e-6
    else:
        mu, sigma = np.zeros_like(b1), np.linalg.norm(w1, axis=0) + 1e-6
    scale = np.linalg.norm(w2, axis=1) / sigma
    wr = np.stack([(w1[:, g] * scale[g]).mean(1) for g in carving.groups()], axis=1)
    br = np.array([((b1[g] - mu[g]) * scale[g]).mean() for g in carving.groups()])
    return wr.astype(np.float32), br.astype(np.float32)


def trained_router(x: np.ndarray, outputs: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares from ``[X, 1]`` to each expert's share of the token's output mass.

    Args:
        x: ``(N, K)`` token rows.
        outputs: ``(E, N, C)`` expert outputs on them.
        ridge: relative to the mean diagonal of ``XᵀX`` (the bias is not penalized).

    The target of token ``t`` is ``‖out_e(t) − m_e‖ / Σ_f ‖out_f(t) − m_f‖`` (``m_e`` the expert's mean output):
    only the ranking of experts within a token matters, and shares keep a few massive tokens from dominating the fit.

    Returns:
        The router ``(K, E)``, ``(E,)``.
    """
    mass = np.linalg.norm(outputs - outputs.mean(1, keepdims=True), axis=2).T  # (N, E)
    mass = mass / np.maximum(mass.sum(1, keepdims=True), 1e-30)
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1).astype(np.float64)
    gram = xa.T @ xa
    reg = ridge * np.trace(gram[:-1, :-1]) / max(x.shape[1], 1) * np.eye(len(gram))
    reg[-1, -1] = 0.0
    sol = np.linalg.solve(gram + reg, xa.T @ mass.astype(np.float64))
    return sol[:-1].astype(np.float32), sol[-1].astype(np.float32)


def with_zero_experts(router: tuple[np.ndarray, np.ndarray], x: np.ndarray | None, top_k: int, kinds: tuple,
                      share: float) -> tuple[np.ndarray, np.ndarray]:
    """The router extended by ``len(kinds)`` zero-computation experts (MoE++) with one constant logit ``τ``.

    A token spends a routed slot on a zero-computation expert where its ``k``-th best routed logit is below ``τ``
    (at most one slot per zero-computation expert). ``τ`` is set by bisection so that on the token rows ``x`` a
    ``share`` of all routed slots goes to them; without data ``τ`` is one below the lowest routed logit bias.

    Args:
        router: ``(K, E)``, ``(E,)``.
        x: ``(N, K)`` calibration token rows, or None.
        top_k: ``k``.
        kinds: the zero-computation experts' kinds.
        share: target fraction in [0, 1) of routed slots taken by them.

    Returns:
        The router ``(K, E + Z)``, ``(E + Z,)``.
    """
    w, b = router
    z = len(kinds)
    if not z:
        return router
    if x is None:
        tau = float(b.min()) - 1.0
    else:
        logits = np.sort(x @ w + b, axis=1)[:, ::-1][:, :top_k]  # each token's top-k routed logits, descending
        floor = top_k - min(z, top_k)  # routed slots a token keeps whatever tau is

        def taken(t: float) -> float:
            kept = np.maximum((logits > t).sum(1), floor)
            return float(np.mean(top_k - kept)) / top_k

        lo, hi = float(logits.min()) - 1.0, float(logits.max()) + 1.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if taken(mid) < share else (lo, mid)
        tau = hi
    return (np.concatenate([w, np.zeros((w.shape[0], z), w.dtype)], axis=1),
            np.concatenate([b, np.full(z, tau, b.dtype)]).astype(np.float32))


def zero_rows(x: np.ndarray, picked: np.ndarray, experts: int, kinds: tuple, values: np.ndarray | None) -> np.ndarray:
    """``(N, C)`` what the chosen zero-computation experts add (``picked`` ``(N, E + Z)``), zeros without them."""
    if not kinds:
        return 0.0
    zc = picked[:, experts:].astype(np.float32)
    copy = np.array([[k == "copy"] for k in kinds], np.float32)
    return zc @ values + (zc @ copy) * x


def moe_rows(x: np.ndarray, acts: np.ndarray, w2: np.ndarray, b2: np.ndarray, fill: np.ndarray,
             router: tuple[np.ndarray, np.ndarray], carving: Carving, top_k: int, kinds: tuple = (),
             zero_values: np.ndarray | None = None) -> np.ndarray:
    """MoE FFN output ``(N, C)`` on token rows with precomputed activations (the operator's semantics)."""
    picked = select_experts(x @ router[0] + router[1], top_k)
    chosen = picked[:, :carving.experts].astype(np.float32)
    mask = np.concatenate([np.ones((len(x), carving.shared), np.float32),
                           np.repeat(chosen, carving.expert_size, axis=1)], axis=1)
    return (acts * mask) @ w2 + b2 + (1.0 - chosen) @ fill + zero_rows(x, picked, carving.experts, kinds,
                                                                       zero_values)


def relative_error(y: np.ndarray, ref: np.ndarray, b2: np.ndarray) -> float:
    """Mean over tokens of ``‖y_t − ref_t‖² / ‖ref_t − b2‖²`` (``(N, C)`` rows).

    The error relative to what the FFN's neurons contribute to each token; per token, so that a few massive tokens
    do not hide the error on all the others.
    """
    return float(np.mean(np.sum((y - ref) ** 2, 1) / np.maximum(np.sum((ref - b2) ** 2, 1), 1e-30)))
