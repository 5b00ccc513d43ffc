"""effc's fixes of standard ops TVM lowers wrongly: the onnx backend cases that were WRONG now pass or are refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import effc
from benchmarks import onnx_conformance as conformance
from effc import runtime

#: Cases that compiled to wrong numbers before effc.codegen.std_ops / effc.ir.empty_reduce (onnx 1.23 names).
FIXED = [
    "test_spacetodepth_crd_mode_example", "test_isinf_positive", "test_isinf_negative",
    "test_mod_float_edge_cases_fmod_0_float32", "test_bitshift_right_int8_shift_ge_width",
    "test_bitshift_left_int32_negative_shift", "test_bitshift_right_int32_negative_shift",
    "test_reduce_max_empty_set", "test_reduce_min_empty_set", "test_reduce_sum_empty_set",
    "test_cast_FLOAT_to_FLOAT8E4M3FN", "test_cast_no_saturate_FLOAT_to_FLOAT8E4M3FN",
    "test_layer_normalization_4d_axis0", "test_convtranspose_output_shape",
    "test_attention_23_boolmask_fullymasked_row_nan_robustness", "test_attention_4d_fp16",
    # float8 casts: FNUZ bias, E5M2 NaN codes, subnormals, saturate=0 through CastLike (onnxscript dropped it)
    "test_cast_FLOAT_to_FLOAT8E4M3FNUZ", "test_cast_FLOAT8E4M3FNUZ_to_FLOAT", "test_cast_FLOAT8E5M2_to_FLOAT",
    "test_cast_FLOAT8E4M3FN_to_FLOAT", "test_cast_no_saturate_FLOAT16_to_FLOAT8E5M2FNUZ",
    "test_castlike_no_saturate_FLOAT_to_FLOAT8E5M2", "test_cast_FLOAT_to_BFLOAT16",
    # 0-d inputs (np.ascontiguousarray made them 1-d), Constant value_ints output, RMSNormalization over all axes
    "test_clip_example", "test_gemm_default_scalar_bias", "test_shape_example", "test_rms_normalization_2d_axis0",
    # Resize 'axes', OneHot with run-time values / float depth, Pow of mixed and integer types
    "test_resize_upsample_scales_nearest_axes_3_2", "test_resize_tf_crop_and_resize_axes_2_3",
    "test_onehot_negative_indices", "test_onehot_with_axis", "test_pow_types_int64_float32",
    "test_pow_types_int32_int32",
    # NonMaxSuppression: thresholds used (TVM substituted defaults for inputs), IoU == threshold kept
    "test_nonmaxsuppression_suppress_by_IOU_and_scores", "test_nonmaxsuppression_iou_threshold_boundary",
    # Resize keep_aspect_ratio_policy (TVM ignored it: wrong output shapes once 'axes' imported)
    "test_resize_upsample_sizes_nearest_not_larger", "test_resize_downsample_sizes_nearest_not_larger",
]
#: Cases effc refuses with a message naming the attribute and a fix (TVM has no correct lowering).
REFUSED = {
    "test_batchnorm_example_training_mode": "training_mode=1",
    "test_resize_downsample_scales_linear": "give 'sizes' instead of 'scales'",
    "test_resize_downsample_sizes_linear_antialias": "antialias=1",
    "test_cast_e8m0_FLOAT_to_FLOAT8E8M0": "float8_e8m0",
    "test_resize_downsample_sizes_nearest_not_smaller": "keep_aspect_ratio_policy='not_smaller'",
}
#: Cases whose reference needs ml_dtypes feeds (bfloat16 / float8): the agreement gate now checks them too.
GATED = ["test_cast_BFLOAT16_to_FLOAT", "test_cast_FLOAT8E5M2FNUZ_to_FLOAT16"]


@pytest.fixture(scope="module")
def cases():
    return {c.name: c for c in conformance.collect_cases(names=set(FIXED) | set(REFUSED) | set(GATED))}


@pytest.mark.parametrize("name", FIXED)
def test_previously_wrong_case_passes(name, cases, tmp_path):
    # gate off: onnx's expected outputs judge the lowering (onnxruntime's Python bindings cannot feed float8)
    result = conformance.run_effc(cases[name], freeze=True, gate=False, workdir=tmp_path)
    assert result["class"] == "PASS", result["detail"]


@pytest.mark.parametrize("name", GATED)
def test_narrow_float_case_passes_with_the_gate_on(name, cases, tmp_path):
    result = conformance.run_effc(cases[name], freeze=True, gate=True, workdir=tmp_path)
    assert result["class"] == "PASS", result["detail"]


def test_nonmaxsuppression_with_run_time_thresholds_is_refused(tmp_path):
    (case,) = conformance.collect_cases(names={"test_nonmaxsuppression_suppress_by_IOU_and_scores"})
    result = conformance.run_effc(case, freeze=False, gate=True, workdir=tmp_path)
    assert result["class"] == "CLEAN_ERROR" and "run-time" in result["detail"], result["detail"]


def test_tile_is_never_silently_wrong(cases, tmp_path):
    # LLVM 22's loop vectorizer drops a modulo of TVM's tile kernel on AVX-512 (mcpu znver4): the gate refuses it
    (case,) = conformance.collect_cases(names={"test_tile"})
    result = conformance.run_effc(case, freeze=True, gate=True, workdir=tmp_path)
    assert result["class"] == "PASS" or (result["class"] == "CLEAN_ERROR" and "Tile" in result["detail"]), result


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_attribute_is_refused_by_name(name, cases, tmp_path):
    result = conformance.run_effc(cases[name], freeze=True, gate=True, workdir=tmp_path)
    assert result["class"] == "CLEAN_ERROR" and REFUSED[name] in result["detail"], result["detail"]


@pytest.mark.parametrize("fast_math", [True, False])
def test_relu_keeps_nan(tmp_path, fast_math):
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["h"]), helper.make_node("Relu", ["h"], ["y"], name="relu")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(np.array([np.nan, 0, 0, 0], np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[1.0, -1.0, 2.0, np.nan]], np.float32)
    effc.compile(model, out_dir=tmp_path / "out", data=[{"x": x}], measure_latency=False,
                 target_options={"fast_math": fast_math})
    y = runtime.load(tmp_path / "out").run({"x": x})[0]
    np.testing.assert_array_equal(y, np.array([[np.nan, 0.0, 2.0, np.nan]], np.float32))
