"""FFN block matching and block-wise reconstruction (``nm-sparsity(reconstruct=block)``) on small synthetic graphs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from effc.errors import PassError, PipelineError
from effc.ir.reference import Reference, run_with_taps
from effc.ops.nm_sparse import pack_nm, packed_layers, unpack_nm
from effc.passes import nm_sparsity as nm
from effc.passes.block_recon import BlockReconConfig, fit_block
from effc.passes.ffn_blocks import TorchBlock, find_ffn_blocks
from effc.passes.pipeline import parse_pipeline
from tests.passes.nm_helpers import calibration

K, H, SEQ = 32, 128, 32


def _act_nodes(kind: str) -> tuple[list, list]:
    """Nodes ``hb -> a`` for the activation and their constants: the Gelu op or the exported Erf form."""
    if kind == "gelu":
        return [helper.make_node("Gelu", ["hb"], ["a"], name="ffn.gelu")], []
    consts = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in
              (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    nodes = [helper.make_node("Div", ["hb", "sqrt2"], ["d"], name="gelu.div"),
             helper.make_node("Erf", ["d"], ["e"], name="gelu.erf"),
             helper.make_node("Add", ["e", "one"], ["e1"], name="gelu.add"),
             helper.make_node("Mul", ["hb", "e1"], ["p"], name="gelu.mul"),
             helper.make_node("Mul", ["p", "half"], ["a"], name="gelu.half")]
    return nodes, consts


def ffn_ln_model(kind: str = "gelu", seed: int = 0) -> ir.Model:
    """x (1, SEQ, K) → scale → MatMul (K, H) + b1 → GELU → MatMul (H, K) + b2 → + xs → LayerNorm → y."""
    rng = np.random.default_rng(seed)
    arrays = {"s": np.exp(rng.standard_normal(K)), "w1": rng.standard_normal((K, H)) / np.sqrt(K),
              "b1": rng.standard_normal(H) * 0.3, "w2": rng.standard_normal((H, K)) / np.sqrt(H),
              "b2": rng.standard_normal(K) * 0.1, "g": 1 + 0.1 * rng.standard_normal(K), "beta": 0.1 * rng.random(K)}
    act, consts = _act_nodes(kind)
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"], name="scale"),
             helper.make_node("MatMul", ["xs", "w1"], ["h"], name="ffn.up"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="ffn.up_bias"), *act,
             helper.make_node("MatMul", ["a", "w2"], ["o"], name="ffn.down"),
             helper.make_node("Add", ["o", "b2"], ["ob"], name="ffn.down_bias"),
             helper.make_node("Add", ["ob", "xs"], ["r"], name="residual"),
             helper.make_node("LayerNormalization", ["r", "g", "beta"], ["y"], name="norm", axis=-1)]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()] + consts
    graph = helper.make_graph(nodes, "ffn_ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, K])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


def _feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, SEQ, K)).astype(np.float32)} for _ in range(n)]


def _copy(model):
    return ir.from_proto(ir.to_proto(model))


def _rel_err(model, dense, fs) -> float:
    a, b = Reference(model), Reference(dense)
    num = sum(float(np.sum((a.run(f)[0] - b.run(f)[0]) ** 2)) for f in fs)
    return num / sum(float(np.sum(b.run(f)[0] ** 2)) for f in fs)


@pytest.mark.parametrize("kind", ["gelu", "erf"])
def test_block_found_and_torch_replica_matches_onnxruntime(kind):
    model = ffn_ln_model(kind)
    blocks, skipped = find_ffn_blocks(model)
    assert len(blocks) == 1 and not skipped
    b = blocks[0]
    assert (b.up.name, b.down.name, b.norm.name) == ("ffn.up", "ffn.down", "norm")
    assert [n.op_type for n in b.act] == (["Gelu"] if kind == "gelu" else ["Div", "Erf", "Add", "Mul", "Mul"])
    f = _feeds(1, 3)[0]
    taps = run_with_taps(model, [f], ["xs", "ob", "r", "y"])[0]
    tb, x = TorchBlock(b), torch.tensor(taps["xs"][0])
    w = [torch.tensor(v.const_value.numpy()) for v in (b.up.inputs[1], b.up_bias, b.down.inputs[1], b.down_bias)]
    for point, name in (("ffn", "ob"), ("residual", "r"), ("norm", "y")):
        np.testing.assert_allclose(tb.forward(x, *w, point).numpy(), taps[name][0], rtol=1e-4, atol=1e-4)


def test_unmatched_matmul_says_why():
    model = ffn_ln_model("gelu")
    act = next(nd for nd in model.graph if nd.op_type == "Gelu")
    soft = ir.Node("", "Softmax", [act.inputs[0]], name="not.elementwise")
    model.graph.insert_after(act, soft)
    act.replace_input_with(0, soft.outputs[0])
    blocks, skipped = find_ffn_blocks(model)
    assert not blocks and skipped[0]["name"] == "ffn.up" and "Softmax" in skipped[0]["reason"]


@pytest.mark.parametrize("kind", ["gelu", "erf"])
def test_block_reconstruction_beats_sparsegpt_and_keeps_2_4(kind):
    dense = ffn_ln_model(kind)
    cal, held_out = calibration(_feeds(40, 1)), _feeds(8, 2)
    errs, models = {}, {}
    for mode in ("true", "block"):
        model = _copy(dense)
        p = nm.NMSparsityPass(n=2, m=4, reconstruct=mode, calibration=cal)
        p.block_config = BlockReconConfig(steps=150)
        assert p(model).modified and p.stats["reconstruct"] == mode
        errs[mode], models[mode] = _rel_err(model, dense, held_out), model
    info = p.stats["block_reconstruction"]
    assert len(info["blocks"]) == 1 and info["blocks"][0]["kept"] and not info["skipped"]
    assert info["blocks"][0]["val_loss_after"] < info["blocks"][0]["val_loss_before"]
    assert errs["block"] < 0.8 * errs["true"], errs  # held-out error of the block output (post-LayerNorm)
    packed = packed_layers(models["block"])
    assert len(packed) == 2
    for node in packed:
        vals, idx = (v.const_value.numpy() for v in node.inputs[1:])
        k = vals.shape[0] * 2
        dense_w = unpack_nm(vals, idx, k)
        assert ((dense_w.reshape(k // 4, 4, -1) != 0).sum(axis=1) <= 2).all()
        v2, i2 = pack_nm(dense_w, 2, 4)
        np.testing.assert_array_equal(unpack_nm(v2, i2, k), dense_w)
    onnx.checker.check_model(ir.to_proto(models["block"]))
    assert np.isfinite(Reference(models["block"]).run(held_out[0])[0]).all()


def test_fit_keeps_masked_weights_zero_and_freezes_dense_matrices():
    model = ffn_ln_model("gelu")
    b = find_ffn_blocks(model)[0][0]
    rng = np.random.default_rng(0)
    params = {"w1": b.up.inputs[1].const_value.numpy(), "b1": b.up_bias.const_value.numpy(),
              "w2": b.down.inputs[1].const_value.numpy(), "b2": b.down_bias.const_value.numpy()}
    m1 = rng.random(params["w1"].shape) < 0.5
    params["w1"] = np.where(m1, params["w1"], 0).astype(np.float32)
    x = rng.standard_normal((256, K)).astype(np.float32)
    y = rng.standard_normal((256, K)).astype(np.float32)
    new, info = fit_block(TorchBlock(b), params, {"w1": m1, "w2": None}, (x, y), None, "norm",
                          BlockReconConfig(steps=20, val_every=0), frozen=("b2",))
    assert (new["w1"][~m1] == 0).all() and not np.array_equal(new["w1"], params["w1"])
    np.testing.assert_array_equal(new["w2"], params["w2"])
    np.testing.assert_array_equal(new["b2"], params["b2"])
    assert info["loss_after"] < info["loss_before"]


def test_reconstruct_option_spelling_and_bad_values():
    (p,) = parse_pipeline("nm-sparsity(n=2,m=4,vector=1,layers=ffn,reconstruct=block)")
    assert p.options.reconstruct == "block" and "reconstruct=block" in str(p)
    assert nm.NMSparsityPass(reconstruct=True).options.reconstruct == "true"
    assert not nm.NMSparsityPass(reconstruct=False).options.sparsegpt
    with pytest.raises(PipelineError, match="reconstruct"):
        parse_pipeline("nm-sparsity(reconstruct=blocks)")
    with pytest.raises(PipelineError, match="reconstruct"):
        nm.NMSparsityPass(reconstruct="sparse")
    for bad in ({"point": "post"}, {"target": "teacher"}, {"steps": -1}, {"lr": 0.0}):
        with pytest.raises(PassError):
            BlockReconConfig(**bad)


def test_prune_reconstruct_block_keeps_sparsity_and_beats_sparsegpt():
    """``prune(sparsity=0.5,reconstruct=block)``: the same masks as SparseGPT's sweep, lower held-out error."""
    from effc.passes.prune import PrunePass

    dense = ffn_ln_model("gelu", seed=4)
    cal, held_out = calibration(_feeds(40, 5)), _feeds(8, 6)
    errs = {}
    for mode in ("true", "block"):
        model = _copy(dense)
        p = PrunePass(sparsity=0.5, method="wanda", reconstruct=mode, calibration=cal)
        assert p(model).modified and p.stats["sparsity"] == pytest.approx(0.5, abs=0.01)
        errs[mode] = _rel_err(model, dense, held_out)
    assert len(p.stats["block_reconstruction"]["blocks"]) == 1
    assert errs["block"] < 0.8 * errs["true"], errs
