"""block-quant: structure of the rewritten graph, onnxruntime numbers (bit-exact decode), contract, MiniLM fidelity."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.errors import CalibrationError, PipelineError
from effc.ops.block_formats import FORMATS, dequantize, get_format, quantize_dequantize
from effc.passes.block_quant import BlockQuantPass
from effc.passes.quant.compensation import gptq_quantize, hessian, lorc


def _toy(opset=17, seed=0):
    """ids (1, 8) -> Gather(table (50, 64)) -> MatMul W1 (64, 64) -> Reshape (8, 64) -> Gemm(W2ᵀ (32, 64), b2)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "table": rng.standard_normal((50, 64)).astype(np.float32),
        "w1": (rng.standard_normal((64, 64)) * 0.2).astype(np.float32),
        "w2": (rng.standard_normal((32, 64)) * 0.2).astype(np.float32),
        "b2": rng.standard_normal(32).astype(np.float32),
        "shape": np.array([8, 64], np.int64),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "w1"], ["h"], name="fc1"),
            helper.make_node("Reshape", ["h", "shape"], ["h2"], name="flat"),
            helper.make_node("Gemm", ["h2", "w2", "b2"], ["y"], name="fc2", transB=1),
        ],
        "toy",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 32])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(model), arrays


IDS = np.array([[0, 3, 7, 49, 12, 3, 21, 5]], np.int64)


def _run(model, feeds, optimize=True):
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    so = ort.SessionOptions()
    if not optimize:  # ORT fuses blocked int4 DequantizeLinear + MatMul into MatMulNBits (different rounding)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _expected(arrays, fmt, lorc_rank=0, scale_dtype="float16"):
    dq = {n: quantize_dequantize(arrays[n], fmt, axis=a, scale_dtype=scale_dtype)
          for n, a in (("table", 1), ("w1", 0), ("w2", 1))}
    w1 = dq["w1"]
    if lorc_rank:
        u, v = lorc(arrays["w1"] - w1, lorc_rank)
        w1 = w1 + u @ v
    h = dq["table"][IDS[0]] @ w1
    return h @ dq["w2"].T + arrays["b2"]


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxint8", "mxfp8_e5m2", "int4", "int8", "int4_asym"])
def test_rewrite_matches_numpy_dequantization(fmt):
    model, arrays = _toy()
    p = BlockQuantPass(format=fmt, min_params=0)
    assert p(model).modified
    ops = sorted(n.op_type for n in model.graph)
    assert ops == ["Add", "BlockQuantGather", "BlockQuantMatMul", "BlockQuantMatMul", "Reshape"]
    assert not any(i in model.graph.initializers for i in ("table", "w1", "w2"))
    (y,) = _run(model, {"ids": IDS})
    np.testing.assert_allclose(y, _expected(arrays, fmt), rtol=1e-5, atol=1e-5)
    bits = {"mxfp4": 4.25, "mxfp6_e2m3": 6.25, "mxint8": 8.25, "mxfp8_e5m2": 8.25, "int4": 4.5, "int8": 8.5,
            "int4_asym": 5.0}[fmt]
    assert p.stats["bits_per_weight"] == pytest.approx(bits)
    assert set(p.stats["layers"]) == {"table", "w1", "w2"}
    assert all(v["sqnr_db"] > (15 if "4" in fmt else 20) for v in p.stats["layers"].values())
    assert not BlockQuantPass(format=fmt, min_params=0)(model).modified  # second run: nothing left to do


def test_int4_uses_dequantize_linear_from_opset_21():
    model, arrays = _toy(opset=21)
    BlockQuantPass(format="int4", scale_dtype="float32", min_params=0)(model)
    ops = [n.op_type for n in model.graph]
    assert ops.count("DequantizeLinear") == 3 and not any(n.domain == "effc" for n in model.graph)
    w1q = next(v for k, v in model.graph.initializers.items() if k.startswith("w1_q"))
    assert w1q.const_value.dtype == ir.DataType.INT4 and tuple(w1q.const_value.shape) == (64, 64)
    (y,) = _run(model, {"ids": IDS}, optimize=False)
    np.testing.assert_allclose(y, _expected(arrays, "int4", scale_dtype="float32"), rtol=1e-5, atol=1e-5)


