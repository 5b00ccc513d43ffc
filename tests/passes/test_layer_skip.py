"""layer-skip: residual blocks found, ranked and removed (structure, exact numbers, compiled, MiniLM held-out)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from effc.errors import CalibrationError, PassError
from effc.ir.calibration import Calibration
from effc.ir.reference import Reference
from effc.ir.residual import find_layers, find_residual_blocks
from effc.passes.layer_skip import LayerSkipPass
from effc.passes.pipeline import parse_pipeline
from effc.passes.skip_scoring import row_cosine
from tests.conftest import make_mlp


def _tiny_model(layers=3, d=16, seed=0):
    """A post-norm transformer of ``layers`` layers (single-head attention + ReLU FFN) over x (1, 8, d)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"

    def weight(name, *shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=f"/layers.{i}/{out}", **attrs))
        return out

    scale, gamma, beta = weight("scale", 1), weight("gamma", d), weight("beta", d)
    for i in range(layers):
        q, k, v = (node("MatMul", [x, weight(f"layers.{i}.attn.{n}.weight", d, d)], f"{n}{i}") for n in "qkv")
        scores = node("Mul", [node("MatMul", [q, node("Transpose", [k], f"kt{i}", perm=[0, 2, 1])], f"s{i}"), scale],
                      f"ss{i}")
        ctx = node("MatMul", [node("Softmax", [scores], f"p{i}", axis=-1), v], f"c{i}")
        o = node("MatMul", [ctx, weight(f"layers.{i}.attn.o.weight", d, d)], f"o{i}")
        a = node("LayerNormalization", [node("Add", [x, o], f"r{i}"), gamma, beta], f"a{i}", axis=-1)
        h = node("Add", [node("MatMul", [a, weight(f"layers.{i}.ffn.up.weight", d, 2 * d)], f"h{i}"),
                         weight(f"layers.{i}.ffn.up.bias", 2 * d)], f"hb{i}")
        f = node("Add", [node("MatMul", [node("Relu", [h], f"g{i}"), weight(f"layers.{i}.ffn.down.weight", 2 * d, d)],
                              f"f{i}"), weight(f"layers.{i}.ffn.down.bias", d)], f"fb{i}")
        x = node("LayerNormalization", [node("Add", [a, f], f"r2{i}"), gamma, beta], "y" if i == layers - 1
                 else f"y{i}", axis=-1)
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.from_proto(onnx.shape_inference.infer_shapes(proto))


@pytest.fixture(scope="module")
def tiny():
    return None, _tiny_model()


def _copy(model):
    return ir.from_proto(ir.to_proto(model))


def _feeds(model, n, seed=0):
    rng = np.random.default_rng(seed)
    name = model.graph.inputs[0].name
    return [{name: rng.standard_normal((1, 8, 16)).astype(np.float32)} for _ in range(n)]


def _outputs(model, feeds):
    ref = Reference(model)
    return [ref.run(f)[0] for f in feeds]


def test_finds_attention_and_ffn_sub_blocks_and_layers(tiny):
    blocks = find_residual_blocks(tiny[1])
    assert [b.kind for b in blocks] == ["attention", "ffn"] * 3
    assert all(b.norm is not None and not b.leaks for b in blocks)
    layers = find_layers(blocks)
    assert [la.index for la in layers] == [0, 1, 2]
    assert layers[1].attention.skip is layers[0].ffn.output
    assert blocks[1].weight_bytes() == (16 * 32 + 32 + 32 * 16 + 16) * 4  # up, down and their biases


