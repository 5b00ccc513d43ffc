"""Pruning numerics shared by ``prune`` and ``nm-sparsity``: masks, Wanda scores, SparseGPT reconstruction.

Layout used throughout this module: a weight ``W`` of shape ``(Cout, Cin)`` (output rows, reduction columns), i.e.
the transpose of an ONNX ``MatMul`` weight ``(Cin, Cout)``. N:M groups run along the reduction axis ``Cin``: every
``m`` consecutive input columns of one output row keep ``n`` weights. Vector-wise N:M (``vector=V > 1``) shares the
kept pattern of a group between ``V`` adjacent output rows (the layout a SIMD kernel can use).

Sources:
    * Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (2023):
      OBS row updates with the inverse Hessian ``H = XᵀX + λI`` processed column block by column block, the mask
      (unstructured or N:M) chosen inside the sweep from ``w² / [H⁻¹]ᵢᵢ²``.
    * Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda, 2023):
      score ``|W| · ‖X_j‖₂`` per input column, compared within each output row.
    * Mishra et al., "Accelerating Sparse Deep Neural Networks" (NVIDIA ASP, 2021): 2:4 along the reduction axis.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

from effc.errors import PassError
from effc.ops.nm_sparse import check_nm
from effc.passes.structured.layers import (  # noqa: F401  (re-exported: the layer helpers predate that module)
    get_weight,
    input_statistics,
    layer_kind,
    linear_matmuls,
    prune_sequential,
    select_layers,
    set_weight,
)

logger = logging.getLogger(__name__)


def nm_mask(scores: np.ndarray, n: int, m: int, vector: int = 1) -> np.ndarray:
    """Keep-mask with the ``n`` highest-scoring of every ``m`` consecutive inputs.

    Args:
        scores: ``(Cout, Cin)`` non-negative importance (``|W|``, Wanda ``|W|·‖X‖``, or OBS saliency).
        n: weights kept per group.
        m: group length along the reduction axis ``Cin``.
        vector: number of adjacent output rows sharing one pattern (their scores are summed).

    Returns:
        ``(Cout, Cin)`` boolean mask, True where the weight is kept.

    Raises:
        PassError: shapes that do not divide (see :func:`check_nm`).
    """
    cout, cin = scores.shape
    check_nm(n, m, vector, scores.shape)
    grouped = scores.reshape(cout // vector, vector, cin // m, m).sum(axis=1)  # (Cout/V, G, M)
    order = np.argsort(-grouped, axis=-1, kind="stable")[..., :n]
    keep = np.zeros_like(grouped, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.repeat(keep[:, None], vector, axis=1).reshape(cout, cin)


def unstructured_mask(scores: np.ndarray, sparsity: float, per_row: bool = True) -> np.ndarray:
    """Keep-mask dropping the fraction ``sparsity`` of lowest scores, per output row (Wanda) or per layer."""
    cout, cin = scores.shape
    if per_row:
        k = int(cin * sparsity)
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
        keep = np.ones_like(scores, dtype=bool)
        np.put_along_axis(keep, order, False, axis=1)
        return keep
    k = int(scores.size * sparsity)
    flat = np.argsort(scores, axis=None, kind="stable")[:k]
    keep = np.ones(scores.size, dtype=bool)
    keep[flat] = False
    return keep.reshape(cout, cin)


def importance(weight: np.ndarray, act_sq: np.ndarray | None, method: str) -> np.ndarray:
    """Score ``(Cout, Cin)``: ``|W|`` (magnitude) or ``|W|·‖X_j‖₂`` (Wanda; ``act_sq`` = Σ x_j² per input)."""
    if method == "magnitude" or act_sq is None:
        return np.abs(weight)
    if method == "wanda":
        return np.abs(weight) * np.sqrt(act_sq)[None, :]
    raise PassError(f"unknown pruning criterion {method!r}", "use method=magnitude or method=wanda")


def sparsegpt(
    weight: np.ndarray,
    hessian: np.ndarray,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    vector: int = 1,
    blocksize: int = 128,
    damp: float = 0.01,
) -> np.ndarray:
    """Prune ``weight`` and update the kept weights to minimise ``‖(W - Ŵ) Xᵀ‖²`` (SparseGPT).

    Args:
        weight: ``(Cout, Cin)`` float weights.
        hessian: ``(Cin, Cin)`` ``XᵀX`` accumulated over calibration rows (any positive scale).
        sparsity: fraction of weights removed in [0, 1) (unstructured; chosen per column block) — or give n, m.
        n: kept weights per group of ``m`` along ``Cin`` (N:M); the mask is chosen when the sweep reaches a group.
        m: group length.
        vector: output rows sharing an N:M pattern (their saliencies are summed).
        blocksize: columns per lazy-update block (a multiple of m).
        damp: dampening λ as a fraction of the mean diagonal of ``H``.

    Returns:
        ``(Cout, Cin)`` float32 weights with exact zeros where pruned (N:M patterns hold exactly).

    Raises:
        PassError: neither ``sparsity`` nor ``n, m`` given, or N:M shapes that do not divide.
    """
    w = weight.astype(np.float64).copy()
    cout, cin = w.shape
    nm = n is not None and m is not None
    if not nm and sparsity is None:
        raise PassError("sparsegpt needs sparsity or n and m", "pass sparsity=0.5 or n=2, m=4")
    if nm:
        check_nm(n, m, vector, w.shape)
        blocksize = max(m, blocksize // m * m)
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(cin)] += damp * np.mean(np.diag(h))
    hinv = _upper_cholesky_of_inverse(h)
    for i1 in range(0, cin, blocksize):
        i2 = min(i1 + blocksize, cin)
        w1 = w[:, i1:i2].copy()
        hinv1 = hinv[i1:i2, i1:i2]
        d = np.diag(hinv1)
        err1 = np.zeros_like(w1)
        if nm:
            prune = np.zeros_like(w1, dtype=bool)
        else:
            sal = w1**2 / d[None, :] ** 2
            prune = ~unstructured_mask(sal, sparsity, per_row=True)
        for i in range(i2 - i1):
            if nm and i % m == 0:
                sal = w1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2
                prune[:, i : i + m] = ~nm_mask(sal, n, m, vector)
            col = w1[:, i]
            q = np.where(prune[:, i], 0.0, col)
            e = (col - q) / d[i]
            w1[:, i:] -= np.outer(e, hinv1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.astype(np.float32)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of ``H⁻¹`` (SparseGPT's numerically stable form), raising damping if needed."""
    eye = np.eye(h.shape[0])
    extra = 0.0
    for _ in range(6):
        try:
            low = scipy.linalg.cholesky(h + extra * eye, lower=True)
            inv = scipy.linalg.solve_triangular(low, eye, lower=True)
            return scipy.linalg.cholesky(inv.T @ inv, lower=False)
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-3 * float(np.mean(np.diag(h))))
            logger.debug("Hessian not positive definite, dampening by %g", extra)
    raise PassError("calibration Hessian is singular even after dampening", "use more calibration samples")