def test_int4_asym_takes_minimums_and_an_embedding_format():
    """``embedding_format`` gives the table its own format (the GGUF Q4_1 layout: a Q8_0 embedding); int4_asym's
    float minimum is no integer zero point, so its layers stay effc operators at opset 21 too."""
    model, arrays = _toy()
    p = BlockQuantPass(format="int4_asym", embedding_format="int8", min_params=0)
    p(model)
    nodes = [n for n in model.graph if n.domain == "effc"]
    assert [(n.op_type, n.attributes.get_string("format"), len(n.inputs)) for n in nodes] == [
        ("BlockQuantGather", "int8", 3), ("BlockQuantMatMul", "int4_asym", 4), ("BlockQuantMatMul", "int4_asym", 4)]
    assert {k: v["bits_per_weight"] for k, v in p.stats["layers"].items()} == {"table": 8.5, "w1": 5.0, "w2": 5.0}
    assert p.stats["embedding_format"] == "int8"
    dq = {n: quantize_dequantize(arrays[n], f, axis=a) for n, f, a in
          (("table", "int8", 1), ("w1", "int4_asym", 0), ("w2", "int4_asym", 1))}
    (y,) = _run(model, {"ids": IDS})
    np.testing.assert_allclose(y, dq["table"][IDS[0]] @ dq["w1"] @ dq["w2"].T + arrays["b2"], rtol=1e-5, atol=1e-5)
    model21, _ = _toy(opset=21)
    BlockQuantPass(format="int4_asym", min_params=0)(model21)
    assert sorted(n.op_type for n in model21.graph if n.domain == "effc") == [
        "BlockQuantGather", "BlockQuantMatMul", "BlockQuantMatMul"]
    with pytest.raises(PipelineError, match="gptq"):
        BlockQuantPass(format="int4_asym", gptq=True)
    with pytest.raises(ValueError, match="int4_asym"):
        gptq_quantize(np.ones((4, 32), np.float32), np.eye(32), get_format("int4_asym"))
    with pytest.raises(PipelineError, match="format"):
        BlockQuantPass(format="int4_asym", embedding_format="int3")


def test_lorc_adds_low_rank_branch_and_reduces_error():
    model, arrays = _toy()
    p = BlockQuantPass(format="mxfp4", lorc_rank=8, include=("fc1",), min_params=0)
    p(model)
    assert [n.name for n in model.graph if n.op_type == "MatMul"] == ["fc1/lorc_u", "fc1/lorc_v"]
    (y,) = _run(model, {"ids": IDS})
    h = arrays["table"][IDS[0]] @ (quantize_dequantize(arrays["w1"], "mxfp4", axis=0) + np.dot(
        *lorc(arrays["w1"] - quantize_dequantize(arrays["w1"], "mxfp4", axis=0), 8)))
    np.testing.assert_allclose(y, h @ arrays["w2"].T + arrays["b2"], rtol=1e-4, atol=1e-4)
    plain = BlockQuantPass(format="mxfp4", include=("fc1",), min_params=0)
    plain(_toy()[0])
    assert p.stats["layers"]["w1"]["sqnr_db"] > plain.stats["layers"]["w1"]["sqnr_db"] + 1.0
    assert p.stats["layers"]["w1"]["bits_per_weight"] == pytest.approx(4.25 + 32 * (64 * 8 * 2) / 4096)  # fp32 U, V


def test_selection_and_weight_act_mode():
    model, _ = _toy()
    p = BlockQuantPass(format="mxint8", mode="weight_act", ops=("MatMul", "Gemm"), exclude=("fc2",), min_params=0)
    p(model)
    assert [n.op_type for n in model.graph if n.domain == "effc"] == ["BlockQDQ", "BlockQuantMatMul"]
    assert {s["reason"] for s in p.stats["skipped"]} == {"excluded by pattern"}
    assert "table" in model.graph.initializers  # Gather not selected
    (y,) = _run(model, {"ids": IDS})
    assert np.all(np.isfinite(y))


