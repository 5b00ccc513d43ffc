"""Relax conv rewrites: which convs they rewrite, and compiled results against onnxruntime single-node models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tvm

from benchmarks.conv_kernels import make_model
from effc.codegen.conv_rewrite import rewrite_convs
from effc.codegen.cpu import compile_cpu
from effc.codegen.frontend import to_relax

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": 2})
RNG = np.random.default_rng(0)


def _model(op: str, x_shape, w_shape, act: str | None = None, strides=(1, 1), group: int = 1) -> onnx.ModelProto:
    """One ``op`` node with constant weight and bias, optionally followed by ``act`` (no padding)."""
    return make_model(op, x_shape, w_shape, strides, (0, 0, 0, 0), group, act)


def _compile_and_compare(model: onnx.ModelProto, x_shape) -> None:
    x = RNG.standard_normal(x_shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, {"x": x})[0]
    executable, _ = compile_cpu(to_relax(ir.from_proto(model)), TARGET, {"fast_math": True})
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x))
    got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def _ops(mod: tvm.IRModule) -> str:
    return mod["main"].script()


@pytest.mark.parametrize(
    "x_shape,w_shape,act",
    [((1, 6, 10, 12), (6, 5, 2, 2), "Sigmoid"), ((1, 4, 7, 9), (4, 1, 2, 2), None), ((2, 3, 5, 5), (3, 2, 3, 3), None)],
)
def test_transposed_conv_with_kernel_equal_stride_becomes_conv_and_matches_ort(x_shape, w_shape, act):
    k = w_shape[2]
    model = _model("ConvTranspose", x_shape, w_shape, act, strides=[k, k])
    mod, counts = rewrite_convs(to_relax(ir.from_proto(model)), lanes=8)
    assert counts.get("transpose_as_conv", 0) == 1
    text = _ops(mod)
    assert "conv2d_transpose" not in text and "R.nn.conv2d(" in text and "R.permute_dims" in text
    _compile_and_compare(model, x_shape)


def test_overlapping_transposed_conv_is_left_alone():
    model = _model("ConvTranspose", (1, 4, 6, 6), (4, 3, 3, 3), strides=[2, 2])
    mod, counts = rewrite_convs(to_relax(ir.from_proto(model)), lanes=8)
    assert counts == {}
    assert "conv2d_transpose" in _ops(mod)


def test_one_dimensional_conv_output_padded_to_tile_and_sliced():
    # (1, C, L, 1) with 5 taps, L_out = 104 - 5 + 1 = 100: at least 4 tiles of 3 * 8 lanes → padded to 120.
    model = _model("Conv", (1, 8, 104, 1), (12, 8, 5, 1), "Relu")
    mod, counts = rewrite_convs(to_relax(ir.from_proto(model)), lanes=8)
    assert counts == {"pad_output_to_tile": 1}
    text = _ops(mod)
    assert "R.strided_slice" in text and "(1, 12, 120, 1)" in text
    _compile_and_compare(model, (1, 8, 104, 1))


def test_conv_with_tile_multiple_width_is_left_alone():
    model = _model("Conv", (1, 4, 10, 66), (8, 4, 3, 3))  # output width 64
    _, counts = rewrite_convs(to_relax(ir.from_proto(model)), lanes=8)
    assert counts == {}


@pytest.mark.parametrize("hw,flat", [((20, 20), 400), ((10, 10), 112)])
def test_pointwise_conv_on_narrow_image_runs_as_1d_conv(hw, flat):
    # 20x20 = 400 pixels is a tile multiple; 10x10 = 100 is not and is padded to 112 (then sliced back).
    x_shape = (1, 16, *hw)
    model = _model("Conv", x_shape, (24, 16, 1, 1), "HardSwish")
    mod, counts = rewrite_convs(to_relax(ir.from_proto(model)), lanes=8)
    assert counts == {"pointwise_as_1d": 1}
    assert f"(1, 24, {flat}, 1)" in _ops(mod)
    _compile_and_compare(model, x_shape)


def test_pointwise_conv_on_tile_multiple_width_is_left_alone():
    model = _model("Conv", (1, 8, 4, 32), (8, 8, 1, 1))
    _, counts = rewrite_convs(to_relax(ir.from_proto(model)), lanes=8)
    assert counts == {}
