"""Input-channel permutation search for N:M sparsity (groups formed over permuted inputs keep more score).

Used by ``nm-sparsity(permute=true)``; the permutation costs nothing at run time because the packed indices of
``effc.NMSparseMatMul`` are absolute input rows (see :mod:`effc.ops.nm_sparse`).
"""

from __future__ import annotations

import numpy as np

from effc.ops.nm_sparse import check_nm


def _kept(t: np.ndarray, n: int) -> np.ndarray:
    """Sum of the top-``n`` along axis -2 of ``(..., m, B)``, summed over ``B``."""
    return np.sort(t, axis=-2)[..., -n:, :].sum(axis=(-2, -1))


def permutation_search(scores: np.ndarray, n: int, m: int, vector: int = 1, rounds: int = 64, seed: int = 0):
    """Input-channel order raising the score an N:M mask keeps (greedy channel swaps between groups).

    Each round pairs the groups at random and applies, per pair, the single channel swap with the largest gain
    (all ``m²`` swaps evaluated at once). After Pool & Yu, "Channel Permutations for N:M Sparsity" (2021).

    Args:
        scores: ``(Cout, K)`` importance; the search groups along ``K``.
        n: kept per group.
        m: group length.
        vector: output rows sharing a pattern (their scores are summed first).
        rounds: swap rounds (each evaluates ``K/(2m)`` group pairs).
        seed: random seed of the pairing.

    Returns:
        ``((K,) permutation, kept score before, kept score after)``.
    """
    cout, k = scores.shape
    check_nm(n, m, vector, scores.shape)
    t = scores.reshape(cout // vector, vector, k).sum(axis=1).T.astype(np.float64)  # (K, B)
    g = k // m
    perm = np.arange(k)
    rng = np.random.default_rng(seed)
    ii, jj = (a.ravel() for a in np.meshgrid(np.arange(m), np.arange(m), indexing="ij"))
    before = float(_kept(t[perm.reshape(g, m)], n).sum())
    for _ in range(rounds if g > 1 else 0):
        pairs = rng.permutation(g)[: g // 2 * 2].reshape(-1, 2)
        groups = perm.reshape(g, m)
        a_ch, b_ch = groups[pairs[:, 0]], groups[pairs[:, 1]]
        ta, tb = t[a_ch], t[b_ch]  # (P, m, B)
        base = _kept(ta, n) + _kept(tb, n)
        na = np.repeat(ta[:, None], m * m, axis=1)  # (P, m*m, m, B)
        nb = np.repeat(tb[:, None], m * m, axis=1)
        cand = np.arange(m * m)
        na[:, cand, ii, :] = tb[:, jj, :]
        nb[:, cand, jj, :] = ta[:, ii, :]
        gain = _kept(na, n) + _kept(nb, n) - base[:, None]
        best = gain.argmax(axis=1)
        for p in np.nonzero(gain[np.arange(len(pairs)), best] > 1e-12)[0]:
            ga, gb = pairs[p]
            i, j = ii[best[p]], jj[best[p]]
            groups[ga, i], groups[gb, j] = groups[gb, j], groups[ga, i]
        perm = groups.reshape(-1)
    after = float(_kept(t[perm.reshape(g, m)], n).sum())
    return perm, before, after