def test_int8_activation_blocks_match_numpy():
    """``mode=weight_act,act_format=int8``: each linear's input is quantized to int8 blocks of 32 (float32 scale
    ``amax / 127``) in model.onnx; onnxruntime computes numpy's ``quantize_dequantize(x, "int8")`` on both inputs."""
    model, arrays = _toy()
    p = BlockQuantPass(format="int4_asym", embedding_format="int8", mode="weight_act", act_format="int8",
                       min_params=0)
    p(model)
    qdq = [n for n in model.graph if n.op_type == "BlockQDQ"]
    assert [n.attributes.get_string("format") for n in qdq] == ["int8", "int8"]
    (y,) = _run(model, {"ids": IDS})

    def act(x):
        return quantize_dequantize(x, "int8", axis=-1, scale_dtype="float32")

    table = quantize_dequantize(arrays["table"], "int8", axis=1)
    w1, w2 = (quantize_dequantize(arrays[n], "int4_asym", axis=a) for n, a in (("w1", 0), ("w2", 1)))
    ref = act(act(table[IDS[0]]) @ w1) @ w2.T + arrays["b2"]
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    assert np.abs(ref - (table[IDS[0]] @ w1) @ w2.T - arrays["b2"]).max() > 1e-3  # the activations are quantized
    with pytest.raises(PipelineError, match="act_format"):
        BlockQuantPass(format="int4_asym", mode="kv", act_format="int8")  # the KV cache takes MX formats


def test_options_are_validated_and_gptq_needs_calibration():
    with pytest.raises(PipelineError, match="format"):
        BlockQuantPass(format="mxfp5")
    with pytest.raises(PipelineError, match="block_size"):
        BlockQuantPass(block_size=24)
    with pytest.raises(PipelineError, match="act_format"):
        BlockQuantPass(act_format="int8")
    with pytest.raises(PipelineError, match=r"act_format='mxfp4'.*set only with mode=weight_act"):
        BlockQuantPass(act_format="mxfp4")  # mode=weight would ignore it
    with pytest.raises(PipelineError, match=r"act_format='bogus'.*MX format \(mxint8, .*or int8 with mode=weight_act"):
        BlockQuantPass(mode="weight_act", act_format="bogus")  # named as act_format, not as format
    with pytest.raises(CalibrationError):
        BlockQuantPass(format="mxfp4", gptq=True, min_params=0)(_toy()[0])


# --- MiniLM (real sentences) -----------------------------------------------------------------------------------


def _cosine(ref, out):
    return float(np.mean([np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
                          for a, b in zip(ref, out, strict=True)]))


def _embeddings(model, feeds):
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    idx = names.index("sentence_embedding") if "sentence_embedding" in names else -1
    return [sess.run(None, f)[idx] for f in feeds]


@pytest.fixture(scope="module")
def minilm():
    from effc import zoo

    entry = zoo.get("minilm-l6")
    feeds = entry.samples("eval", 4)
    return entry, feeds, _embeddings(entry.load(), feeds)


@pytest.mark.parametrize(("kwargs", "lo", "hi", "bits"), [
    ({"format": "mxfp4"}, 0.95, 0.975, 4.25),  # measured 0.960-0.963 (issue: 0.964)
    ({"format": "mxint8", "mode": "weight_act"}, 0.999, 1.0, 8.25),  # measured 0.9996 (issue: 0.9995)
])
def test_minilm_fidelity(minilm, kwargs, lo, hi, bits):
    entry, feeds, ref = minilm
    model = entry.load()
    p = BlockQuantPass(**kwargs)
    p(model)
    assert len(p.stats["layers"]) == 37  # 36 linear layers + the word embedding table
    assert p.stats["bits_per_weight"] == pytest.approx(bits)
    assert lo <= _cosine(ref, _embeddings(model, feeds)) <= hi


def test_minilm_kv_mode_quantizes_keys_and_values(minilm):
    entry, feeds, ref = minilm
    model = entry.load()
    p = BlockQuantPass(format="mxfp4", mode="kv")
    p(model)
    roles = [v["role"] for v in p.stats["kv_values"]]
    assert roles.count("k") == 6 and roles.count("v") == 6
    cos = _cosine(ref, _embeddings(model, feeds))
    assert 0.9 < cos < 0.9999


