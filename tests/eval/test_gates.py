"""Quality gates and the primary output: unit checks of effc.eval.gates, then small compiles through API and CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import effc
from effc.cli import cli
from effc.errors import EffcError, QualityGateError
from effc.eval import gates
from effc.eval.report import summary_rows


def _report(cosine=0.9, top1=0.75, names=("a", "b")):
    outputs = {n: {"cosine": cosine - i * 0.5, "top1_agreement": top1, "max_abs": 1.0} for i, n in enumerate(names)}
    return {"fidelity": {"vs_original": {"samples": 4, "outputs": outputs, "summary": {"cosine": cosine - 0.5}}}}


def test_parse_limits_validates_ranges():
    assert gates.parse_limits(min_cosine=0.95, max_top1_drop=None) == {"min_cosine": 0.95}
    assert gates.parse_limits(min_cosine=np.float32(0.5), max_top1_drop=1) == {"min_cosine": 0.5, "max_top1_drop": 1.0}
    for bad in ({"min_cosine": 1.5}, {"max_top1_drop": -1}, {"max_ppl_increase": -0.1}, {"min_cosine": "x"},
                {"min_cosine": float("nan")}, {"max_top1_drop": True}):
        with pytest.raises(EffcError, match="is not a number"):
            gates.parse_limits(**bad)
    with pytest.raises(EffcError, match="unknown quality gate"):
        gates.parse_limits(min_cos=0.9)


def test_primary_output_resolution():
    assert gates.primary_output(["last_hidden_state", "sentence_embedding"]) == "last_hidden_state"
    assert gates.primary_output(["h", "e"], declared="e") == "e"
    assert gates.primary_output(["h", "e"], requested="h", declared="e") == "h"
    assert gates.primary_output(["h"], declared="gone") == "h"
    with pytest.raises(EffcError, match=r"'zzz' is not an output.*give one of: h, e"):
        gates.primary_output(["h", "e"], requested="zzz")


def test_check_reads_the_primary_output_only():
    report = _report(cosine=0.9)  # a: 0.9, b: 0.4
    assert gates.check(report, {"min_cosine": 0.8}, "a")["passed"]
    failed = gates.check(report, {"min_cosine": 0.8}, "b")
    assert not failed["passed"] and failed["checks"][0]["measured"] == pytest.approx(0.4)
    drop = gates.check(report, {"max_top1_drop": 20.0}, "a")["checks"][0]
    assert drop["measured"] == pytest.approx(25.0) and not drop["passed"]
    assert gates.check(report, {"max_top1_drop": 25.0}, "a")["passed"]


def test_missing_metric_fails_never_passes():
    result = gates.check({"fidelity": {}}, {"min_cosine": -1.0}, "a")
    assert not result["passed"] and result["checks"][0]["measured"] is None
    assert "not measured FAILED" in gates.format_check(result["checks"][0])


def test_perplexity_gate_reads_the_decoder_section():
    report = {"perplexity": {"original": 10.0, "compiled": 10.5}}
    check = gates.check(report, {"max_ppl_increase": 4.0}, "logits")["checks"][0]
    assert check["measured"] == pytest.approx(5.0) and not check["passed"]
    assert gates.check(report, {"max_ppl_increase": 5.5}, "logits")["passed"]


def test_gates_that_do_not_apply_fail_early():
    with pytest.raises(EffcError, match="--max-ppl-increase applies to decoders"):
        gates.check_applicable({"max_ppl_increase": 5.0}, gates.metrics_for_kind("float"), "y", "m.onnx")
    with pytest.raises(EffcError, match="--max-top1-drop applies to class-score outputs"):
        gates.check_applicable({"max_top1_drop": 5.0}, gates.metrics_for_kind("float"), "emb", "m.onnx")
    gates.check_applicable({"min_cosine": 0.9, "max_top1_drop": 1.0}, gates.metrics_for_kind("class_scores"), "y", "m")


def test_headline_uses_the_primary_output():
    report = {**_report(cosine=0.9), "primary_output": "a"}
    line = dict(summary_rows(report))["Fidelity vs original (onnxruntime)"]
    assert line.startswith("a: cosine 0.900000")
    report["primary_output"] = None
    assert dict(summary_rows(report))["Fidelity vs original (onnxruntime)"].startswith("cosine 0.400000")


def _two_output_model(path):
    """x (1, 16) → fc1 → y_logits (1, 4), and relu(fc1) @ w2 → emb (1, 8): two outputs of different fidelity."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((16, 4)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((4, 8)) * 0.3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["y_logits"], name="fc1"),
         helper.make_node("Relu", ["y_logits"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["emb"], name="fc2")],
        "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y_logits", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_failed_gate_writes_nothing_and_names_the_measured_cosine(tmp_path, mlp_path):
    out = tmp_path / "out"
    passes = "prune(sparsity=0.9,min_params=0)"
    with pytest.raises(QualityGateError) as info:
        effc.compile(str(mlp_path), passes=passes, out_dir=out, min_cosine=0.9999, measure_latency=False)
    assert info.value.exit_code == 4 and info.value.result is None
    assert not out.exists() and list(tmp_path.iterdir()) == [mlp_path]
    message = str(info.value)
    assert "--min-cosine 0.9999: cosine 0." in message and "nothing was written" in message
    # --keep-failed: the same compile, written and marked failed; the error carries the measured value
    with pytest.raises(QualityGateError) as kept:
        effc.compile(str(mlp_path), passes=passes, out_dir=out, min_cosine=0.9999, measure_latency=False,
                     keep_failed=True)
    result = kept.value.result
    cosine = result.report["fidelity"]["vs_original"]["outputs"]["y"]["cosine"]
    assert cosine < 0.9999
    assert str(kept.value) == message.replace(
        "nothing was written", f"artifact kept in {out}, marked failed in manifest.json and report.md")
    assert f"cosine {cosine:.6f} FAILED" in message
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["quality_gates"]["passed"] is False
    assert manifest["quality_gates"]["checks"][0]["measured"] == pytest.approx(cosine)
    assert "FAILED its quality gates" in (out / "report.md").read_text()


