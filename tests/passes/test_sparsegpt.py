"""SparseGPT reconstruction and the mask criteria on one layer with realistic (correlated, uneven) inputs."""

from __future__ import annotations

import numpy as np
import pytest

from effc.errors import PassError
from effc.passes import sparsegpt as sg


@pytest.fixture(scope="module")
def layer():
    rng = np.random.default_rng(0)
    k, cout, rows = 128, 64, 2048
    low_rank = rng.standard_normal((rows, 48)) @ rng.standard_normal((48, k))
    x = (low_rank + 0.3 * rng.standard_normal((rows, k))) * np.exp(rng.standard_normal(k))  # correlated, uneven
    w = rng.standard_normal((cout, k)).astype(np.float32)
    return x, w, x.T @ x


def _err(x, w, new):
    return float(np.linalg.norm(x @ (w - new).T) / np.linalg.norm(x @ w.T))


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}, {"n": 2, "m": 4, "vector": 16}])
def test_reconstruction_beats_wanda_beats_magnitude(layer, pattern):
    x, w, h = layer
    errs = {
        method: _err(x, w, sg.prune_weight(w, method=method, hessian=h, **pattern))
        for method in ("magnitude", "wanda")
    }
    errs["sparsegpt"] = _err(x, w, sg.prune_weight(w, method="wanda", hessian=h, reconstruct=True, **pattern))
    assert errs["sparsegpt"] < 0.85 * errs["wanda"] < 0.85 * errs["magnitude"]


def test_sparsegpt_masks_hold_exactly(layer):
    x, w, h = layer
    new = sg.sparsegpt(w, h, n=2, m=4, vector=16)
    nz = (new != 0).reshape(4, 16, 32, 4)
    assert (nz.sum(-1) <= 2).all() and (nz == nz[:, :1]).all()
    un = sg.sparsegpt(w, h, sparsity=0.5)
    assert np.mean(un == 0) == pytest.approx(0.5, abs=0.01)


def test_dead_inputs_and_bad_arguments(layer):
    x, w, h = layer
    h = h.copy()
    h[3, :] = h[:, 3] = 0  # an input that is always zero
    new = sg.sparsegpt(w, h, n=2, m=4)
    assert (new[:, 3] == 0).all() and np.isfinite(new).all()
    with pytest.raises(PassError, match="needs sparsity"):
        sg.sparsegpt(w, h)
    with pytest.raises(PassError, match="multiple of m"):
        sg.sparsegpt(w[:, :126], h[:126, :126], n=2, m=4)
