"""prune-structured: coupling groups on small graphs (structure + exact ORT numbers), skip reasons, real models."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.passes.prune_structured import PruneStructuredPass
from effc.passes.structured.coupling import find_groups
from tests.passes.nm_helpers import feeds, ffn_model, run


def _model(nodes, inits, inp, out, opset=17):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, inp)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
                              [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in inits.items()])
    proto = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))
    return ir.from_proto(proto)


def _shape(model, name):
    return tuple(model.graph.initializers[name].const_value.shape)


def test_ffn_neurons_shrink_and_zero_neurons_go_exactly():
    model = ffn_model(k=64, hidden=128)
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    b1 = model.graph.initializers["b1"].const_value.numpy().copy()
    dead = np.arange(0, 128, 4)  # 32 neurons = 25% that never fire
    w1[:, dead], b1[dead] = 0.0, 0.0
    model.graph.initializers["w1"].const_value = ir.tensor(w1, name="w1")
    model.graph.initializers["b1"].const_value = ir.tensor(b1, name="b1")
    fs = feeds(2)
    before = [run(model, f) for f in fs]
    p = PruneStructuredPass(ratio=0.25)
    assert p(model).modified
    assert _shape(model, "w1") == (64, 96) and _shape(model, "b1") == (96,) and _shape(model, "w2") == (96, 64)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for f, ref in zip(fs, before, strict=True):
        np.testing.assert_allclose(run(model, f), ref, rtol=1e-5, atol=1e-5)
    reasons = " ".join(s["reason"] for s in p.stats["skipped"])
    assert "graph output" in reasons or "cannot shrink" in reasons  # the residual stream stays
    assert p.stats["units_removed"] == 32
    assert not PruneStructuredPass(ratio=0.0)(model).modified


def _conv_graph():
    """conv A → Relu → a; conv B(a) + a (residual) → Concat(r, r) → depthwise D → grouped G (out = 2·in) → Relu →
    conv E (1 output channel) → conv F → y."""
    rng = np.random.default_rng(0)
    w = {
        "wa": rng.standard_normal((8, 4, 3, 3)), "ba": rng.standard_normal(8),
        "wb": rng.standard_normal((8, 8, 3, 3)), "bb": rng.standard_normal(8),
        "wd": rng.standard_normal((16, 1, 3, 3)), "wg": rng.standard_normal((32, 1, 1, 1)),
        "bg": rng.standard_normal(32), "we": rng.standard_normal((1, 32, 1, 1)),
        "wf": rng.standard_normal((3, 1, 1, 1)),
    }
    for c in (1, 5):  # channel c of the residual stream is zero everywhere, and nothing reads it downstream
        for k in ("wa", "wb"):
            w[k][c] = 0.0
        w["ba"][c] = w["bb"][c] = 0.0
        w["wb"][:, c] = 0.0
        for j in (2 * c, 2 * c + 1, 16 + 2 * c, 17 + 2 * c):
            w["we"][:, j] = 0.0
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], pads=[1, 1, 1, 1], name="A"),
        helper.make_node("Relu", ["ca"], ["a"]),
        helper.make_node("Conv", ["a", "wb", "bb"], ["b"], pads=[1, 1, 1, 1], name="B"),
        helper.make_node("Add", ["a", "b"], ["r"], name="residual"),
        helper.make_node("Concat", ["r", "r"], ["cc"], axis=1, name="cat"),
        helper.make_node("Conv", ["cc", "wd"], ["d"], pads=[1, 1, 1, 1], group=16, name="D"),
        helper.make_node("Conv", ["d", "wg", "bg"], ["g"], group=16, name="G"),
        helper.make_node("Relu", ["g"], ["gr"]),
        helper.make_node("Conv", ["gr", "we"], ["e"], name="E"),
        helper.make_node("Conv", ["e", "wf"], ["y"], name="F"),
    ]
    return _model(nodes, w, [1, 4, 8, 8], [1, 3, 8, 8])


def test_conv_coupling_through_residual_concat_depthwise_grouped():
    model = _conv_graph()
    groups = {g.name: g for g in find_groups(model)}
    main = groups["A"]
    assert {n.name for n in main.sources} == {"A", "B"} and main.blocked is None
    # per unit: ca, a, b, r; cc twice (Concat(r, r)); d twice (depthwise); g and gr four times (out = 2·in)
    assert len(main.units) == 8 and all(len(u) == 16 for u in main.units)
    assert "graph output" in groups["F"].blocked
    assert len(groups["E"].units) == 1  # a 1-output-channel conv: never emptied
    x = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    ref = run(model, {"x": x})
    p = PruneStructuredPass(ratio=0.25)
    assert p(model).modified
    assert _shape(model, "wa") == (6, 4, 3, 3) and _shape(model, "wb") == (6, 6, 3, 3)
    assert _shape(model, "wd") == (12, 1, 3, 3) and _shape(model, "wg") == (24, 1, 1, 1)
    assert _shape(model, "we")[1] == 24
    groups_attr = {n.name: n.attributes.get_int("group", 1) for n in model.graph if n.op_type == "Conv"}
    assert groups_attr["D"] == 12 and groups_attr["G"] == 12
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    np.testing.assert_allclose(run(model, {"x": x}), ref, rtol=1e-4, atol=1e-4)


def test_unsafe_groups_are_skipped_with_reasons():
    rng = np.random.default_rng(0)
    # residual add onto the graph input; grouped conv with 2 inputs per group
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="C1"),
        helper.make_node("Add", ["x", "c1"], ["r"], name="res"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="C2"),
        helper.make_node("Conv", ["c2", "w3"], ["c3"], group=2, name="C3"),
        helper.make_node("Conv", ["c3", "w4"], ["y"], name="C4"),
    ]
    inits = {"w1": rng.standard_normal((4, 4, 1, 1)), "w2": rng.standard_normal((8, 4, 1, 1)),
             "w3": rng.standard_normal((4, 4, 1, 1)), "w4": rng.standard_normal((2, 4, 1, 1))}
    model = _model(nodes, inits, [1, 4, 4, 4], [1, 2, 4, 4])
    p = PruneStructuredPass(ratio=0.5)
    assert not p(model).modified
    reasons = {s["group"]: s["reason"] for s in p.stats["skipped"]}
    assert "graph input" in reasons["C1"]
    assert "grouped Conv" in reasons["C2"]


@pytest.mark.parametrize("op", ["Split", "Slice"])
def test_attention_heads_split_or_sliced_are_skipped(op):
    """Q/K/V from one MatMul (GQA-like widths: q 8, k 4, v 4) split into heads: pruning must not touch it."""
    rng = np.random.default_rng(0)
    if op == "Split":
        split = [helper.make_node("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1, name="split")]
        inits = {"sizes": np.array([8, 4, 4])}
    else:
        split = [helper.make_node("Slice", ["qkv", f"s{i}", f"e{i}", "ax"], [n], name=f"slice_{n}")
                 for i, n in enumerate("qkv")]
        inits = {"s0": [0], "e0": [8], "s1": [8], "e1": [12], "s2": [12], "e2": [16], "ax": [-1]}
    inits = {k: np.asarray(v, np.int64) for k, v in inits.items()}
    nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], name="qkv_proj"), *split,
             helper.make_node("Reshape", ["q", "qs"], ["qh"]), helper.make_node("Reshape", ["k", "ks"], ["kh"]),
             helper.make_node("MatMul", ["qh", "kh_t"], ["s"]),
             helper.make_node("Transpose", ["kh"], ["kh_t"], perm=[0, 1, 3, 2]),
             helper.make_node("Add", ["s", "v_dummy"], ["y"])]
    nodes = nodes[:-3] + [nodes[-2], nodes[-3], nodes[-1]]
    graph_inits = {"wqkv": rng.standard_normal((16, 16)).astype(np.float32)}
    graph = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in {**graph_inits, **inits}.items()]
        + [numpy_helper.from_array(np.array([1, 4, 2, 4], np.int64), "qs"),
           numpy_helper.from_array(np.array([1, 4, 1, 4], np.int64), "ks"),
           numpy_helper.from_array(np.zeros((1, 1, 1, 1), np.float32), "v_dummy")])
    model = ir.from_proto(onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    p = PruneStructuredPass(ratio=0.25)
    assert not p(model).modified
    reason = p.stats["skipped"][0]["reason"]
    assert ("Reshape" in reason or "Slice" in reason) and "heads" in reason


# ------------------------------------------------------------------------------------------------------ real models
def test_minilm_ffn_neurons_25_percent_macs_drop_as_expected():
    from effc import zoo
    from effc.eval.macs import count_macs
    from effc.ir.reference import Reference

    entry = zoo.get("minilm-l6")
    model = entry.load()
    macs = count_macs(model)["total"]
    ffn = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
           and 1536 in n.inputs[1].const_value.shape]
    ffn_macs = sum(128 * 384 * 1536 for _ in ffn)
    p = PruneStructuredPass(ratio=0.25, targets="ffn")
    assert p(model).modified
    assert len(p.stats["groups"]) == 6 and all(g["kept"] == 1152 for g in p.stats["groups"])
    assert count_macs(model)["total"] == macs - ffn_macs // 4
    assert all("LayerNormalization" in s["reason"] for s in p.stats["skipped"])  # residual stream stays
    feed = entry.samples("eval", 1)[0]
    hidden, emb = Reference(model).run(feed)
    assert hidden.shape == (1, 128, 384) and emb.shape == (1, 384) and np.isfinite(emb).all()


def test_ppocr_det_channels_valid_smaller_and_compiles():
    import tvm

    from effc import zoo
    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax
    from effc.eval.cost import param_bytes
    from effc.eval.macs import count_macs
    from effc.ir.reference import Reference

    entry = zoo.get("ppocr-det")
    model = entry.load()
    before_bytes, before_macs = param_bytes(model), count_macs(model)["total"]
    p = PruneStructuredPass(ratio=0.25, targets="conv", round_to=8)
    assert p(model).modified and len(p.stats["groups"]) >= 10
    assert [s["reason"] for s in p.stats["skipped"]] == ["channels of 'sigmoid_0.tmp_0' reach a graph output"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert param_bytes(model) < 0.7 * before_bytes and count_macs(model)["total"] < 0.7 * before_macs
    feed = entry.samples("eval", 1)[0]
    ref = Reference(model).run(feed)[0]
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
    exe, _ = compile_cpu(to_relax(model), target, {})
    vm = tvm.relax.VirtualMachine(exe, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(feed[name]) for name in Reference(model).input_names])
    out = out if hasattr(out, "numpy") else out[0]
    np.testing.assert_allclose(out.numpy(), ref, atol=2e-3)


def test_minilm_attention_heads_25_percent():
    from effc import zoo
    from effc.eval.macs import count_macs
    from effc.ir.reference import Reference

    entry = zoo.get("minilm-l6")
    model = entry.load()
    macs = count_macs(model)["total"]
    p = PruneStructuredPass(ratio=0.0, heads=0.25)
    assert p(model).modified
    assert [g["kept"] for g in p.stats["groups"]] == [9] * 6
    attention_macs = 6 * (4 * 128 * 384 * 384 + 2 * 12 * 128 * 128 * 32)  # Q, K, V, O + QKᵀ and AV
    assert count_macs(model)["total"] == macs - attention_macs // 4
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    emb = Reference(model).run(entry.samples("eval", 1)[0])[1]
    assert emb.shape == (1, 384) and np.isfinite(emb).all()


def test_grouped_query_attention_heads_are_skipped():
    """Q has 4 heads, K/V 2 heads repeated with Expand (GQA): the block is left alone, with the reason."""
    rng = np.random.default_rng(0)
    i64 = {"qs": [1, 5, 4, 4], "ks": [1, 5, 2, 4], "kx": [1, 2, 2, 4, 5], "vx": [1, 2, 2, 5, 4], "ms": [1, 5, 16],
           "kg": [1, 4, 4, 5], "vg": [1, 4, 5, 4], "ax2": [2]}
    mk = helper.make_node
    nodes = [
        mk("MatMul", ["x", "wq"], ["q"], name="q_proj"), mk("MatMul", ["x", "wk"], ["k"], name="k_proj"),
        mk("MatMul", ["x", "wv"], ["v"], name="v_proj"),
        mk("Reshape", ["q", "qs"], ["qh"]), mk("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["k", "ks"], ["kh"]), mk("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
        mk("Reshape", ["v", "ks"], ["vh"]), mk("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
        mk("Unsqueeze", ["kt", "ax2"], ["k5"]), mk("Expand", ["k5", "kx"], ["k6"]), mk("Reshape", ["k6", "kg"], ["kr"]),
        mk("Unsqueeze", ["vt", "ax2"], ["v5"]), mk("Expand", ["v5", "vx"], ["v6"]), mk("Reshape", ["v6", "vg"], ["vr"]),
        mk("MatMul", ["qt", "kr"], ["s"]), mk("Softmax", ["s"], ["p"], axis=-1),
        mk("MatMul", ["p", "vr"], ["c"]), mk("Transpose", ["c"], ["ct"], perm=[0, 2, 1, 3]),
        mk("Reshape", ["ct", "ms"], ["cm"]), mk("MatMul", ["cm", "wo"], ["y"], name="o_proj"),
    ]
    inits = {"wq": rng.standard_normal((16, 16)), "wk": rng.standard_normal((16, 8)),
             "wv": rng.standard_normal((16, 8)), "wo": rng.standard_normal((16, 16))}
    graph = helper.make_graph(
        nodes, "gqa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()]
        + [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in i64.items()])
    model = ir.from_proto(onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    x = rng.standard_normal((1, 5, 16)).astype(np.float32)
    ref = run(model, {"x": x})
    p = PruneStructuredPass(ratio=0.0, heads=0.5)
    assert not p(model).modified
    reasons = " ".join(s["reason"] for s in p.stats["skipped"] if s["reason"].startswith("attention heads"))
    assert "grouped-query" in reasons
    np.testing.assert_array_equal(run(model, {"x": x}), ref)
