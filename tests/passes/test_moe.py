"""``moe``: dense FFN → ``effc.MoEFFN`` (structure, numbers in onnxruntime and compiled, routers, errors)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from effc.codegen.cpu import compile_cpu
from effc.codegen.frontend import to_relax
from effc.errors import PassError, PipelineError
from effc.ir.reference import Reference, run_with_taps
from effc.ops import moe
from effc.passes.moe import MoEFFNPass
from effc.passes.pipeline import parse_pipeline
from tests.passes.nm_helpers import calibration
from tests.passes.test_block_recon import _feeds, ffn_ln_model

K, H, TOPICS, SEQ = 32, 128, 8, 16
TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})


def gated_model(seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    """A SwiGLU FFN ``x (1, SEQ, K) → down(SiLU(x·Wg) ⊙ x·Wu)`` whose ``Wu`` columns follow 8 input directions.

    The gate is dense and random, so the analytic router (gate pre-activation statistics) cannot see which
    neurons a token drives; a trained router can. Returns the model and the ``(8, K)`` directions.
    """
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((TOPICS, K))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    topic = rng.permutation(np.repeat(np.arange(TOPICS), H // TOPICS))
    arrays = {"wg": rng.standard_normal((K, H)) * 2 / np.sqrt(K), "wu": d[topic].T * 2 + 0.2 * rng.standard_normal(
        (K, H)), "w2": rng.standard_normal((H, K)) / np.sqrt(H)}
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"], name="gate"),
             helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
             helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
             helper.make_node("MatMul", ["x", "wu"], ["u"], name="up"),
             helper.make_node("Mul", ["silu", "u"], ["h"], name="glu"),
             helper.make_node("MatMul", ["h", "w2"], ["y"], name="down")]
    graph = helper.make_graph(nodes, "swiglu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, K])],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto)), d


def topic_feeds(d: np.ndarray, n: int, seed: int) -> list[dict]:
    """Tokens mixing two of the directions ``d`` plus noise."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        x = np.stack([(rng.random(2)[:, None] * 1.5 * d[rng.choice(TOPICS, 2, replace=False)]).sum(0)
                      for _ in range(SEQ)]) + 0.3 * rng.standard_normal((SEQ, K))
        feeds.append({"x": x[None].astype(np.float32)})
    return feeds


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _compiled(model: ir.Model, feed: dict) -> np.ndarray:
    ex, _ = compile_cpu(to_relax(model), TARGET, {})
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in feed.values()))
    return (out.numpy() if hasattr(out, "numpy") else out[0].numpy())


def _rel(model: ir.Model, dense: ir.Model, feeds: list[dict]) -> float:
    a, b = Reference(model), Reference(dense)
    return float(np.mean([np.sum((a.run(f)[0] - b.run(f)[0]) ** 2) / np.sum(b.run(f)[0] ** 2) for f in feeds]))


def _node(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == moe.OP_TYPE]
    return node


def _weights(node: ir.Node) -> dict[str, np.ndarray | None]:
    inputs = [*node.inputs[1:], *[None] * (len(moe.INPUTS) - len(node.inputs))]  # zero_values absent without Z
    return {name: None if v is None else v.const_value.numpy() for name, v in zip(moe.INPUTS[1:], inputs,
                                                                                 strict=True)}


