"""Cortex-M int8 activations: QDQ layers on effc's int8 micro-kernels (DSP on M4, plain C on M3) vs onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from effc.codegen.mcu.s8_rewrite import OP_CONV, OP_DWCONV, OP_MATMUL, fixed_point, pack_pairs, rewrite_s8_layers
from effc.targets import get_target
from effc.targets.cortex_m.verify import reference_session, verify_artifact
from tests.targets import test_cortex_m as base

DIGITS, needs_toolchain = base.DIGITS, base.needs_toolchain
split = base.split  # the digits split fixture, shared


@pytest.fixture(scope="module")
def models(split):
    x_train, _, y_train, _ = split
    fp32 = {"mlp": DIGITS.train_mlp(x_train, y_train), "cnn": DIGITS.train_cnn(x_train, y_train)}
    return {k: (m, DIGITS.int8_static(m, x_train[:200])) for k, m in fp32.items()}


def _artifact(model: ir.Model, target: str, out: Path) -> dict:
    from effc.runtime.manifest import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    result = get_target(target).build(model, out, {})
    ir.save(model, out / "model.onnx")

    def spec(v):
        return {"name": v.name, "shape": list(v.shape.numpy()), "dtype": v.dtype.numpy().name}

    write_manifest(out, {"target": {"name": target, "options": {}, "info": result.info},
                         "inputs": [spec(v) for v in model.graph.inputs],
                         "outputs": [spec(v) for v in model.graph.outputs]})  # fmt: skip
    return result.info


def test_fixed_point_multiplier():
    real = np.array([1e-4, 0.0123, 0.5, 0.99999, 3.7])
    mult, shift = fixed_point(real)
    assert ((mult >= 2**30) & (mult.astype(np.int64) < 2**31)).all()
    np.testing.assert_allclose(mult / 2.0**shift, real, rtol=2**-30)
    with pytest.raises(ValueError):
        fixed_point(np.array([0.0]))


def test_pack_pairs_layout():
    w = np.arange(3 * 6, dtype=np.int8).reshape(3, 6)  # N=3 (odd: zero row added), K=6 (4 + tail 2)
    got = pack_pairs(w)
    pair0 = [0, 1, 2, 3, 6, 7, 8, 9, 4, 5, 10, 11]
    pair1 = [12, 13, 14, 15, 0, 0, 0, 0, 16, 17, 0, 0]
    assert got.tolist() == pair0 + pair1


def test_rewrite_structure(models):
    for name, (_, qmodel) in models.items():
        rewritten, layers = rewrite_s8_layers(qmodel)
        ops = [n.op_type for n in rewritten.graph]
        want = [OP_MATMUL] * 2 if name == "mlp" else [OP_CONV, OP_CONV, OP_MATMUL]
        assert [n.op_type for n in rewritten.graph if n.domain == "effc"] == want
        # only the input quantize and the output dequantize stay in float; pools/reshapes run on int8
        assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
        assert all(layer.weights.dtype == np.int8 for layer in layers)
        assert len(list(qmodel.graph)) > len(ops)  # the input model is untouched


@needs_toolchain
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_digits_int8_activations_m4_m3(kind, models, split, tmp_path):
    fp32, qmodel = models[kind]
    _, x_test, _, y_test = split
    shape = [int(d) for d in qmodel.graph.inputs[0].shape.numpy()]
    feeds = [{"pixels": x.reshape(shape)} for x in x_test[:60]]
    out_scale = float(next(n for n in qmodel.graph if n.op_type == "DequantizeLinear" and n.outputs[0].name
                           == "logits").inputs[1].const_value.numpy())  # fmt: skip
    weight_only = _artifact(DIGITS.int8_weights(fp32), "cortex-m4", tmp_path / "wo")
    for target, schedule in (("cortex-m4", "effc-s8-dsp"), ("cortex-m3", "effc-s8-c")):
        info = _artifact(qmodel, target, tmp_path / target)
        check = verify_artifact(tmp_path / target, feeds_list=feeds)
        assert check.ok, check.summary()  # every logit within one output quantization step of onnxruntime
        assert check.steps["logits"] == pytest.approx(out_scale)
        ref = reference_session(tmp_path / target / "model.onnx")
        ort_out = np.stack([ref.run(None, f)[0] for f in feeds])
        fw_out = np.stack([o[0] for o in check.outputs])
        steps = np.round(np.abs(ort_out.astype(np.float64) - fw_out) / out_scale)
        assert steps.max() <= 1 and (steps == 1).mean() < 0.05
        assert check.one_step["logits"] == int((steps == 1).sum())
        assert (ort_out.argmax(-1) == fw_out.argmax(-1)).all()
        assert (fw_out.reshape(len(feeds), -1).argmax(-1) == y_test[: len(feeds)]).mean() > 0.85
        assert {k["schedule"] for k in info["kernels"] if k["name"].startswith("effc_s8_")} == {schedule}
        # activations int8 in the arena: less RAM than the weight-only build (fp32 activations)
        assert info["ram"]["arena_bytes"] < weight_only["ram"]["arena_bytes"]
        assert [w["dtype"] for w in info["weights"]].count("int8") == (2 if kind == "mlp" else 3)


@needs_toolchain
def test_depthwise_conv_matches_onnxruntime(tmp_path):
    model = DIGITS.int8_layer("Conv", [1, 8, 7, 9], 8, kernel=3, depthwise=True)
    _, layers = rewrite_s8_layers(model)
    assert [layer.op for layer in layers] == [OP_DWCONV]
    rng = np.random.default_rng(2)
    feeds = [{"xq": rng.integers(-128, 128, size=(1, 8, 7, 9), dtype=np.int8)} for _ in range(2)]
    for target in ("cortex-m4", "cortex-m3"):
        _artifact(model, target, tmp_path / target)
        check = verify_artifact(tmp_path / target, feeds_list=feeds)
        assert check.ok and check.bit_exact > 0.9, check.summary()


@needs_toolchain
@pytest.mark.parametrize("op, x_shape, n", [("Conv", [1, 32, 6, 6], 64), ("Gemm", [2, 256], 64)])
def test_single_layer_under_two_instructions_per_mac_on_m4(op, x_shape, n, tmp_path):
    model = DIGITS.int8_layer(op, x_shape, n)
    rng = np.random.default_rng(1)
    feeds = [{"xq": rng.integers(-128, 128, size=x_shape, dtype=np.int8)} for _ in range(3)]
    for target in ("cortex-m4", "cortex-m3"):
        _artifact(model, target, tmp_path / target)
        check = verify_artifact(tmp_path / target, feeds_list=feeds)
        assert check.ok, check.summary()  # int8 outputs within one step of onnxruntime
        assert check.steps == {"yq": 1.0}
        assert check.bit_exact > 0.9
        if target == "cortex-m4":
            assert check.instructions_per_mac is not None and check.instructions_per_mac <= 2.0, check.summary()
