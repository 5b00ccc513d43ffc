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


def test_prune_reconstruct_option_on_a_graph():
    """``prune(reconstruct=true)`` zeroes exactly the asked fraction and lands closer to the original than Wanda."""
    from effc.errors import CalibrationError
    from effc.passes.prune import PrunePass
    from tests.passes.nm_helpers import calibration, feeds, ffn_model, run

    fs = feeds(16)
    outs, stats = {}, {}
    for kw in ({"method": "wanda"}, {"method": "wanda", "reconstruct": True}):
        model = ffn_model()
        p = PrunePass(sparsity=0.5, granularity="row", calibration=calibration(fs), **kw)
        assert p(model).modified
        assert p.stats["sparsity"] == pytest.approx(0.5, abs=0.01)
        key = bool(kw.get("reconstruct"))
        outs[key], stats[key] = model, p.stats
    assert all(r["reconstructed"] for r in stats[True]["layers"].values()) and len(stats[True]["layers"]) == 2
    ref = ffn_model()
    err = {k: np.mean([np.linalg.norm(run(m, f) - run(ref, f)) for f in fs[:4]]) for k, m in outs.items()}
    assert err[True] < err[False]
    with pytest.raises(CalibrationError):
        PrunePass(sparsity=0.5, reconstruct=True)(ffn_model())


# ----------------------------------------------------------------------------------------------- MiniLM (real model)
@pytest.fixture(scope="module")
def minilm():
    """MiniLM-L6, 32 real calibration sentences, 8 held-out ones, and the reference embeddings."""
    import onnx_ir as ir

    from effc import zoo
    from effc.ir.calibration import Calibration
    from effc.ir.reference import Reference

    entry = zoo.get("minilm-l6")
    model = entry.load()
    cal = Calibration(entry.samples("calibration", 32), source=entry.samples_description("calibration"))
    held_out = entry.samples("eval", 8)
    out = Reference(model).output_names.index("sentence_embedding")

    def embeddings(m):
        ref = Reference(m)
        return [ref.run(f)[out][0] for f in held_out]

    reference = embeddings(model)

    def cosine(m):
        return float(np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                              for a, b in zip(embeddings(m), reference, strict=True)]))

    ffn = [lay[0].name for lay in sg.select_layers(model, "ffn")][:4]  # FFN up/down of the first two blocks
    return {"model": model, "cal": cal, "cosine": cosine, "layers": "|".join(ffn),
            "copy": lambda: ir.from_proto(ir.to_proto(model))}


def test_minilm_reconstruction_beats_wanda_beats_magnitude(minilm):
    """Embedding cosine on held-out sentences: SparseGPT > Wanda > magnitude at 2:4 and at 50% unstructured."""
    from effc.passes.nm_sparsity import NMSparsityPass
    from effc.passes.prune import PrunePass

    names = minilm["layers"].split("|")
    cos = {}
    for label, kw in {"magnitude": {"method": "magnitude", "reconstruct": False},
                      "wanda": {"method": "wanda", "reconstruct": False},
                      "sparsegpt": {"method": "wanda", "reconstruct": True}}.items():
        model = minilm["copy"]()
        NMSparsityPass(n=2, m=4, layers=minilm["layers"], calibration=minilm["cal"], **kw)(model)
        cos[("2:4", label)] = minilm["cosine"](model)
        model = minilm["copy"]()
        PrunePass(sparsity=0.5, granularity="row", include=tuple(names), calibration=minilm["cal"], **kw)(model)
        cos[("50%", label)] = minilm["cosine"](model)
    for pattern in ("2:4", "50%"):
        assert cos[(pattern, "sparsegpt")] > cos[(pattern, "wanda")] > cos[(pattern, "magnitude")], cos
    assert cos[("50%", "sparsegpt")] > cos[("2:4", "sparsegpt")]  # the finer pattern loses less