def prune_weight(
    weight: np.ndarray,
    *,
    method: str,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    vector: int = 1,
    hessian: np.ndarray | None = None,
    act_sq: np.ndarray | None = None,
    reconstruct: bool = False,
    perm: np.ndarray | None = None,
) -> np.ndarray:
    """Prune one ``(Cout, Cin)`` weight by magnitude/Wanda, or by SparseGPT when ``reconstruct`` and ``hessian``.

    Args:
        weight: ``(Cout, Cin)``.
        method: ``"magnitude"`` or ``"wanda"`` (mask criterion without reconstruction).
        sparsity: unstructured fraction removed, or None for N:M.
        n: N:M kept count (with ``m``).
        m: N:M group length along ``Cin``.
        vector: rows sharing an N:M pattern.
        hessian: ``(Cin, Cin)`` ``XᵀX``; its diagonal also gives Wanda's ``Σx²``.
        act_sq: ``(Cin,)`` ``Σx²`` per input (used when no Hessian is given).
        reconstruct: run SparseGPT (needs ``hessian``).
        perm: optional input-channel order; groups are formed over ``weight[:, perm]`` (exact: the packed indices
            point at original inputs).

    Returns:
        ``(Cout, Cin)`` float32 pruned (and possibly updated) weights in the original column order.
    """
    if hessian is not None and act_sq is None:
        act_sq = np.diag(hessian).copy()
    w = weight if perm is None else weight[:, perm]
    h = None if hessian is None or perm is None else hessian[np.ix_(perm, perm)]
    h = hessian if perm is None else h
    a = act_sq if (act_sq is None or perm is None) else act_sq[perm]
    if reconstruct and h is not None:
        out = sparsegpt(w, h, sparsity=sparsity, n=n, m=m, vector=vector)
    else:
        scores = importance(w, a, method)
        keep = nm_mask(scores, n, m, vector) if sparsity is None else unstructured_mask(scores, sparsity)
        out = np.where(keep, w, 0.0).astype(np.float32)
    if perm is not None:
        restored = np.empty_like(out)
        restored[:, perm] = out
        out = restored
    return out


