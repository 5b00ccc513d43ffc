"""Lossy passes after a sparsifying pass keep its zero pattern (issue 20, sparseml PR #2281 class).

``nm-sparsity(pack=false)`` then ``block-quant`` in every format × {plain rounding, GPTQ, LoRC}: the weight the
quantized model computes with (probed with an identity input under onnxruntime, whose function bodies the compiled
kernels match, tests/ops/test_registry.py) is still 2:4 with exactly the pruned positions zero. Packed N:M layers
are refused with an error naming the layer and the fix, never skipped silently.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.errors import PassError
from effc.ir.calibration import Calibration
from effc.ir.reference import Reference
from effc.ops.block_formats import FORMATS
from effc.passes.block_quant import BlockQuantPass
from effc.passes.nm_sparsity import NMSparsityPass

K = N = 64


def _matmul_model(seed: int = 0, opset: int = 17) -> ir.Model:
    """``Y = Identity(X @ W)``, ``X`` and ``W`` ``(64, 64)`` (so an identity input reads ``W`` back)."""
    w = np.random.default_rng(seed).standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Identity", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, N])], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _calibration() -> Calibration:
    rng = np.random.default_rng(1)
    scale = np.exp(rng.standard_normal(K)).astype(np.float32)  # uneven channels: GPTQ's updates are large
    return Calibration([{"x": (rng.standard_normal((K, K)) * scale).astype(np.float32)} for _ in range(4)], "random")


def _weight(model: ir.Model) -> np.ndarray:
    return Reference(model).run({"x": np.eye(K, dtype=np.float32)})[0]


# int4_asym stores w = d·q + m per block (GGUF Q4_1): a zero stays zero only where the block's minimum lands on the
# grid, so a 2:4 pattern does not survive it (llama.cpp's Q4_1 has the same property); the symmetric formats keep 0.
ZERO_KEEPING = sorted(f for f in FORMATS if f != "int4_asym")


@pytest.mark.parametrize("compensation", ["none", "gptq", "lorc"])
@pytest.mark.parametrize("fmt", ZERO_KEEPING)
def test_two_four_pattern_survives_block_quant(fmt, compensation):
    model = _matmul_model()
    NMSparsityPass(n=2, m=4, method="magnitude", reconstruct="false", pack=False)(model)
    pruned = model.graph.initializers["w"].const_value.numpy() == 0
    assert (pruned.reshape(K // 4, 4, N).sum(axis=1) == 2).all()
    options = {"gptq": compensation == "gptq", "lorc_rank": 8 if compensation == "lorc" else 0}
    quant = BlockQuantPass(format=fmt, min_params=0, calibration=_calibration(), **options)
    quant(model)
    w = _weight(model)
    assert quant.stats["layers"]["w"]["params"] == K * N  # the layer was quantized, not skipped
    assert (w[pruned] == 0).all(), f"{int((w[pruned] != 0).sum())} pruned weights refilled"
    assert ((w != 0).reshape(K // 4, 4, N).sum(axis=1) <= 2).all()
    assert np.count_nonzero(w) > 0.45 * K * N  # the kept weights are still there
    if compensation == "lorc":  # a low-rank branch is dense: LoRC leaves sparse layers alone and says so
        assert quant.stats["layers"]["w"]["lorc_rank"] == 0
        assert quant.stats["lorc_skipped"] == [{"weight": "w", "reason": "weight has 2048 zeros (50.0%) that a "
                                                "low-rank correction would refill"}]


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_two_four_pattern_survives_dequantize_linear(fmt):
    # opset 21: int blocks are stored for a standard blocked DequantizeLinear instead of an effc operator
    model = _matmul_model(opset=21)
    NMSparsityPass(n=2, m=4, method="magnitude", reconstruct="false", pack=False)(model)
    pruned = model.graph.initializers["w"].const_value.numpy() == 0
    BlockQuantPass(format=fmt, min_params=0, gptq=True, calibration=_calibration())(model)
    assert "DequantizeLinear" in [n.op_type for n in model.graph]
    w = _weight(model)
    assert (w[pruned] == 0).all() and np.count_nonzero(w) > 0.45 * K * N


def test_packed_nm_layers_are_refused_with_a_hint_that_works():
    model = _matmul_model()
    NMSparsityPass(n=2, m=4, method="magnitude", reconstruct="false")(model)
    with pytest.raises(PassError) as err:
        BlockQuantPass(format="mxfp4", min_params=0)(model)
    message = str(err.value)
    assert "1 selected layer(s) are N:M-packed" in message and "fc/nm" in message and "pack=false" in message
    hint = re.search(r"exclude=\[([^\]]+)\]", message).group(1)
    assert hint == "*/nm"  # one glob for every packed layer, not one retry per layer
    result = BlockQuantPass(format="mxfp4", min_params=0, exclude=tuple(hint.split(",")))(model)  # the hint works
    assert not result.modified


@pytest.mark.parametrize("exclude", ["fc/nm", "*/nm"])
def test_excluded_packed_layers_stay_packed(exclude):
    model = _matmul_model()
    NMSparsityPass(n=2, m=4, method="magnitude", reconstruct="false")(model)
    before = _weight(model)
    result = BlockQuantPass(format="mxfp4", min_params=0, exclude=(exclude,))(model)
    assert not result.modified
    assert [n.op_type for n in model.graph] == ["NMSparseMatMul", "Identity"]
    np.testing.assert_array_equal(_weight(model), before)


def test_lorc_applies_to_a_dense_weight_with_a_stray_zero():
    model = _matmul_model()
    w = model.graph.initializers["w"].const_value.numpy().copy()
    w[3, 5] = 0.0  # one exact zero is no sparsity pattern
    model.graph.initializers["w"].const_value = ir.tensor(w, name="w")
    quant = BlockQuantPass(format="mxfp4", min_params=0, lorc_rank=8)
    quant(model)
    assert quant.stats["layers"]["w"]["lorc_rank"] == 8 and quant.stats["lorc_skipped"] == []
    assert "MatMul" in [n.op_type for n in model.graph]  # the low-rank branch X @ U @ V


def test_nm_sparsity_after_block_quant_names_the_order_fix():
    from effc.passes.manager import PassManager

    model = _matmul_model()
    BlockQuantPass(format="mxfp4", min_params=0)(model)
    nm = NMSparsityPass(n=2, m=4)
    assert not nm(model).modified
    assert [s["reason"] for s in nm.stats["skipped"]] == [
        "already block-quantized (effc.BlockQuantMatMul): run nm-sparsity before block-quant"]
    assert "run nm-sparsity before block-quant" in nm.unchanged_reason()
    with pytest.raises(PassError, match="before block-quant"):
        PassManager("block-quant(format=mxfp4,min_params=0),nm-sparsity(n=2,m=4)", strict=True, save_replay=False).run(
            _matmul_model())


def test_unpacked_nm_sparsity_reports_the_dense_bytes_it_keeps():
    nm = NMSparsityPass(n=2, m=4, method="magnitude", reconstruct="false", pack=False)
    nm(_matmul_model())
    assert nm.stats["weight_bytes_before"] == nm.stats["weight_bytes_after"] == K * N * 4
    assert nm.stats["layers"][0]["dense_bytes"] == K * N * 4 and nm.stats["layers"][0]["packed_bytes"] is None


@pytest.mark.parametrize("fmt", ["mxfp4", "int8"])
def test_sparsity_stats_count_the_zeros_of_quantized_pruned_weights(fmt):
    from effc.eval.cost import sparsity_stats

    model = _matmul_model()
    NMSparsityPass(n=2, m=4, method="magnitude", reconstruct="false", pack=False)(model)
    BlockQuantPass(format=fmt, min_params=0)(model)
    rows = [r for r in sparsity_stats(model)["tensors"].values() if r["storage"] == f"block-quantized {fmt}"]
    assert len(rows) == 1 and rows[0]["shape"] == [N, K] and rows[0]["elements"] == K * N
    assert rows[0]["zeros"] == int(K * N - np.count_nonzero(_weight(model)))  # what the model computes with
    assert rows[0]["sparsity"] >= 0.5