def test_gptq_lowers_output_error_on_held_out_inputs():
    from effc.ir.calibration import Calibration
    from effc.ops.block_formats import sqnr_db

    rng = np.random.default_rng(5)
    cal = Calibration([{"ids": rng.integers(0, 50, (1, 8))} for _ in range(16)], "toy ids")
    held_out = [{"ids": rng.integers(0, 50, (1, 8))} for _ in range(4)]
    ref = np.concatenate([_run(_toy()[0], f)[0] for f in held_out])
    sq = {}
    for gptq in (False, True):
        model, _ = _toy()
        p = BlockQuantPass(format="mxfp4", gptq=gptq, include=("fc1",), min_params=0, calibration=cal)
        p(model)
        assert p.stats["layers"]["w1"]["gptq"] is gptq
        sq[gptq] = sqnr_db(ref, np.concatenate([_run(model, f)[0] for f in held_out]))
    assert sq[True] > sq[False] + 1.0, sq


def _conv_toy(opset=11, seed=0):
    """x (1, 32, 8, 8) -> Conv W1 (64, 32, 3, 3) + b1 -> Relu -> Conv W2 (32, 64, 1, 1) -> Conv dw (32, 1, 3, 3)."""
    rng = np.random.default_rng(seed)
    arrays = {"w1": (rng.standard_normal((64, 32, 3, 3)) * 0.1).astype(np.float32),
              "b1": rng.standard_normal(64).astype(np.float32),
              "w2": (rng.standard_normal((32, 64, 1, 1)) * 0.1).astype(np.float32),
              "dw": rng.standard_normal((32, 1, 3, 3)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
         helper.make_node("Conv", ["c2", "dw"], ["y"], name="dwconv", group=32)],
        "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 6, 6])],
        [numpy_helper.from_array(a, n) for n, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(model), arrays


@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8", "int4"])
def test_conv_weights_blocked_along_cin_kh_kw(fmt):
    model, arrays = _conv_toy()
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 32, 8, 8)).astype(np.float32)}
    p = BlockQuantPass(format=fmt, min_params=0)
    p(model)
    layers = p.stats["layers"]
    assert {v["node"] for v in layers.values()} == {"conv1", "conv2"}  # depthwise: 9 per row, not a block multiple
    assert [s["reason"] for s in p.stats["skipped"] if s["node"] == "dwconv"] == [
        "blocked axis 9 not a multiple of block_size"]
    assert model.opset_imports[""] >= 13 and "w1" not in model.graph.initializers
    # reference: the same convs with each (Cout, Cin*kh*kw) row quantize-dequantized in blocks of 32
    ref_model, _ = _conv_toy()
    for name in ("w1", "w2"):
        w = arrays[name]
        deq = quantize_dequantize(w.reshape(w.shape[0], -1), fmt, axis=1).reshape(w.shape)
        ref_model.graph.initializers[name].const_value = ir.tensor(deq, name=name)
    run = [ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds)[0] for m in (model, ref_model)]
    np.testing.assert_allclose(run[0], run[1], rtol=1e-5, atol=1e-5)


def test_conv_macs_still_counted():
    from effc.eval.macs import count_macs

    model, _ = _conv_toy()
    before = count_macs(model)["by_node"]
    BlockQuantPass(format="mxfp4", min_params=0)(model)
    after = count_macs(model)["by_node"]
    assert after["conv1/conv"] == before["conv1"] == 64 * 32 * 9 * 8 * 8  # Cout * Cin * kh * kw * H * W


def test_weight_act_mode_keeps_every_mac_counted():
    # BlockQDQ carries X's shape, so the BlockQuantMatMul after it is counted; decode-only ops count zero MACs.
    from effc.eval.macs import count_macs

    model, _ = _toy()
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(ir.to_proto(model)))
    before = count_macs(model)
    BlockQuantPass(format="mxint8", mode="weight_act", min_params=0)(model)
    after = count_macs(model)
    assert after["unknown_shape"] == [] and after["uncounted"] == {}
    assert after["total"] == before["total"] > 0