def reconstruct_weight_layers(model, layers: list, calibration, sparsity: float, block: bool = False,
                              stats: dict | None = None) -> tuple[dict, list]:
    """SparseGPT for ``prune(reconstruct=true|block)``: prune the 2-D MatMul/Gemm layers, return the others untouched.

    Args:
        model: the model, modified in place.
        layers: :class:`effc.passes.prune.WeightLayer` records chosen by ``prune``.
        calibration: feeds with ``.tap``; required.
        sparsity: fraction removed per layer (the OBS saliency picks the mask inside the sweep).
        block: after SparseGPT, refit each FFN block's kept weights jointly (:mod:`effc.passes.block_recon`).
        stats: with ``block``, receives ``"block_reconstruction"`` (per-block losses and times).

    Returns:
        ``(report, rest)``: per weight name ``{"node", "shared_by", "params", "zeroed", "sparsity", "reconstructed",
        "rel_output_error"}``
        and the layers SparseGPT does not handle (Conv, N-D or shared weights), for the plain criterion.

    Raises:
        CalibrationError: no calibration data.
    """
    from effc.errors import CalibrationError

    if calibration is None:
        raise CalibrationError("prune(reconstruct=true) needs calibration data for the Hessian XᵀX",
                               "give --data FILE.npz (or a zoo: model with samples), or drop reconstruct=true")
    mine, rest = [], []
    for layer in layers:
        shape = layer.weight.const_value.shape
        ok = layer.kind in ("MatMul", "Gemm") and len(shape) == 2 and len(layer.nodes) == 1
        ok = ok and layer.weight.const_value is not None and layer.weight.is_initializer()
        if ok and layer.kind == "Gemm" and layer.nodes[0].attributes.get_int("transA", 0):
            ok = False
        (mine if ok else rest).append(layer)
    tuples = [(lay.nodes[0], lay.weight, lay.kind == "Gemm" and lay.out_axis == 0) for lay in mine]
    fn = lambda layer, w, h: sparsegpt(w, h, sparsity=sparsity)  # noqa: E731
    if block:
        from effc.passes.block_recon import reconstruct_sequential

        records, info = reconstruct_sequential(model, tuples, calibration, fn)
        if stats is not None:
            stats["block_reconstruction"] = info
    else:
        records = prune_sequential(model, tuples, calibration, fn)
    by_node = {r["name"]: r for r in records}
    report = {}
    for lay in mine:
        rec = by_node[lay.nodes[0].name]
        params = int(np.prod(rec["shape"]))
        zeroed = params - int(round(rec["kept"] * params))
        report[lay.weight.name] = {"node": lay.nodes[0].name, "shared_by": 1, "params": params, "zeroed": zeroed,
                                   "sparsity": zeroed / params, "reconstructed": True,
                                   "rel_output_error": rec.get("rel_output_error")}
    return report, rest
