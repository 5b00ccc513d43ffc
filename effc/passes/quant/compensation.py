"""Error compensation for low-bit block formats: GPTQ-style sequential update and LoRC low-rank correction.

Both work on a weight in the ``(N, K)`` layout (one row per output channel, blocks of ``block_size`` along the
reduction axis K, which is the axis GPTQ walks).

* GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", Frantar et al.
  2023, algorithm 1 with lazy batch updates): with the calibration Hessian ``H = 2 XᵀX`` (``X`` of shape
  ``(tokens, K)``), quantize column ``k``, then push its error ``(w_k - q_k) / [H⁻¹]_kk`` onto the columns not yet
  quantized through the upper Cholesky factor of ``H⁻¹``. A block's shared scale is fixed when GPTQ reaches the
  block's first column, from the already-updated weights (the "groupwise" variant). Weights that are exactly zero
  on entry (pruned by an earlier pass) stay zero: they are "quantized" to 0 and their accumulated update is pushed
  onto the kept weights like any rounding error (the OBS treatment of a pruned weight, as in SparseGPT), so the
  sparsity pattern survives exactly and the error feedback only changes kept weights.
* LoRC ("ZeroQuant-FP: A Leap Forward in LLMs Post-Training W4A8 Quantization Using Floating-Point Formats",
  Wu et al. 2023, section 4): a rank-``r`` SVD of the quantization error ``E = W - Q(W)`` gives
  ``U (K, r)`` and ``V (r, N)`` with ``X @ W ≈ X @ Q(W) + (X @ U) @ V``.
"""

from __future__ import annotations

import numpy as np

from effc.ops.block_formats import (
    BlockFormat,
    QuantizedBlocks,
    block_scales,
    element_codes,
    round_to_elements,
)

__all__ = ["gptq_quantize", "hessian", "lorc"]


def hessian(activations: list[np.ndarray], k: int) -> np.ndarray:
    """``2 XᵀX / tokens`` (float64, ``(K, K)``) of activations whose last axis is the reduction axis K."""
    h = np.zeros((k, k), np.float64)
    count = 0
    for a in activations:
        x = np.asarray(a, np.float64).reshape(-1, k)
        h += x.T @ x
        count += x.shape[0]
    return 2.0 * h / max(count, 1)


def gptq_quantize(
    w_nk: np.ndarray,
    h: np.ndarray,
    fmt: BlockFormat,
    block_size: int = 32,
    damp: float = 0.01,
    scale_dtype: str = "float16",
) -> QuantizedBlocks:
    """GPTQ-quantize a weight ``(N, K)`` into blocks of ``block_size`` along K.

    Args:
        w_nk: float weight, one row per output channel; ``K`` must be a multiple of ``block_size``.
        h: Hessian ``(K, K)`` from :func:`hessian`.
        fmt: target format.
        block_size: elements per block along K.
        damp: dampening, as a fraction of the mean Hessian diagonal added to the diagonal.
        scale_dtype: scale type of int formats.

    Weights that are exactly zero in ``w_nk`` (a pruned pattern) get the zero code; the kept weights absorb their
    share of the error, so the result has at least the zeros of ``w_nk``.

    Returns:
        Codes and scales in the layout of :func:`effc.ops.block_formats.quantize` applied to the ``(K, N)``
        weight with ``axis=0`` (codes ``(N, K / block_size, block_size)``).

    Raises:
        ValueError: K is not a multiple of ``block_size``, ``h`` has the wrong shape, or ``fmt`` is asymmetric
            (``int4_asym``: block minimums are not fitted here).
    """
    if fmt.has_minimum:
        raise ValueError(f"GPTQ rounds to symmetric and MX formats, not {fmt.name}")
    w = np.array(w_nk, dtype=np.float64)
    n, k = w.shape
    if k % block_size or h.shape != (k, k):
        raise ValueError(f"GPTQ needs K ({k}) divisible by block_size ({block_size}) and a ({k}, {k}) Hessian")
    pruned = w == 0  # zeros of an earlier sparsifying pass: fixed at 0, never written into
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    nb = k // block_size
    codes = np.zeros((n, nb, block_size), np.uint8)
    scales = None
    for b in range(nb):
        lo, hi = b * block_size, (b + 1) * block_size
        kept = np.where(pruned[:, lo:hi], 0.0, w[:, lo:hi]).astype(np.float32)
        stored, values = block_scales(kept[:, None, :], fmt, scale_dtype)
        stored, values = stored[:, 0], values[:, 0].astype(np.float64)
        if scales is None:
            scales = np.zeros((n, nb), stored.dtype)
        scales[:, b] = stored
        err_block = np.zeros((n, block_size))
        for j in range(block_size):
            col = lo + j
            scaled = np.where(pruned[:, col], 0.0, w[:, col] / values)
            codes[:, b, j] = element_codes(scaled, fmt)
            q = round_to_elements(scaled, fmt).astype(np.float64) * values
            err = (w[:, col] - q) / hinv[col, col]
            w[:, col:hi] -= np.outer(err, hinv[col, col:hi])
            err_block[:, j] = err
        w[:, hi:] -= err_block @ hinv[lo:hi, hi:]
    return QuantizedBlocks(codes, scales, fmt, (k, n), 0, block_size)


def lorc(error_kn: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank-``rank`` factors ``U (K, r)``, ``V (r, N)`` (float32) with ``U @ V ≈ error_kn`` (truncated SVD).

    Args:
        error_kn: quantization error ``W - Q(W)`` in the MatMul layout ``(K, N)``.
        rank: number of singular values kept (clipped to ``min(K, N)``).
    """
    u, s, vt = np.linalg.svd(np.asarray(error_kn, np.float64), full_matrices=False)
    r = max(0, min(rank, s.size))
    root = np.sqrt(s[:r])
    return (u[:, :r] * root).astype(np.float32), (root[:, None] * vt[:r]).astype(np.float32)
