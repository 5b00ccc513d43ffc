"""Cortex-M target: generated C compiles warning-free, firmware in QEMU matches onnxruntime, budgets, errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from effc.errors import BudgetError, TargetError
from effc.targets import get_target
from effc.targets.cortex_m import firmware
from effc.targets.cortex_m.budget import parse_bytes
from effc.targets.cortex_m.verify import reference_session, verify_artifact

ROOT = Path(__file__).resolve().parents[2]
needs_toolchain = pytest.mark.skipif(
    not firmware.have_toolchain(),
    reason="arm-none-eabi-gcc/qemu-system-arm missing: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi "
    "qemu-system-arm",
)


def _digits():
    spec = importlib.util.spec_from_file_location("digits_mcu", ROOT / "examples" / "digits_mcu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DIGITS = _digits()


@pytest.fixture(scope="module")
def split():
    return DIGITS.digits_split()


@pytest.fixture(scope="module")
def mlp(split):
    x_train, _, y_train, _ = split
    return DIGITS.train_mlp(x_train, y_train)


@pytest.fixture(scope="module")
def cnn(split):
    x_train, _, y_train, _ = split
    return DIGITS.train_cnn(x_train, y_train)


def _artifact(model: ir.Model, target: str, out: Path, **options) -> dict:
    """What effc.compile writes for an MCU target, minus the pass pipeline: C files, model.onnx, manifest."""
    from effc.runtime.manifest import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    result = get_target(target).build(model, out, options)
    ir.save(model, out / "model.onnx")
    io = {
        "inputs": [{"name": v.name, "shape": list(v.shape.numpy()), "dtype": "float32"} for v in model.graph.inputs],
        "outputs": [{"name": v.name, "shape": list(v.shape.numpy()), "dtype": "float32"} for v in model.graph.outputs],
    }
    write_manifest(out, {"target": {"name": target, "options": options, "info": result.info}, **io})
    return result.info


def _accuracy_check(model, split, target, tmp_path, n=60):
    _, x_test, _, y_test = split
    info = _artifact(model, target, tmp_path / target)
    shape = [int(d) for d in model.graph.inputs[0].shape.numpy()]
    feeds = [{"pixels": x.reshape(shape)} for x in x_test[:n]]
    check = verify_artifact(tmp_path / target, feeds_list=feeds)
    sess = reference_session(tmp_path / target / "model.onnx")
    ort_pred = np.array([sess.run(None, f)[0].argmax() for f in feeds])
    fw_pred = np.array([o[0].argmax() for o in check.outputs])
    return info, check, ort_pred, fw_pred, y_test[:n]


def test_parse_bytes():
    assert parse_bytes("1M", "flash") == 1024**2
    assert parse_bytes("256K", "ram") == 256 * 1024
    assert parse_bytes(4096, "ram") == 4096
    assert parse_bytes("1.5MB", "flash") == 1536 * 1024
    with pytest.raises(TargetError, match="--ram"):
        parse_bytes("lots", "ram")


def test_targets_registered():
    for name in ("cortex-m3", "cortex-m4", "cortex-m7", "cortex-m33"):
        target = get_target(name)
        assert target.name == name and target.qemu_machine.startswith("mps2")
    assert get_target("cortex-m3").fpu is None and get_target("cortex-m4").dsp


@needs_toolchain
def test_mlp_fp32_m4_matches_onnxruntime(mlp, split, tmp_path):
    info, check, ort_pred, fw_pred, y = _accuracy_check(mlp, split, "cortex-m4", tmp_path)
    assert check.ok and max(check.max_abs.values()) <= 1e-5
    assert (fw_pred == ort_pred).all()
    assert (fw_pred == y).mean() > 0.9
    assert info["flash"]["weight_bytes"] == (64 * 32 + 32 + 32 * 10 + 10) * 4
    assert 0 < info["flash"]["code_bytes"] < 4096
    assert info["ram"]["arena_bytes"] >= 32 * 4
    # 64x32 + 32x10 = 2368 MACs; naive loops are well under 20 instructions per MAC on an M4F.
    assert 2368 < check.instructions_per_inference < 20 * 2368


@needs_toolchain
def test_generated_c_is_warning_free(mlp, tmp_path):
    out = tmp_path / "art"
    _artifact(mlp, "cortex-m4", out)
    names = sorted(p.name for p in out.iterdir())
    for f in ("effc_model.h", "effc_model.c", "effc_weights.c", "effc_workspace.c", "main.c", "Makefile"):
        assert f in names
    assert "int effc_model_run(const float* pixels, float* logits);" in (out / "effc_model.h").read_text()
    for src in ("effc_model.c", "effc_weights.c", "effc_workspace.c", "main.c"):
        proc = subprocess.run(
            [
                "arm-none-eabi-gcc",
                "-mcpu=cortex-m4",
                "-mthumb",
                "-std=c99",
                "-Wall",
                "-Wextra",
                "-O2",
                "-c",
                str(out / src),
                "-o",
                str(tmp_path / "x.o"),
            ],
            capture_output=True,
            text=True,  # fmt: skip
        )
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@needs_toolchain
def test_cnn_fp32_m4_and_m3(cnn, split, tmp_path):
    for target in ("cortex-m4", "cortex-m3"):
        info, check, ort_pred, fw_pred, y = _accuracy_check(cnn, split, target, tmp_path, n=40)
        assert check.ok, check.summary()
        assert (fw_pred == ort_pred).all()
        assert (fw_pred == y).mean() > 0.85
        if target == "cortex-m4":
            acc = (check.instructions_per_inference, info)
    assert info["ram"]["arena_bytes"] > 0
    # effc's schedule vs TVM's naive loops: fewer instructions and less kernel scratch, same results.
    _, x_test, _, _ = split
    naive_info = _artifact(cnn, "cortex-m4", tmp_path / "naive", schedule="naive")
    naive = verify_artifact(tmp_path / "naive", feeds_list=[{"pixels": x_test[0].reshape(1, 1, 8, 8)}])
    assert naive.ok
    assert acc[0] < 0.8 * naive.instructions_per_inference
    assert acc[1]["ram"]["scratch_bytes"] < naive_info["ram"]["scratch_bytes"]
    assert all(k["schedule"] == "effc-acc" for k in acc[1]["kernels"] if "conv2d" in k["name"])
    assert {k["schedule"] for k in naive_info["kernels"]} == {"naive"}


@needs_toolchain
def test_runtime_runner_runs_in_qemu(mlp, tmp_path):
    out = tmp_path / "art"
    _artifact(mlp, "cortex-m3", out)
    manifest = json.loads((out / "manifest.json").read_text())
    runner = get_target("cortex-m3").load(out, manifest)
    x = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 64)
    (got,) = runner.run({"pixels": x})
    (ref,) = reference_session(out / "model.onnx").run(None, {"pixels": x})
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_over_budget_raises_and_writes_nothing(mlp, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(BudgetError) as err:
        get_target("cortex-m4").build(mlp, out, {"flash": "4K"})
    text = str(err.value)
    assert "flash needs" in text and "(64, 32) float32 8.0 KiB" in text and "block-quant" in text
    assert list(out.iterdir()) == []
    with pytest.raises(BudgetError, match="RAM needs"):
        get_target("cortex-m4").build(mlp, out, {"ram": 64})
    assert list(out.iterdir()) == []


def test_unknown_option_is_rejected(mlp, tmp_path):
    with pytest.raises(TargetError, match="unknown option"):
        get_target("cortex-m4").build(mlp, tmp_path, {"flsh": "1M"})


@needs_toolchain
def test_int8_weights_stay_int8_and_match(mlp, cnn, split, tmp_path):
    for name, model in (("mlp", mlp), ("cnn", cnn)):
        qmodel = DIGITS.int8_weights(model)
        for target in ("cortex-m4", "cortex-m3"):
            info, check, ort_pred, fw_pred, y = _accuracy_check(qmodel, split, target, tmp_path / name, n=40)
            assert check.ok, check.summary()  # dequantize in the kernel: same products as onnxruntime, 1e-5
            assert (fw_pred == ort_pred).all()
            assert (fw_pred == y).mean() > 0.85
        dtypes = [w["dtype"] for w in info["weights"]]
        assert dtypes.count("int8") == (2 if name == "mlp" else 3)
        assert "effc_q" in " ".join(k["name"] for k in info["kernels"])
    assert info["flash"]["weight_bytes"] < 3000  # CNN: 1976 int8 weights + fp32 scales/biases