@pytest.mark.parametrize("fmt", sorted(f for f in FORMATS if not FORMATS[f].has_minimum))
def test_gptq_output_error_never_above_rounding_on_calibration_inputs(fmt):
    """GPTQ minimises ``|X W - X Ŵ|`` on the X it was fitted to: never worse there than round-to-nearest."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 128)) * np.exp(rng.standard_normal(128))  # uneven input channels
    w = (rng.standard_normal((128, 48)) * 0.05).astype(np.float32)
    rtn = quantize_dequantize(w, fmt, axis=0)
    gptq = dequantize(gptq_quantize(w.T, hessian([x], 128), get_format(fmt), 32, damp=0.01))
    assert np.linalg.norm(x @ (w - gptq)) <= np.linalg.norm(x @ (w - rtn)), fmt


def test_gptq_falls_back_to_rounding_when_it_loses_on_held_out_calibration():
    """Too few calibration tokens (rank-deficient Hessian): GPTQ overfits, the held-out feeds pick rounding.

    MiniLM with its 32 default sentences (~300 tokens for K = 1536) fell to cosine 0.41 before this check.
    """
    from effc.ir.calibration import Calibration
    from effc.ops.block_formats import sqnr_db

    rng = np.random.default_rng(11)
    cal = Calibration([{"ids": rng.integers(0, 50, (1, 8))} for _ in range(4)], "toy ids")
    held_out = [{"ids": rng.integers(0, 50, (1, 8))} for _ in range(8)]
    ref = np.concatenate([_run(_toy()[0], f)[0] for f in held_out])
    sq = {}
    for gptq in (False, True):
        model, _ = _toy()
        p = BlockQuantPass(format="mxfp4", gptq=gptq, include=("fc1",), min_params=0, gptq_damp=0.01,
                           calibration=cal)
        p(model)
        sq[gptq] = sqnr_db(ref, np.concatenate([_run(model, f)[0] for f in held_out]))
        rejected = p.stats.get("gptq_rejected", [])
        assert p.stats["layers"]["w1"]["gptq"] is (gptq and not rejected)
        if gptq:  # 3 fit feeds x 8 tokens < K = 64
            assert rejected and "24 calibration tokens for K=64" in rejected[0]["reason"], rejected
    assert sq[True] >= sq[False] - 0.05, sq


def _tied(opset=17):
    """ids (5,) -> Gather(axis=1) of a tied table (64, 50) -> Transpose -> MatMul by the same table -> logits."""
    table = np.random.default_rng(4).standard_normal((64, 50)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["cols"], name="embed", axis=1),
            helper.make_node("Transpose", ["cols"], ["x"], name="rows", perm=[1, 0]),
            helper.make_node("MatMul", ["x", "table"], ["y"], name="lm_head"),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 50])],
        [numpy_helper.from_array(table, "table")],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])), table


@pytest.mark.parametrize("fmt", ["mxfp4", "int4", "int4_asym"])
def test_tied_embedding_is_quantized_once_for_lookup_and_projection(fmt):
    model, table = _tied()
    p = BlockQuantPass(format=fmt, min_params=0)
    assert p(model).modified
    effc_ops = [n.op_type for n in model.graph if n.domain == "effc"]
    assert sorted(effc_ops) == ["BlockQuantGather", "BlockQuantMatMul"]
    gather = next(n for n in model.graph if n.op_type == "BlockQuantGather")
    matmul = next(n for n in model.graph if n.op_type == "BlockQuantMatMul")
    assert gather.inputs[0] is matmul.inputs[1] and gather.inputs[1] is matmul.inputs[2]  # one packed table
    assert len(gather.inputs) == len(matmul.inputs) == (4 if fmt == "int4_asym" else 3)
    assert gather.inputs[3:] == matmul.inputs[3:]  # and one set of minimums (int4_asym)
    assert "table" not in model.graph.initializers  # the fp32 table is gone
    ids = np.array([0, 7, 49, -1, 12], np.int64)
    dq = quantize_dequantize(table, fmt, axis=0)  # blocks along the hidden axis for both uses
    np.testing.assert_allclose(_run(model, {"ids": ids})[0], dq[:, ids].T @ dq, rtol=1e-5, atol=1e-4)
