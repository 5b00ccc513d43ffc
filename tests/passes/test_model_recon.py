"""Model-level reconstruction (``reconstruct=model``): all pruned layers fitted to the dense model's outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.errors import CalibrationError, PassError, PipelineError
from effc.ir.reference import Reference
from effc.ops.nm_sparse import packed_layers
from effc.passes import nm_sparsity as nm
from effc.passes.model_recon import (
    FEW_SAMPLES,
    ModelReconConfig,
    check_model_fit,
    dense_outputs,
    fit_model,
    layer_bias,
    warn_small_calibration,
)
from effc.passes.pipeline import parse_pipeline
from effc.passes.prune import PrunePass
from tests.passes.nm_helpers import calibration
from tests.passes.test_block_recon import _copy, _feeds, _rel_err, ffn_ln_model


def two_layer_model(seed: int = 0) -> ir.Model:
    """Two FFN+LayerNorm blocks in a row: the second block sees the first one's error (errors add up in depth)."""
    one, two = (ir.to_proto(ffn_ln_model("gelu", seed=s)) for s in (seed, seed + 1))
    for node in two.graph.node:
        node.name = "b2." + node.name
        node.input[:] = ["y" if i == "x" else "b2." + i for i in node.input]
        node.output[:] = ["b2." + o for o in node.output]
    for init in two.graph.initializer:
        init.name = "b2." + init.name
    graph = helper.make_graph(list(one.graph.node) + list(two.graph.node), "two_blocks", list(one.graph.input),
                              [helper.make_tensor_value_info("b2.y", TensorProto.FLOAT, [1, 32, 32])],
                              list(one.graph.initializer) + list(two.graph.initializer))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(proto)
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def test_model_fit_lowers_held_out_error_and_keeps_the_zeros():
    dense = two_layer_model()
    cal, held_out = calibration(_feeds(30, 1)), _feeds(8, 2)
    model = _copy(dense)
    p = nm.NMSparsityPass(n=2, m=4, method="magnitude", reconstruct=False, pack=False)
    assert p(model).modified
    weights = [nd.inputs[1] for nd in model.graph if nd.op_type == "MatMul"]
    zeros = {w.name: w.const_value.numpy() == 0 for w in weights}
    biases = [layer_bias(nd) for nd in model.graph if nd.op_type == "MatMul"]
    assert all(b is not None for b in biases)
    before_bias = {b.name: b.const_value.numpy().copy() for b in biases}
    err_before = _rel_err(model, dense, held_out)
    info = fit_model(model, weights, cal, dense_outputs(dense, cal), ModelReconConfig(epochs=6, batch=4, lr=2e-3))
    err_after = _rel_err(model, dense, held_out)
    assert info["kept"] and info["val_loss_after"] < info["val_loss_before"]
    assert err_after < 0.8 * err_before, (err_before, err_after)
    for w in weights:  # the pattern is fixed: pruned entries stay exactly zero, kept ones moved
        now = w.const_value.numpy()
        assert (now[zeros[w.name]] == 0).all() and (now[~zeros[w.name]] != 0).mean() > 0.99
    assert any(not np.array_equal(b.const_value.numpy(), before_bias[b.name]) for b in biases)
    assert len(list(model.graph)) == len(list(dense.graph))


def test_nm_sparsity_reconstruct_model_beats_sparsegpt_and_packs():
    dense = two_layer_model(seed=3)
    cal, held_out = calibration(_feeds(30, 3)), _feeds(8, 4)
    errs, models = {}, {}
    for mode in ("true", "model"):
        model = _copy(dense)
        p = nm.NMSparsityPass(n=2, m=4, reconstruct=mode, calibration=cal)
        p.model_config = ModelReconConfig(epochs=6, batch=4, lr=2e-3)
        assert p(model).modified and p.stats["reconstruct"] == mode
        errs[mode], models[mode] = _rel_err(model, dense, held_out), model
    assert p.stats["model_reconstruction"]["kept"]
    assert errs["model"] < 0.9 * errs["true"], errs
    assert len(packed_layers(models["model"])) == 4  # the fitted weights are still exactly 2:4
    onnx.checker.check_model(ir.to_proto(models["model"]))
    assert np.isfinite(Reference(models["model"]).run(held_out[0])[0]).all()


def test_prune_reconstruct_model_keeps_sparsity():
    dense = ffn_ln_model("gelu", seed=7)
    cal = calibration(_feeds(20, 7))
    model = _copy(dense)
    p = PrunePass(sparsity=0.5, method="wanda", reconstruct="model", calibration=cal)
    assert p(model).modified
    assert p.stats["sparsity"] == pytest.approx(0.5, abs=0.01)
    zeros = sum(int((nd.inputs[1].const_value.numpy() == 0).sum()) for nd in model.graph if nd.op_type == "MatMul")
    assert zeros == p.stats["params_zeroed"]
    assert p.stats["model_reconstruction"]["tensors"] == 4  # two weights and two biases


def test_reconstruct_model_refuses_missing_data_and_unknown_ops():
    (p,) = parse_pipeline("nm-sparsity(n=2,m=4,vector=1,layers=ffn,reconstruct=model)")
    assert p.options.reconstruct == "model"
    with pytest.raises(PipelineError, match="model"):
        parse_pipeline("nm-sparsity(reconstruct=global)")
    with pytest.raises(CalibrationError, match="reconstruct=model"):
        check_model_fit(ffn_ln_model(), None)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "k"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "shape"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "w")]
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    conv = ir.from_proto(helper.make_model(helper.make_graph(nodes, "conv", [x], [y], inits),
                                           opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(PassError, match="Conv"):
        check_model_fit(conv, calibration([{"x": np.ones((1, 1, 4, 4), np.float32)}]))
    with pytest.raises(PassError):
        ModelReconConfig(epochs=-1)


def test_few_calibration_samples_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="effc.passes.model_recon"):
        warn_small_calibration(FEW_SAMPLES, "block")
        assert not caplog.records
        warn_small_calibration(32, "block")
    assert len(caplog.records) == 1 and "--calibration-samples" in caplog.text and "32" in caplog.text
