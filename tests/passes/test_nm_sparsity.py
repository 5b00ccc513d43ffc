"""nm-sparsity: packed format, ORT numbers of the rewritten graph, contract, permutation search."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from effc.errors import PassError, PipelineError
from effc.ops.nm_sparse import pack_nm, packed_layers, unpack_nm
from effc.passes import nm_sparsity as nm
from effc.passes import sparsegpt as sg
from effc.passes.pipeline import parse_pipeline
from tests.passes.nm_helpers import calibration, feeds, ffn_model, run


def _copy(model):
    return ir.from_proto(ir.to_proto(model))


@pytest.mark.parametrize(("n", "m", "vector"), [(2, 4, 1), (1, 4, 1), (4, 8, 1), (2, 4, 16), (2, 4, 4)])
def test_pack_unpack_round_trip_is_exact(n, m, vector):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)  # (Cout, Cin)
    perm = rng.permutation(64)
    pruned = sg.prune_weight(w, method="magnitude", n=n, m=m, vector=vector, perm=perm)
    assert np.mean(pruned != 0) == pytest.approx(n / m)
    values, indices = pack_nm(pruned.T, n, m, vector, perm)
    assert values.shape == (64 // m * n, 32) and indices.shape == (64 // m * n, 32 // vector)
    assert indices.dtype == np.uint16
    np.testing.assert_array_equal(unpack_nm(values, indices, 64), pruned.T)


def test_packing_a_dense_tensor_raises():
    w = np.ones((16, 8), dtype=np.float32)
    with pytest.raises(PassError, match="not 2:4"):
        pack_nm(w, 2, 4)
    with pytest.raises(PassError, match="multiple of m"):
        pack_nm(np.ones((18, 8), np.float32), 2, 4)


def test_nm_mask_vector_pattern_is_shared():
    s = np.random.default_rng(1).random((32, 16))
    keep = nm.sg.nm_mask(s, 2, 4, vector=8)
    assert (keep.reshape(4, 8, 4, 4).sum(-1) == 2).all()
    assert (keep.reshape(4, 8, 16) == keep.reshape(4, 8, 16)[:, :1]).all()


@pytest.mark.parametrize("vector", [1, 16])
def test_pass_rewrites_to_packed_op_and_ort_matches_dense_masked(vector):
    model = ffn_model()
    fs = feeds()
    p = nm.NMSparsityPass(n=2, m=4, vector=vector, calibration=calibration(fs))
    masked = _copy(model)
    result = p(model)
    assert result.modified
    kinds = [(nd.domain, nd.op_type) for nd in result.model.graph]
    assert kinds.count(("effc", "NMSparseMatMul")) == 2 and ("", "MatMul") not in kinds
    onnx.checker.check_model(ir.to_proto(result.model))
    # the dense equivalent: unpack every packed weight back into the MatMul model
    for node in packed_layers(result.model):
        vals, idx = (v.const_value.numpy() for v in node.inputs[1:])
        name = node.name.removesuffix("/nm")
        lay = next(lay for lay in sg.linear_matmuls(masked) if lay[0].name == name)
        sg.set_weight(lay, unpack_nm(vals, idx, vals.shape[0] * 2).T)
    for f in fs[:2]:
        np.testing.assert_allclose(run(result.model, f), run(masked, f), rtol=1e-5, atol=1e-5)
    st = p.stats
    assert st["reconstructed"] and st["method"] == "wanda"
    assert st["weight_bytes_after"] < 0.8 * st["weight_bytes_before"]
    assert all(rec["kept"] == pytest.approx(0.5) for rec in st["layers"])


def test_second_run_changes_nothing_and_no_calibration_falls_back():
    model = ffn_model()
    p = nm.NMSparsityPass(n=2, m=4)
    assert p(model).modified and p.stats["method"] == "magnitude" and not p.stats["reconstructed"]
    assert not nm.NMSparsityPass(n=2, m=4)(model).modified


def test_layers_option_and_skip_reasons():
    model = ffn_model(k=64, hidden=96)
    p = nm.NMSparsityPass(n=2, m=4, vector=64, layers="ffn.up")
    p(model)
    assert [r["name"] for r in p.stats["layers"]] == []
    assert "does not divide" in p.stats["skipped"][0]["reason"]
    with pytest.raises(PassError, match="matches no linear layer"):
        nm.NMSparsityPass(layers="nothing*")(ffn_model())


def test_options_validated_and_pipeline_text_round_trips():
    with pytest.raises(PipelineError):
        nm.NMSparsityPass(n=4, m=4)
    text = "nm-sparsity(n=1,m=8,vector=16,layers=ffn,permute=true)"
    pipe = parse_pipeline(text)
    assert str(pipe) == text and str(parse_pipeline("nm-sparsity(n=2,m=4)")) == "nm-sparsity"


def _unpacked_twin(packed, original):
    """``original`` with each packed layer's dense equivalent written back into its MatMul."""
    twin = _copy(original)
    for node in packed_layers(packed):
        vals, idx = (v.const_value.numpy() for v in node.inputs[1:])
        lay = next(lay for lay in sg.linear_matmuls(twin) if lay[0].name == node.name.removesuffix("/nm"))
        k = lay[1].const_value.shape[0]
        sg.set_weight(lay, unpack_nm(vals, idx, k).T)
    return twin


def test_permutation_search_raises_kept_score_and_stays_exact():
    rng = np.random.default_rng(0)
    scores = np.abs(rng.standard_normal((64, 128))) * np.exp(rng.standard_normal(128))
    perm, before, after = nm.permutation_search(scores, 2, 4, vector=16)
    assert sorted(perm) == list(range(128)) and after > 1.02 * before
    model, fs = ffn_model(), feeds()
    p = nm.NMSparsityPass(n=2, m=4, vector=16, permute=True, calibration=calibration(fs))
    out = p(_copy(model)).model
    assert all(r["permutation_gain"] > 1.0 for r in p.stats["layers"])
    twin = _unpacked_twin(out, model)
    # the permuted pattern is N:M only under the permutation: the dense twin is not 2:4 in natural order
    w = sg.get_weight(sg.linear_matmuls(twin)[0])
    assert (np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=-1) > 2).any()
    for f in fs[:2]:
        np.testing.assert_allclose(run(out, f), run(twin, f), rtol=1e-5, atol=1e-5)


def test_min_cosine_drops_sensitive_layers():
    fs = feeds()
    stats = {}
    for recon in (False, True):
        p = nm.NMSparsityPass(n=1, m=4, min_cosine=0.999, reconstruct=recon, calibration=calibration(fs))
        p(ffn_model())
        sens = stats[recon] = p.stats["sensitivity"]
        assert set(sens["per_layer"]) == {"ffn.up", "ffn.down"}
        assert p.stats["cosine"] >= 0.999
    assert len(stats[False]["chosen"]) < 2
    # sensitivity measured with reconstruction: each layer loses less, so no fewer layers are kept
    assert all(stats[True]["per_layer"][k] > stats[False]["per_layer"][k] for k in stats[False]["per_layer"])
    assert len(stats[True]["chosen"]) >= len(stats[False]["chosen"])