def test_nothing_removed_is_exact_and_reports_candidates(tiny):
    model = _copy(tiny[1])
    feeds = _feeds(model, 3)
    before = _outputs(model, feeds)
    p = LayerSkipPass(count=0, calibration=Calibration(feeds, "random"))
    assert not p(model).modified
    assert [c["kind"] for c in p.stats["found"]] == ["layer"] * 3 and all("influence" in c for c in p.stats["found"])
    for a, b in zip(before, _outputs(model, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    report = LayerSkipPass(mode="report", blocks="sublayer")
    assert not report(model).modified and report.unchanged_reason() is None
    assert len(report.stats["found"]) == 6


@pytest.mark.parametrize("norm", ["keep", "drop"])
def test_removal_shrinks_graph_and_matches_the_gated_score(tiny, norm):
    model = _copy(tiny[1])
    feeds = _feeds(model, 4)
    before, bytes_before = _outputs(model, feeds), sum(v.const_value.nbytes for v in model.graph.initializers.values())
    p = LayerSkipPass(blocks="sublayer", rank="sleb", count=2, norm=norm, calibration=Calibration(feeds, "random"))
    assert p(model).modified
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert len(find_residual_blocks(model)) == 4
    bytes_after = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert bytes_before - bytes_after == p.stats["weight_bytes_removed"] > 0
    # the scores the search measured on gated copies are those of the rewritten graph (adjacent blocks included)
    measured = np.mean([row_cosine(a, b) for a, b in zip(before, _outputs(model, feeds), strict=True)])
    assert measured == pytest.approx(p.stats["score_after"], abs=1e-5)
    assert not LayerSkipPass(count=0, rank="last")(model).modified


def test_sleb_first_step_is_the_best_single_removal(tiny):
    feeds = _feeds(tiny[1], 4)
    calib = Calibration(feeds, "random")
    firsts = {}
    for rank in ("influence", "sleb", "last"):
        p = LayerSkipPass(blocks="sublayer", rank=rank, count=1, calibration=calib)
        p(_copy(tiny[1]))
        firsts[rank] = p.stats["score_after"]
    assert firsts["sleb"] >= max(firsts["influence"], firsts["last"]) - 1e-12


def test_min_cosine_bounds_the_removal(tiny):
    model = _copy(tiny[1])
    calib = Calibration(_feeds(model, 4), "random")
    p = LayerSkipPass(blocks="sublayer", rank="sleb", min_cosine=0.9, calibration=calib)
    p(model)
    assert all(r["score_after"] >= 0.9 for r in p.stats["removed"])
    assert len(p.stats["removed"]) < 6


@pytest.mark.slow
def test_compiled_equals_onnxruntime_with_nothing_and_one_layer_removed(tiny, tmp_path):
    import effc

    for count in (0, 1):
        result = effc.compile(_copy(tiny[1]), passes=f"layer-skip(count={count},rank=last)",
                              out_dir=tmp_path / f"c{count}", eval_samples=2, latency_repeat=1)
        fid = result.report["fidelity"]
        assert fid["compiled_vs_rewritten"]["summary"]["max_abs"] < 1e-5
        if count == 0:
            assert fid["vs_original"]["summary"]["max_abs"] < 1e-5
        else:
            assert fid["vs_original"]["summary"]["max_abs"] > 1e-3  # the last layer really is gone


def test_no_residual_structure_is_a_clear_error():
    model = ir.from_proto(make_mlp())
    with pytest.raises(PassError, match="no residual block.*Add\\(x, f\\(x\\)\\)"):
        LayerSkipPass(count=1, rank="last")(model)


def test_options_and_pipeline_text():
    p = parse_pipeline("layer-skip(blocks=ffn,rank=sleb,count=2)")
    assert str(p) == "layer-skip(blocks=ffn,rank=sleb,count=2)"
    with pytest.raises(Exception, match="ratio"):
        LayerSkipPass(ratio=1.5)
    with pytest.raises(Exception, match="blocks"):
        parse_pipeline("layer-skip(blocks=heads)")
    with pytest.raises(Exception, match="one of count= or ratio="):
        LayerSkipPass(count=1, ratio=0.2)


def test_a_count_above_the_removable_blocks_is_refused(tiny):
    with pytest.raises(PassError, match=r"count=99\) asks for more blocks than the"):
        LayerSkipPass(count=99, rank="last")(_copy(tiny[1]))


def test_draft_mode_is_for_decoders_and_checks_its_options(tiny):
    with pytest.raises(PassError, match="mode=draft.*decoder"):
        LayerSkipPass(mode="draft", count=1, rank="last")(_copy(tiny[1]))
    with pytest.raises(CalibrationError):  # the draft is measured when no count/ratio fixes it
        LayerSkipPass(mode="draft", rank="last")(_copy(tiny[1]))
    assert str(parse_pipeline("layer-skip(mode=draft,tokens=3)")) == "layer-skip(mode=draft,tokens=3)"
    with pytest.raises(Exception, match="tokens"):
        parse_pipeline("layer-skip(mode=draft,tokens=0)")


def test_ranking_without_calibration_is_refused(tiny):
    with pytest.raises(CalibrationError, match="rank=influence"):
        LayerSkipPass(count=1)(_copy(tiny[1]))


@pytest.mark.slow
def test_minilm_influence_beats_naive_on_held_out_sentences():
    from effc import zoo
    from effc.ir.canonicalize import canonicalize
    from effc.ir.model import load

    entry = zoo.get("minilm-l6")
    base = canonicalize(load(entry.path()), input_shapes=entry.input_shapes, constant_inputs=entry.constant_inputs)
    calib = Calibration(entry.samples("calibration", 4), "minilm calibration")
    held_out = entry.samples("eval", 6)
    reference = [Reference(base).run(f)[1] for f in held_out]
    cosine = {}
    for rank in ("influence", "last"):
        model = _copy(base)
        p = LayerSkipPass(blocks="ffn", rank=rank, count=2, output="sentence_embedding", calibration=calib)
        assert p(model).modified
        got = [Reference(model).run(f)[1] for f in held_out]
        cosine[rank] = np.mean([row_cosine(a, b) for a, b in zip(reference, got, strict=True)])
    assert cosine["influence"] > cosine["last"] + 0.05 and cosine["influence"] > 0.8


def _adaptive(base, ratio, n=8):
    model = _copy(base)
    feeds = _feeds(model, n)
    p = LayerSkipPass(mode="adaptive", blocks="ffn", ratio=ratio, calibration=Calibration(feeds, "random"))
    return model, feeds, p, p(model).modified


def _decisions(model, feeds, gates=3):
    from effc.ir.reference import with_taps

    tapped = Reference(with_taps(model, [f"effc_ffn_gate_{k}_run" for k in range(gates)]))
    return [[bool(v) for v in tapped.run(f)[1:]] for f in feeds]


def test_adaptive_gates_are_if_nodes_calibrated_to_the_skip_rate(tiny):
    base = tiny[1]
    model, feeds, p, modified = _adaptive(base, 0.5)
    assert modified and [n.op_type for n in model.graph].count("If") == 3
    assert [g["calibration_skip_rate"] for g in p.stats["gates"]] == [0.5, 0.5, 0.5]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    decisions = _decisions(model, feeds)
    assert 0.3 <= 1 - np.mean(decisions) <= 0.7  # measured in the rewritten graph: about the calibrated rate
    # a sequence whose gates all run gives the original outputs; the FFN weights left the main graph's nodes
    before, after = _outputs(base, feeds), _outputs(model, feeds)
    for runs, a, b in zip(decisions, before, after, strict=True):
        if all(runs):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert not any(n.op_type == "Relu" for n in model.graph)
    nothing, _, _, _ = _adaptive(base, 0.0)
    for a, b in zip(before, _outputs(nothing, feeds), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_adaptive_needs_ffn_blocks_and_a_ratio(tiny):
    with pytest.raises(PassError, match="mode=adaptive"):
        LayerSkipPass(mode="adaptive", blocks="layer", ratio=0.2,
                      calibration=Calibration(_feeds(tiny[1], 2), "r"))(_copy(tiny[1]))


@pytest.mark.slow
def test_compiled_if_skips_the_ffn_kernels(tiny, tmp_path):
    import tvm

    import effc
    from effc.codegen import build

    model, feeds, _, _ = _adaptive(tiny[1], 0.5)
    decisions = _decisions(model, feeds)
    result = effc.compile(model, out_dir=tmp_path / "adaptive", eval_samples=2, latency_repeat=1)
    vm = build.load_vm(result.out_dir / "model.so", tvm.cpu())
    compiled = effc.runtime.load(result.out_dir)
    calls = []
    for feed, ref in zip(feeds, _outputs(model, feeds), strict=True):
        np.testing.assert_allclose(compiled.run(feed)[0], ref, atol=1e-5)
        kernels = build.kernel_profile(vm, [build.to_tvm_tensor(feed["x"], tvm.cpu())], reps=1)
        calls.append(sum(k["calls"] for k in kernels if not k["name"].startswith("vm.builtin")))
    ran = [sum(d) for d in decisions]
    assert len(set(ran)) > 1
    # every FFN that runs adds the same kernel calls; a skipped one adds none
    per_ffn = {(c - min(calls)) / (r - min(ran)) for c, r in zip(calls, ran, strict=True) if r != min(ran)}
    assert len(per_ffn) == 1 and per_ffn.pop() >= 2


@pytest.mark.parametrize("norm", ["keep", "drop"])
def test_removed_last_layer_keeps_the_graph_output_name(tiny, norm):
    from effc.ir.reference import with_taps

    model = _copy(tiny[1])
    feeds = _feeds(model, 2)
    layer1 = [Reference(with_taps(tiny[1], ["y1"])).run(f)[1] for f in feeds]  # the last layer's input
    assert LayerSkipPass(count=1, rank="last", norm=norm)(model).modified
    assert [o.name for o in model.graph.outputs] == ["y"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    if norm == "drop":  # y = x: the output is the removed layer's input
        for want, got in zip(layer1, _outputs(model, feeds), strict=True):
            np.testing.assert_array_equal(got, want)


def test_layer_skip_after_block_quant_says_to_put_it_first(tiny):
    from effc.passes import PassManager

    model = _copy(tiny[1])
    text = "block-quant(format=int4_asym,min_params=0),layer-skip(count=1,rank=last)"
    # here the attention blocks survive (no layer is found): the warning names the order
    with pytest.raises(PassError, match=r"no layer block to remove.*fix: put layer-skip first in --passes"):
        PassManager(parse_pipeline(text), strict=True).run(model)
    # a model left with no residual block at all: the error names the order
    model = ir.from_proto(make_mlp())
    PassManager(parse_pipeline("block-quant(format=int8,min_params=0)")).run(model)
    with pytest.raises(PassError, match=r"turned the weight MatMul/Gemm/Conv.*fix: put layer-skip first"):
        LayerSkipPass(count=1, rank="last")(model)


def _residual_conv():
    """x (1, 4, 5, 5) → Add(x, Relu(Conv(x))): one residual conv block and no transformer FFN."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 4, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Add", ["x", "r"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])], [w])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_adaptive_on_a_model_without_ffn_names_the_missing_kind_not_ratio():
    from effc.passes import PassManager

    cal = Calibration([{"x": np.ones((1, 4, 5, 5), np.float32)}], source="test")
    text = "layer-skip(mode=adaptive,ratio=0.25)"
    (warning,) = PassManager(parse_pipeline(text, calibration=cal)).run(_residual_conv()).records[0].warnings
    assert "the model has no ffn block to gate (residual blocks found: 1 conv)" in warning
    with pytest.raises(PassError, match=r"fix: mode=adaptive gates transformer FFN sub-blocks only, and"):
        PassManager(parse_pipeline(text, calibration=cal), strict=True).run(_residual_conv())
