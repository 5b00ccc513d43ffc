"""Every compression pass goes through the whole flow: effc.compile → artifact equal to model.onnx under ORT."""

from __future__ import annotations

import pytest

import effc
from tests.conftest import make_mlp

PIPELINES = [
    ("block-quant(format=mxint8,min_params=0)", 0.999, True),
    ("channel-reorder,block-quant(format=mxfp4,min_params=0)", 0.95, True),
    ("nm-sparsity(n=2,m=4,vector=1)", 0.8, False),
    ("nm-sparsity(n=2,m=4,vector=16)", 0.5, False),
    ("prune(sparsity=0.5,method=wanda,min_params=0),cleanup", 0.8, False),
]


@pytest.fixture(scope="module")
def mlp64(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "mlp64.onnx"
    make_mlp(path, in_dim=64, hidden=128, out_dim=16)
    return path


@pytest.mark.parametrize(("passes", "min_cosine", "smaller"), PIPELINES, ids=[p[0].split("(")[0] for p in PIPELINES])
def test_pass_compiles_and_artifact_matches_rewritten(tmp_path, mlp64, passes, min_cosine, smaller):
    result = effc.compile(str(mlp64), passes=passes, out_dir=tmp_path / "out", measure_latency=False)
    fid = result.report["fidelity"]
    assert fid["compiled_vs_rewritten"]["summary"]["max_abs"] <= 1e-4
    assert fid["vs_original"]["summary"]["cosine"] >= min_cosine
    cost = result.report["cost"]
    assert cost["macs_after"] <= cost["macs_before"]
    if smaller:
        assert cost["params_bytes_after"] < 0.5 * cost["params_bytes_before"]
    assert all(record["stats"] for record in result.manifest["passes"])
    if passes.startswith("nm-sparsity"):  # the lowering says which form each packed node took, and why
        ops = result.report["target"]["info"]["effc_ops"]
        assert ops and all(op["form"] in ("packed", "dense") and op["reason"] for op in ops)
        assert "form chosen per node" in (result.out_dir / "report.md").read_text()