@pytest.mark.parametrize("kind", ["erf", "gated"])
def test_every_expert_active_equals_the_original_rewritten_and_compiled(kind):
    if kind == "gated":
        dense, d = gated_model()
        cal, held = calibration(topic_feeds(d, 12, 1)), topic_feeds(d, 2, 2)
    else:
        dense = ffn_ln_model("erf")
        cal, held = calibration(_feeds(12, 1)), _feeds(2, 2)
    model = _copy(dense)
    p = MoEFFNPass(experts=4, top_k=4, shared=0.25, calibration=cal)
    assert p(model).modified
    node = _node(model)
    assert [n.op_type for n in model.graph].count("MatMul") == 0 and node.metadata_props["effc.pass"] == "moe"
    assert all(v.uses() for v in model.graph.initializers.values())  # the dense weights are gone
    layer = p.stats["layers"][0]
    assert layer["activation"] == ("silu" if kind == "gated" else "gelu") and layer["gated"] == (kind == "gated")
    assert layer["shared"] == 32 and layer["expert_size"] == 24 and layer["active_fraction"] == 1.0
    ref, got = Reference(dense), Reference(model)
    for feed in held:
        np.testing.assert_allclose(got.run(feed)[0], ref.run(feed)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_compiled(model, held[0]), ref.run(held[0])[0], rtol=1e-5, atol=1e-5)


def test_trained_router_beats_analytic_on_held_out_data():
    dense, d = gated_model(0)
    cal, held = calibration(topic_feeds(d, 30, 1)), topic_feeds(d, 8, 100)
    errors, stats = {}, {}
    for router in ("trained", "analytic"):
        model = _copy(dense)
        p = MoEFFNPass(experts=8, top_k=2, router=router, calibration=cal)
        p(model)
        errors[router], stats[router] = _rel(model, dense, held), p.stats["layers"][0]
    assert errors["trained"] < 0.85 * errors["analytic"], errors  # measured 0.32 vs 0.46
    assert stats["trained"]["router"] == "trained" and stats["analytic"]["router"] == "analytic"
    assert stats["trained"]["error_trained"] < stats["trained"]["error_analytic"]
    assert stats["trained"]["active_fraction"] == 0.25 and stats["trained"]["carving"] == "co-activation"


def test_an_expert_no_calibration_token_chose_computes_correctly():
    dense, d = gated_model(1)
    cal_feeds = topic_feeds(d, 12, 3)
    model = _copy(dense)
    MoEFFNPass(experts=4, top_k=1, calibration=calibration(cal_feeds))(model)
    node = _node(model)
    w = _weights(node)
    x_cal = np.concatenate([f["x"][0] for f in cal_feeds])
    logits = x_cal @ w["router_w"] + w["router_b"]
    j = int(np.argmin(np.bincount(logits.argmax(1), minlength=4)))
    z = np.zeros(K, np.float32)
    z[0] = 1.0
    # expert j reads only input 0: below every calibration token's winner, above it for one crafted token
    w["router_w"][:, j] = 10.0 * z
    others = np.delete(logits, j, axis=1).max(1)
    w["router_b"][j] = float(np.min(others - 10.0 * x_cal[:, 0])) - 1.0
    node.inputs[2].const_value = ir.tensor(w["router_b"], name=node.inputs[2].name)
    node.inputs[1].const_value = ir.tensor(w["router_w"], name=node.inputs[1].name)
    crafted = topic_feeds(d, 1, 4)[0]
    crafted["x"][0, 5, 0] += 50.0
    chosen_cal = moe.select_experts(x_cal @ w["router_w"] + w["router_b"], 1)
    chosen = moe.select_experts(crafted["x"][0] @ w["router_w"] + w["router_b"], 1)
    assert not chosen_cal[:, j].any() and chosen[5, j]
    want = moe.reference(crafted["x"], *w.values(), activation="silu", gated=1, experts=4, top_k=1, shared=0)
    np.testing.assert_allclose(Reference(model).run(crafted)[0], want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_compiled(model, crafted), want, rtol=1e-5, atol=1e-4)


