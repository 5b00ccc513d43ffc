"""The command line on bad input: one readable error line, exit code != 0, no artifact left behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from effc.cli import cli
from tests.conftest import make_mlp


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def _assert_clean_failure(result, out_dir, *needles):
    assert result.exit_code != 0, result.output
    text = result.output
    assert "Traceback" not in text
    assert "internal error" not in text
    assert "error:" in text
    for needle in needles:
        assert needle.lower() in text.lower(), text
    leftovers = [p for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.tmp")]
    assert not leftovers
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", tmp_path / "nope.onnx", "-o", out), out, "nope.onnx")


def test_not_onnx_bytes(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is a text file, not a protobuf\n" * 20)
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", bad, "-o", out), out, "notes.onnx")


def test_truncated_onnx(tmp_path, mlp_path):
    data = mlp_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", cut, "-o", out), out, "cut.onnx")


def test_external_data_escaping_folder(tmp_path):
    model = make_mlp()
    for init in model.graph.initializer:
        if init.name == "w1":
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.data_location = TensorProto.EXTERNAL
            init.external_data.add(key="location", value="../../etc/passwd")
    path = tmp_path / "model" / "evil.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", path, "-o", out), out, "passwd")


def test_unsupported_op(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("NonMaxSuppressionX", ["r"], ["y"], domain="acme")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("acme", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", path, "-o", out), out, "NonMaxSuppressionX")


def test_dynamic_dim_without_input_shape(tmp_path):
    path = tmp_path / "dyn.onnx"
    make_mlp(path, dynamic_batch=True)
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", path, "-o", out), out, "--input-shape", "x")


def test_dynamic_dim_with_input_shape_compiles(tmp_path):
    path = tmp_path / "dyn.onnx"
    make_mlp(path, dynamic_batch=True)
    out = tmp_path / "out"
    result = _run("compile", path, "-o", out, "--input-shape", "x=2x16", "--no-latency")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["shape"] == [2, 16]


def test_unknown_pass(tmp_path, mlp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", mlp_path, "--passes", "prun(sparsity=0.3)", "-o", out), out, "prun", "prune")


def test_invalid_option(tmp_path, mlp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", mlp_path, "--passes", "prune(sparsity=1.5)", "-o", out), out, "sparsity")


def test_unknown_option(tmp_path, mlp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", mlp_path, "--passes", "prune(sparsty=0.5)", "-o", out), out, "sparsty")


def test_existing_output_needs_force(tmp_path, mlp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    result = _run("compile", mlp_path, "-o", out)
    assert result.exit_code != 0
    assert "--force" in result.output
    assert (out / "keep.txt").read_text() == "user file"
    result = _run("compile", mlp_path, "-o", out, "--force", "--no-latency")  # not an artifact: refused
    assert result.exit_code == 1 and "is not an effc artifact" in result.output
    assert (out / "keep.txt").read_text() == "user file"
    (out / "keep.txt").unlink()
    assert _run("compile", mlp_path, "-o", out, "--no-latency").exit_code == 0  # empty: no --force needed
    result = _run("compile", mlp_path, "-o", out, "--force", "--no-latency")  # an artifact: replaced
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").exists()


@pytest.mark.parametrize(
    "x,needle", [(np.zeros((1, 17), np.float32), "[1, 16]"), (np.zeros((1, 16), np.int64), "int64")]
)
def test_data_with_wrong_shape_or_dtype(tmp_path, mlp_path, x, needle):
    # used to build the whole model, then crash in onnxruntime with a traceback
    np.savez(tmp_path / "d.npz", x=x)
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--data", tmp_path / "d.npz", "-o", out)
    _assert_clean_failure(result, out, "'x'", needle)


def test_data_float64_is_accepted(tmp_path, mlp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((4, 1, 16)))  # numpy's default float64
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--data", tmp_path / "d.npz", "-o", out, "--no-latency")
    assert result.exit_code == 0, result.output
    result = _run("eval", out, "--data", tmp_path / "d.npz")
    assert result.exit_code == 0, result.output
    assert "2 user sample(s)" in result.output or "4 user sample(s)" in result.output
    # eval times onnxruntime on the artifact's own (rewritten) model.onnx, not the original: the table says so
    assert "onnxruntime ran" in result.output and "rewritten model.onnx" in result.output


def test_threads_zero_is_rejected(tmp_path, mlp_path):
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--threads", "0", "-o", out)
    assert result.exit_code != 0 and "threads" in result.output.lower()
    assert not out.exists()


def test_error_text_with_brackets_is_printed_not_parsed_as_markup(tmp_path, mlp_path):
    # "[/fc*]" used to crash rich's markup parser (MarkupError traceback) instead of printing the error
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--passes", "prune(include=[/fc*],sparsity=1.5)", "-o", out)
    _assert_clean_failure(result, out, "sparsity")
    result = _run("compile", mlp_path, "--passes", "prune(include=[/fc*],sparsity=x)", "-o", out)
    _assert_clean_failure(result, out, "prune(include=[/fc*],sparsity=x)")


def test_unexpected_exception_is_one_line(tmp_path, mlp_path, monkeypatch):
    import effc.compiler

    def crash(*args, **kwargs):
        raise RuntimeError("simulated bug\nsecond line")

    monkeypatch.setattr(effc.compiler, "compile_model", crash)
    result = _run("compile", mlp_path, "-o", tmp_path / "out")
    assert result.exit_code == 3
    assert "Traceback" not in result.output
    assert "internal error: RuntimeError: simulated bug second line" in result.output
    assert "--debug" in result.output
    debug = CliRunner().invoke(cli, ["--debug", "compile", str(mlp_path), "-o", str(tmp_path / "out")])
    assert isinstance(debug.exception, RuntimeError)


def test_output_under_a_file(tmp_path, mlp_path):
    (tmp_path / "f.txt").write_text("x")
    out = tmp_path / "f.txt" / "out"
    result = _run("compile", mlp_path, "-o", out)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "which is a file" in result.output


def test_force_never_deletes_the_model_or_the_current_folder(tmp_path, mlp_path, monkeypatch):
    # `-o . --force` used to rename the current folder away and delete it, model included
    result = _run("compile", mlp_path, "-o", mlp_path.parent, "--force")
    assert result.exit_code != 0 and "refusing to replace" in result.output
    assert mlp_path.exists()
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    result = _run("compile", mlp_path, "-o", ".", "--force")
    assert result.exit_code != 0 and "refusing to replace" in result.output
    assert (work / "notes.txt").read_text() == "keep me"


def test_dump_ir_inside_output_is_rejected(tmp_path, mlp_path):
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "-o", out, "--dump-ir", out / "ir")
    _assert_clean_failure(result, out, "--dump-ir")


def test_input_shape_given_twice(tmp_path):
    # the last one used to win silently
    path = tmp_path / "dyn.onnx"
    make_mlp(path, dynamic_batch=True)
    out = tmp_path / "out"
    result = _run("compile", path, "-o", out, "--input-shape", "x=2x16", "--input-shape", "x=3x16")
    _assert_clean_failure(result, out, "two shapes", "'x'")


def test_unknown_target(tmp_path, mlp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", mlp_path, "--target", "tpu9000", "-o", out), out, "tpu9000", "cpu")


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert result.exception is not None


def test_compile_user_file_and_run_eval_verify(tmp_path, mlp_path):
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--passes", "prune(sparsity=0.5),cleanup", "-o", out)
    assert result.exit_code == 0, result.output
    for name in ("manifest.json", "model.onnx", "model.so", "report.json", "report.md"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["synthetic"] is True
    assert report["fidelity"]["compiled_vs_rewritten"]["summary"]["max_abs"] < 1e-4
    assert report["latency"]["threads"] == 1
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((3, 1, 16)).astype(np.float32))
    run = _run("run", out, "--data", data)
    assert run.exit_code == 0, run.output
    assert run.output.count("sample") == 3
    synthetic = _run("run", out)  # without --data the outputs come from generated inputs: say so
    assert synthetic.exit_code == 0 and "SYNTHETIC" in synthetic.output
    ev = _run("eval", out, "--data", data)
    assert ev.exit_code == 0, ev.output
    ver = _run("verify", out, "--data", data)
    assert ver.exit_code == 0, ver.output
    assert "verified" in ver.output


def test_verify_fails_on_tampered_artifact(tmp_path, mlp_path):
    out = tmp_path / "out"
    assert _run("compile", mlp_path, "-o", out, "--no-latency").exit_code == 0
    so = out / "model.so"
    blob = bytearray(so.read_bytes())
    blob[-1] ^= 0xFF
    so.write_bytes(bytes(blob))
    result = _run("verify", out)
    assert result.exit_code != 0
    assert "model.so" in result.output


def test_passes_lists_prune_and_options():
    result = _run("passes")
    assert result.exit_code == 0
    assert "prune" in result.output and "sparsity" in result.output
    assert "cleanup" in result.output


def test_inspect_lists_ops(mlp_path):
    result = _run("inspect", mlp_path)
    assert result.exit_code == 0, result.output
    assert "Gemm" in result.output and "MatMul" in result.output
    assert "MACs" in result.output


@pytest.mark.parametrize("args", [["--help"], ["compile", "--help"]])
def test_help_teaches(args):
    result = _run(*args)
    assert result.exit_code == 0
    assert "zoo:" in result.output or "compile" in result.output


@pytest.mark.skipif(
    __import__("shutil").which("qemu-system-arm") is None or __import__("shutil").which("arm-none-eabi-gcc") is None,
    reason="needs: apt-get install -y gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm",
)
def test_cortex_m4_compile_and_verify_in_qemu(tmp_path, mlp_path):
    out = tmp_path / "m4"
    result = _run("compile", mlp_path, "--target", "cortex-m4", "-o", out, "-O", "opt=-O2")
    assert result.exit_code == 0, result.output
    assert (out / "effc_model.c").exists() and (out / "Makefile").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["latency"] is None
    assert report["fidelity"]["compiled_vs_rewritten"]["summary"]["max_abs"] < 1e-5
    ver = _run("verify", out)
    assert ver.exit_code == 0, ver.output
    text = " ".join(ver.output.split())
    assert "instructions per inference" in text and "per MAC, 640 MACs" in text and "bit-exact output elements" in text
    assert "steps:" not in text and "{" not in text  # a table, not raw dicts
    assert "reference: onnxruntime running the artifact's own model.onnx" in ver.output


def test_bad_target_option_syntax(tmp_path, mlp_path):
    out = tmp_path / "out"
    _assert_clean_failure(_run("compile", mlp_path, "-O", "schedule", "-o", out), out, "KEY=VALUE")


def test_calibration_samples_reach_the_pass(tmp_path, mlp_path, monkeypatch):
    from effc.ir.calibration import Calibration

    seen = []
    tap = Calibration.tap

    def counting_tap(self, *args, **kwargs):
        seen.append(len(self))
        return tap(self, *args, **kwargs)

    monkeypatch.setattr(Calibration, "tap", counting_tap)
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--passes", "prune(sparsity=0.5,method=wanda,min_params=0)",
                  "--calibration-samples", 3, "-o", out, "--no-latency")
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {3}  # wanda's taps ran over exactly the 3 samples asked for
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 3
    assert [text.split("(")[0] for text in manifest["calibration"]["used_by"]] == ["prune"]
    report = json.loads((out / "report.json").read_text())
    assert report["inputs"]["calibration_samples"] == 3
    assert "calibration: 3 sample(s)" in result.output


def test_calibration_samples_split_user_data(tmp_path, mlp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((6, 1, 16)).astype(np.float32))
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--data", tmp_path / "d.npz", "--calibration-samples", 2, "--eval-samples", 3,
                  "-o", out, "--no-latency")
    assert result.exit_code == 0, result.output
    inputs = json.loads((out / "report.json").read_text())["inputs"]
    assert (inputs["calibration_samples"], inputs["count"]) == (2, 3)
    assert json.loads((out / "manifest.json").read_text())["calibration"]["samples"] == 2
    assert "calibration:" not in result.output  # no pass used them: no line about them


def test_calibration_samples_beyond_the_data_is_one_clear_error(tmp_path, mlp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 1, 16), np.float32))
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "--data", tmp_path / "d.npz", "--calibration-samples", 4, "-o", out)
    _assert_clean_failure(result, out, "--calibration-samples", "holds 4", "3 or fewer")


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_calibration_samples_bad_value(tmp_path, mlp_path, value):
    result = _run("compile", mlp_path, "--calibration-samples", value, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output  # click's usage error: no build, no traceback
    assert "--calibration-samples" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_compile_help_states_calibration_default():
    from effc.compiler import DEFAULT_CALIBRATION_SAMPLES

    text = " ".join(_run("compile", "--help").output.split())
    assert f"Default: {DEFAULT_CALIBRATION_SAMPLES} zoo or synthetic samples" in text
    assert "reconstruct=block wants 128-512" in text


def _activation_quantized_artifact(tmp_path, mode="weight_act"):
    path = tmp_path / "mlp64.onnx"
    make_mlp(path, in_dim=64, hidden=64, out_dim=8)
    out = tmp_path / f"out-{mode}"
    passes = f"block-quant(format=mxint8,mode={mode},min_params=0)"
    result = _run("compile", path, "--passes", passes, "-o", out, "--no-latency")
    assert result.exit_code == 0, result.output
    return out


def test_verify_uses_quantization_aware_check_for_activation_quantization(tmp_path):
    out = _activation_quantized_artifact(tmp_path)
    ver = _run("verify", out)
    assert ver.exit_code == 0, ver.output
    text = " ".join(ver.output.split())
    assert "quantization-aware (model.onnx quantizes activations at run time in 2 node(s))" in text
    assert "rel L2 error <= 1.5 x the rel L2 change the activation quantization itself makes" in text
    line = next(ln for ln in ver.output.splitlines() if ln.startswith("output y:"))
    assert "cosine" in line and "rel L2" in line and "activation quantization alone" in line
    assert line.endswith("[quantized] ok")
    plain = _run("verify", out, "--atol", 1e-4)  # an explicit --atol is a plain max-abs check
    assert "criterion: max abs diff <= 0.0001" in plain.output and "[atol]" in plain.output
    assert "activation quantization alone" not in plain.output


def test_verify_keeps_plain_atol_for_weight_only(tmp_path):
    out = _activation_quantized_artifact(tmp_path, mode="weight")
    ver = _run("verify", out)
    assert ver.exit_code == 0, ver.output
    assert "criterion: max abs diff <= 0.0001" in ver.output and "[atol] ok" in ver.output


def test_long_steps_log_at_default_verbosity():
    """Tuning and the block / whole-model fits take minutes: their INFO lines (plan, progress) show without -v."""
    import logging

    assert _run("targets").exit_code == 0
    for name in ("effc.codegen.tune", "effc.passes.block_recon", "effc.passes.model_recon"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.INFO