def test_passing_gate_and_named_primary_output(tmp_path):
    model = _two_output_model(tmp_path / "two.onnx")
    result = effc.compile(str(model), passes="prune(sparsity=0.5,min_params=0)", out_dir=tmp_path / "out",
                          measure_latency=False, min_cosine=-1.0, max_top1_drop=100.0, primary_output="emb")
    gate = result.report["quality_gates"]
    assert gate["passed"] and gate["primary_output"] == "emb" and result.manifest["primary_output"] == "emb"
    emb = result.report["fidelity"]["vs_original"]["outputs"]["emb"]["cosine"]
    assert gate["checks"][0]["measured"] == pytest.approx(emb)
    headline = dict(summary_rows(result.report))["Fidelity vs original (onnxruntime)"]
    assert headline.startswith(f"emb: cosine {emb:.6f}")
    assert "| y_logits |" in (result.out_dir / "report.md").read_text()  # the other output stays in the table


def test_unknown_primary_output_lists_the_outputs(tmp_path):
    model = _two_output_model(tmp_path / "two.onnx")
    with pytest.raises(EffcError, match="give one of: y_logits, emb"):
        effc.compile(str(model), out_dir=tmp_path / "out", primary_output="logits")
    assert not (tmp_path / "out").exists()


def test_cli_gate_exit_code_and_line(tmp_path, mlp_path):
    out = tmp_path / "out"
    args = ["compile", str(mlp_path), "--passes", "prune(sparsity=0.9,min_params=0)", "-o", str(out), "--no-latency"]
    failed = CliRunner().invoke(cli, [*args, "--min-cosine", "0.9999"], catch_exceptions=False)
    assert failed.exit_code == 4, failed.output
    assert "missed its quality gate on output 'y'" in failed.output and "cosine 0." in failed.output
    assert "Traceback" not in failed.output and not out.exists()
    passed = CliRunner().invoke(cli, [*args, "--min-cosine", "-1"], catch_exceptions=False)
    assert passed.exit_code == 0, passed.output
    assert "passed (--min-cosine -1: cosine" in " ".join(passed.output.split())
    wrong = CliRunner().invoke(cli, [*args, "--force", "--max-ppl-increase", "5"], catch_exceptions=False)
    assert wrong.exit_code == 1 and "applies to decoders" in wrong.output
