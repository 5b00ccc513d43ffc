"""effc.compile from Python: a torch module, an ONNX file, atomic output, manifest and runtime contract."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

import effc
import effc.runtime
from effc.errors import ArtifactError, EffcError


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = torch.nn.Linear(4 * 8 * 8, 32)
        self.fc2 = torch.nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def test_compile_torch_module_matches_torch(tmp_path):
    net = SmallNet().eval()
    x = torch.randn(1, 1, 8, 8)
    result = effc.compile(net, (x,), passes="prune(sparsity=0.3)", out_dir=tmp_path / "out", latency_repeat=3)
    compiled = effc.runtime.load(result.out_dir)
    name = compiled.inputs[0]["name"]
    (y,) = compiled.run({name: x.numpy()})
    rewritten = ort.InferenceSession(str(result.out_dir / "model.onnx")).run(None, {name: x.numpy()})[0]
    np.testing.assert_allclose(y, rewritten, atol=1e-4)
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.argmax(ref) == np.argmax(y) or result.report["fidelity"]["vs_original"]["summary"]["cosine"] > 0.9
    stats = result.manifest["passes"][0]["stats"]
    assert result.manifest["pipeline"] == "prune(sparsity=0.3)"
    assert stats  # the pass recorded what it changed
    assert result.report["cost"]["params_bytes_after"] == result.report["cost"]["params_bytes_before"]


def test_compile_without_passes_is_exact(tmp_path, mlp_path):
    result = effc.compile(str(mlp_path), out_dir=tmp_path / "out", measure_latency=False)
    fid = result.report["fidelity"]
    assert fid["vs_original"]["summary"]["max_abs"] < 1e-5
    assert fid["rewritten_vs_original"]["summary"]["max_abs"] < 1e-6
    assert result.report["latency"] is None
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"model.onnx", "model.so", "report.json", "report.md"}
    assert manifest["source"]["sha256"] and manifest["effc_version"] == effc.__version__
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 16], "dtype": "float32"}]


def test_failed_build_leaves_nothing(tmp_path, mlp_path, monkeypatch):
    from effc.errors import TargetError
    from effc.targets import get_target

    def boom(self, model, workdir, options):
        (workdir / "model.so").write_bytes(b"half written")
        raise TargetError("simulated build failure")

    monkeypatch.setattr(type(get_target("cpu")), "build", boom)
    out = tmp_path / "art" / "out"
    with pytest.raises(TargetError, match="simulated"):
        effc.compile(str(mlp_path), out_dir=out)
    assert not out.exists()
    assert not (tmp_path / "art").exists()  # the parent folder the compile created goes too


def test_runtime_rejects_missing_manifest(tmp_path):
    with pytest.raises(ArtifactError):
        effc.runtime.load(tmp_path)


def test_torch_module_without_examples():
    with pytest.raises(EffcError, match="example"):
        effc.compile(SmallNet(), out_dir="unused")


@pytest.mark.parametrize("threads", [0, -2, 1.5])
def test_invalid_threads_rejected_before_any_work(tmp_path, mlp_path, threads):
    # threads=0 used to become 1 silently (``threads or 1``)
    with pytest.raises(EffcError, match="threads"):
        effc.compile(mlp_path, out_dir=tmp_path / "out", threads=threads)
    assert not (tmp_path / "out").exists()


def test_interrupted_replace_keeps_the_previous_artifact(tmp_path, mlp_path, monkeypatch):
    from pathlib import Path

    out = tmp_path / "out"
    effc.compile(str(mlp_path), out_dir=out, measure_latency=False)
    before = (out / "manifest.json").read_text()
    real_rename = Path.rename

    def interrupted(self, target):
        if self.name.startswith(".out.tmp-"):
            raise KeyboardInterrupt  # Ctrl-C between moving the old artifact away and the new one in
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        effc.compile(str(mlp_path), out_dir=out, force=True, measure_latency=False)
    monkeypatch.undo()
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.onnx", "out"]
    effc.runtime.load(out)


def test_report_shows_weight_sparsity_and_macs_per_op(tmp_path, mlp_path):
    # the compiler wrote cost keys the report never read, so a pruned model's report.md said nothing about sparsity
    from effc.eval.report import summary_rows

    result = effc.compile(str(mlp_path), passes="prune(sparsity=0.5,min_params=0)", out_dir=tmp_path / "out",
                          measure_latency=False)
    md = (result.out_dir / "report.md").read_text()
    assert "Weight sparsity (rewritten model): 50.0%" in md
    assert "MACs per operator type" in md and "| Gemm |" in md
    rows = dict(summary_rows(result.report))
    assert rows["Weight sparsity"].startswith("50.0% zeros")


@pytest.mark.parametrize("option", ["eval_samples", "calibration_samples", "latency_repeat"])
def test_zero_sample_counts_rejected_before_the_build(tmp_path, mlp_path, option, monkeypatch):
    # eval_samples=0 used to build the whole model and then fail with "no samples to compare"
    from effc.targets import get_target

    monkeypatch.setattr(type(get_target("cpu")), "build", lambda *a: pytest.fail("built"))
    with pytest.raises(EffcError, match=option):
        effc.compile(mlp_path, out_dir=tmp_path / "out", **{option: 0})


def test_quantized_criterion_scales_with_the_activation_quantization():
    from effc.api import QUANT_ERROR_FACTOR, compare_outputs

    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((1, 128, 384)).astype(np.float32)] for _ in range(3)]

    def noisy(level, seed):
        g = np.random.default_rng(seed)
        return [[r[0] + level * g.standard_normal(r[0].shape).astype(np.float32)] for r in ref]

    unquantized = noisy(0.04, 1)  # what the activation quantization changes: rel L2 0.04
    flips = noisy(0.03, 2)  # a correct artifact whose rounding flips cascaded (MiniLM MXINT8: 0.03)
    quant = compare_outputs(ref, flips, ["h"], 1e-4, unquantized)["h"]
    assert quant["ok"] and quant["criterion"] == "quantized"
    assert quant["rel_l2"] == pytest.approx(0.03, rel=0.02) and quant["quant_rel_l2"] == pytest.approx(0.04, rel=0.02)
    assert quant["max_abs"] > 0.1 and 0.999 < quant["cosine"] < 0.9999
    plain = compare_outputs(ref, flips, ["h"], 1e-4)["h"]
    assert not plain["ok"] and plain["criterion"] == "atol" and plain["quant_rel_l2"] is None
    # a wrong kernel: errors beyond QUANT_ERROR_FACTOR x the quantization's own change
    assert not compare_outputs(ref, noisy(0.04 * QUANT_ERROR_FACTOR * 1.1, 3), ["h"], 1e-4, unquantized)["h"]["ok"]
    zeroed = [[r[0].copy()] for r in ref]
    for z in zeroed:
        z[0][..., :32] = 0.0  # one block of 32 lost per row
    assert not compare_outputs(ref, zeroed, ["h"], 1e-4, unquantized)["h"]["ok"]
    one_bad = [flips[0], flips[1], [-ref[2][0]]]
    assert not compare_outputs(ref, one_bad, ["h"], 1e-4, unquantized)["h"]["ok"]
    nan = [[r[0].copy()] for r in flips]
    nan[1][0][0, 5, 7] = np.nan
    assert not compare_outputs(ref, nan, ["h"], 1e-4, unquantized)["h"]["ok"]
    # an exact match passes even where the activation quantization changes nothing
    assert compare_outputs(ref, ref, ["h"], 1e-4, ref)["h"]["ok"]


def test_compare_outputs_integer_outputs_are_exact_under_both_criteria():
    from effc.api import compare_outputs

    ids = [[np.arange(6, dtype=np.int64)]]
    assert compare_outputs(ids, ids, ["i"], 1.0, ids)["i"] == {
        "max_abs": 0.0, "cosine": None, "rel_l2": None, "quant_rel_l2": None, "nonfinite": 0, "criterion": "exact",
        "ok": True}
    off = [[np.arange(6, dtype=np.int64) + np.eye(6, dtype=np.int64)[2]]]
    assert not compare_outputs(ids, off, ["i"], 5.0)["i"]["ok"]
    zeros = [[np.zeros(4, np.float32)]]
    assert compare_outputs(zeros, zeros, ["z"], 0.0)["z"]["cosine"] == 1.0  # two zero vectors
    assert not compare_outputs(zeros, [[np.ones(4, np.float32)]], ["z"], 0.0, zeros)["z"]["ok"]


@pytest.mark.parametrize("mode,expected", [("weight_act", 2), ("weight", 0)])
def test_dynamic_quant_nodes_found_only_for_activation_quantization(mode, expected):
    from effc.api import dynamic_quant_nodes, without_dynamic_quant
    from effc.passes.manager import PassManager
    from effc.passes.pipeline import parse_pipeline
    from tests.conftest import make_mlp

    model = ir.from_proto(make_mlp(in_dim=64, hidden=64, out_dim=8))
    pipeline = parse_pipeline(f"block-quant(format=mxint8,mode={mode},min_params=0)")
    model = PassManager(pipeline).run(model).model
    assert len(dynamic_quant_nodes(model)) == expected
    bypassed = without_dynamic_quant(model)
    assert not dynamic_quant_nodes(bypassed) and len(dynamic_quant_nodes(model)) == expected  # a copy
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(ir.to_proto(bypassed).SerializeToString()).run(None, {"x": x})
    (y_ref,) = ort.InferenceSession(ir.to_proto(model).SerializeToString()).run(None, {"x": x})
    assert (np.abs(y - y_ref).max() > 0) == bool(expected)  # bypassing changes only activation-quantized models


def test_verify_artifact_rejects_a_negative_atol(tmp_path, mlp_path):
    from effc.api import verify_artifact

    with pytest.raises(EffcError, match="atol"):
        verify_artifact(tmp_path, atol=-1.0)


def test_zoo_split_too_small_names_the_option():
    from effc.compiler import _zoo_samples
    from effc.errors import DataError

    class Entry:
        name = "tiny"

        def samples(self, split, n):
            raise DataError(f"only 5 files available for the tiny {split} split, asked for {n}", "ask for fewer")

    with pytest.raises(DataError, match=r"--calibration-samples .* asks for 9 calibration .* only 5") as exc:
        _zoo_samples(Entry(), "calibration", 9, "--calibration-samples (calibration_samples=)")
    assert "--data" in exc.value.hint