def test_top_k_combine_sums_every_chosen_expert():
    dense, d = gated_model(2)
    model = _copy(dense)
    MoEFFNPass(experts=4, top_k=2, shared=0.25, calibration=calibration(topic_feeds(d, 12, 5)))(model)
    w = _weights(_node(model))
    feed = topic_feeds(d, 1, 6)[0]
    x = feed["x"][0]
    shared, size = 32, 24
    a = moe.ACTIVATIONS["silu"](x @ w["W1"] + w["b1"]) * (x @ w["W3"])
    parts = [a[:, :shared] @ w["W2"][:shared]] + [a[:, shared + e * size: shared + (e + 1) * size]
                                                  @ w["W2"][shared + e * size: shared + (e + 1) * size]
                                                  for e in range(4)]
    chosen = moe.select_experts(x @ w["router_w"] + w["router_b"], 2)
    assert (chosen.sum(1) == 2).all()
    want = w["b2"] + parts[0] + sum(np.where(chosen[:, [e]], parts[e + 1], w["fill"][e]) for e in range(4))
    top1_only = want - np.where(chosen[:, [1]], parts[2] - w["fill"][1], 0)  # one chosen expert left out
    got = Reference(model).run(feed)[0][0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.abs(got - top1_only).max() > 1e-2  # the second expert's share is visible
    np.testing.assert_allclose(_compiled(model, feed)[0], want, rtol=1e-5, atol=1e-4)


def test_refit_and_local_distillation_lower_the_error():
    dense, d = gated_model(0)
    cal, held = calibration(topic_feeds(d, 30, 1)), topic_feeds(d, 8, 100)
    errors, stats = {}, {}
    for refit, steps in ((False, 0), (False, 80), (True, 0)):
        model = _copy(dense)
        p = MoEFFNPass(experts=8, top_k=2, refit=refit, recover=steps, calibration=cal)
        p(model)
        errors[refit, steps], stats[refit, steps] = _rel(model, dense, held), p.stats["layers"][0]
    info = stats[False, 80]["recovery"]
    assert info["val_loss_after"] < info["val_loss_before"] and info["seconds"] > 0
    assert errors[False, 80] < 0.96 * errors[False, 0], errors  # measured 0.289 vs 0.312 (384 training tokens)
    refit = stats[True, 0]["refit"]
    assert refit["val_loss_after"] < refit["val_loss_before"] and refit["ridge"] > 0
    assert errors[True, 0] < 0.96 * errors[False, 0], errors  # measured 0.285 vs 0.312, closed form
    assert stats[True, 0]["error_final"] < stats[True, 0]["error_trained"]
    model = _copy(dense)
    MoEFFNPass(experts=8, top_k=2, fill=False, calibration=cal)(model)
    assert not _weights(_node(model))["fill"].any()  # fill=false: the refit leaves the fill rows at zero


def test_without_calibration_weight_clustering_and_analytic_router():
    dense = ffn_ln_model("gelu")
    model = _copy(dense)
    p = MoEFFNPass(experts=4, top_k=4)
    assert p(model).modified
    layer = p.stats["layers"][0]
    assert (layer["carving"], layer["router"], layer["error_trained"]) == ("weight", "analytic", None)
    feed = _feeds(1, 9)[0]
    np.testing.assert_allclose(Reference(model).run(feed)[0], Reference(dense).run(feed)[0], rtol=1e-5, atol=1e-5)


def test_mac_and_byte_accounting():
    dense, d = gated_model(0)
    p = MoEFFNPass(experts=8, top_k=2, calibration=calibration(topic_feeds(d, 10, 1)))
    p(_copy(dense))
    layer = p.stats["layers"][0]
    assert (layer["macs_dense"], layer["macs_moe"]) == (H * 3 * K, K * 8 + (H // 4) * 3 * K)
    assert p.stats["ffn_mac_fraction"] == pytest.approx((8 * K + 32 * 3 * K) / (H * 3 * K))
    assert layer["bytes_moe"] < 0.3 * layer["bytes_dense"]
    assert p.stats["ffn_weight_bytes_fraction"] == pytest.approx(layer["bytes_moe"] / layer["bytes_dense"])


def test_model_without_ffn_gets_a_clear_error():
    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
                               helper.make_node("Softmax", ["h"], ["y"], name="soft")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(PassError, match=r"found no FFN block.*MatMul\(x, W1\).*proj: Softmax"):
        MoEFFNPass()(model)


def test_options_validate_and_round_trip():
    with pytest.raises(PipelineError, match="top_k"):
        MoEFFNPass(experts=4, top_k=5)
    with pytest.raises(PipelineError, match="router"):
        MoEFFNPass(router="oracle")
    text = "moe(experts=4,top_k=3,router=analytic,refit=false,recover=10)"
    assert str(parse_pipeline(text)) == text
    with pytest.raises(PassError, match="matches no FFN block"):
        MoEFFNPass(layers="7")(ffn_ln_model("gelu"))


def test_block_input_taps_drive_the_carving():
    dense, d = gated_model(0)
    feeds = topic_feeds(d, 6, 1)
    model = _copy(dense)
    MoEFFNPass(experts=8, top_k=8, calibration=calibration(feeds))(model)
    taps = run_with_taps(model, feeds[:1], ["y"])[0]["y"]
    np.testing.assert_allclose(taps, Reference(dense).run(feeds[0])[0], rtol=1e-5, atol=1e-5)


def test_an_ffn_output_that_is_a_graph_output_keeps_its_name():
    dense, d = gated_model(0)  # the down projection's output "y" is the graph output
    model = _copy(dense)
    MoEFFNPass(experts=4, top_k=2, calibration=calibration(topic_feeds(d, 10, 1)))(model)
    proto = ir.to_proto(model)
    assert [o.name for o in proto.graph.output] == ["y"] and _node(model).outputs[0].name == "y"
    onnx.checker.check_model(proto, full_check=True)


def test_experts_that_do_not_divide_the_neurons_compile():
    """128 neurons / 5 experts: each routed expert gets 24 (a multiple of the kernel's vector width), the rest
    joins the shared expert; an odd size used to reach TVM as a 1-lane vector and fail inside its build."""
    dense = ffn_ln_model("erf")
    cal, held = calibration(_feeds(12, 1)), _feeds(2, 2)
    model = _copy(dense)
    p = MoEFFNPass(experts=5, top_k=5, shared=0.0, calibration=cal)
    assert p(model).modified
    layer = p.stats["layers"][0]
    assert layer["expert_size"] == 24 and layer["shared"] == 128 - 5 * 24
    np.testing.assert_allclose(_compiled(model, held[0]), Reference(dense).run(held[0])[0], rtol=1e-5, atol=1e-5)


def test_block_quant_after_moe_is_refused_by_name_unless_the_experts_are_excluded():
    from effc.passes.block_quant import BlockQuantPass

    dense, d = gated_model(0)
    model = _copy(dense)
    MoEFFNPass(experts=4, top_k=2, calibration=calibration(topic_feeds(d, 10, 1)))(model)
    with pytest.raises(PassError, match=r"effc\.MoEFFN\): gate/moe.*not supported.*exclude=\[\*/moe\]"):
        BlockQuantPass(format="mxint8")(model)
    assert not BlockQuantPass(format="mxint8", exclude=("*/moe",))(model).modified  # nothing else to quantize
    assert _node(model).inputs[3].const_value.dtype == ir.DataType.FLOAT


def test_zero_computation_experts_are_chosen_and_compute_correctly():
    dense, d = gated_model(0)
    cal, held = calibration(topic_feeds(d, 30, 1)), topic_feeds(d, 2, 101)
    model = _copy(dense)
    p = MoEFFNPass(experts=8, top_k=2, zero_experts=("zero", "const", "copy"), zero_share=0.4, calibration=cal)
    assert p(model).modified
    layer = p.stats["layers"][0]
    assert 0.3 < layer["zero_slot_share"] < 0.55, layer["zero_slot_share"]  # held-out tokens: 0.44 (0.4 asked)
    assert layer["active_fraction_measured"] < 0.8 * layer["active_fraction"]
    node = _node(model)
    w = _weights(node)
    assert w["router_w"].shape == (K, 11) and w["zero_values"].shape == (3, K)
    assert np.abs(w["zero_values"][1]).max() > 0 and not w["zero_values"][[0, 2]].any()  # const fitted, others 0
    feed = held[0]
    picked = moe.select_experts(feed["x"][0] @ w["router_w"] + w["router_b"], 2)
    assert picked[:, 8].any() and picked[:, 9].any() and (picked[:, :8].sum(1) == 0).any()  # a token skips it all
    want = moe.reference(feed["x"], *w.values(), activation="silu", gated=1, experts=8, top_k=2, shared=0,
                         zero_experts="zero,const,copy")
    np.testing.assert_allclose(Reference(model).run(feed)[0], want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(_compiled(model, feed), want, rtol=1e-5, atol=1e-4)
    plain = _copy(dense)
    MoEFFNPass(experts=8, top_k=2, calibration=cal)(plain)
    assert _rel(model, dense, held) < 2.0 * _rel(plain, dense, held)  # 40% fewer routed slots, bounded cost


def chain_model(depth: int, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    """``depth`` SwiGLU FFNs of :func:`gated_model`'s kind with residual adds, ``x (1, SEQ, K) → y``."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((TOPICS, K))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        topic = rng.permutation(np.repeat(np.arange(TOPICS), H // TOPICS))
        arrays = {"wg": rng.standard_normal((K, H)) * 2 / np.sqrt(K),
                  "wu": d[topic].T * 2 + 0.2 * rng.standard_normal((K, H)),
                  "w2": rng.standard_normal((H, K)) / np.sqrt(H)}
        inits += [numpy_helper.from_array(a.astype(np.float32), f"{n}{i}") for n, a in arrays.items()]
        nodes += [helper.make_node("MatMul", [x, f"wg{i}"], [f"g{i}"], name=f"gate{i}"),
                  helper.make_node("Sigmoid", [f"g{i}"], [f"sg{i}"], name=f"sig{i}"),
                  helper.make_node("Mul", [f"g{i}", f"sg{i}"], [f"silu{i}"], name=f"silu{i}"),
                  helper.make_node("MatMul", [x, f"wu{i}"], [f"u{i}"], name=f"up{i}"),
                  helper.make_node("Mul", [f"silu{i}", f"u{i}"], [f"h{i}"], name=f"glu{i}"),
                  helper.make_node("MatMul", [f"h{i}", f"w2{i}"], [f"f{i}"], name=f"down{i}"),
                  helper.make_node("Add", [x, f"f{i}"], [f"r{i}"], name=f"res{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, SEQ, K])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto)), d


def test_sequential_groups_tap_the_rewritten_model():
    dense, d = chain_model(3)
    cal, held = calibration(topic_feeds(d, 30, 1)), topic_feeds(d, 8, 100)
    stats = {}
    for groups in (1, 3):
        model = _copy(dense)
        p = MoEFFNPass(experts=8, top_k=2, sequential=groups, calibration=cal)
        p(model)
        stats[groups] = p.stats
        assert 0.0 < _rel(model, dense, held) < 1.0
    assert [stats[g]["calibration_taps"] for g in (1, 3)] == [1, 3]
    assert stats[3]["sequential"] == 3 and len(stats[3]["layers"]) == 3
    # the groups after the first see other inputs, so their carving and fit differ; the first group does not
    w1 = [[r["error_final"] for r in stats[g]["layers"]] for g in (1, 3)]
    assert w1[0][0] == w1[1][0] and w1[0][1:] != w1[1][1:]
    model = _copy(dense)  # every expert active: each group's inputs are the dense ones, and the model is unchanged
    MoEFFNPass(experts=4, top_k=4, sequential=3, calibration=cal)(model)
    ref, got = Reference(dense), Reference(model)
    for feed in held[:3]:
        np.testing.assert_allclose(got.run(feed)[0], ref.run(feed)[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(PipelineError, match="sequential"):
        parse_pipeline("moe(sequential=0)")
