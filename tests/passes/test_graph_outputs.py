"""Every registered pass on the simplest graphs whose rewritten value is a graph output (issue 20, part 2).

``MatMul(X, W) -> Y`` with ``Y`` the graph output used to crash ``nm-sparsity`` inside onnx_ir ("Value 'Y' is an
output of graph 'g'"); a pass that replaces a node's output must keep the graph output and its name
(:func:`effc.passes.rewrite.replace_value`). The second graph also reads ``Y`` inside the graph, so a pass that
permutes ``Y``'s channels (channel-reorder) has to restore them for the output only.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.ir.reference import Reference
from effc.passes import PassManager, parse_pipeline, registered_passes
from tests.passes.nm_helpers import calibration

# Small options that make each pass rewrite a 64x64 MatMul; the bound is the largest relative output error
# (max |y' - y| / max |y|) the pass may cause on these random weights. A new pass must be added here.
PASS_CASES = {
    "block-quant": [("block-quant(min_params=16)", 0.05),
                    ("block-quant(format=mxfp4,min_params=16,gptq=true,lorc_rank=4)", 0.3),
                    ("block-quant(format=int8,mode=weight_act,min_params=16)", 0.05)],
    "channel-reorder": [("channel-reorder", 1e-5)],
    "cleanup": [("cleanup", 1e-5)],
    "cse": [("cse", 1e-5)],
    "dce": [("dce", 1e-5)],
    "identity-elim": [("identity-elim", 1e-5)],
    "nm-sparsity": [("nm-sparsity(method=magnitude,reconstruct=false)", 0.8),
                    ("nm-sparsity(reconstruct=true,permute=true)", 0.8),
                    ("nm-sparsity(method=magnitude,reconstruct=false,pack=false)", 0.8)],
    "prune": [("prune(sparsity=0.5,min_params=16)", 0.8)],
    "prune-structured": [("prune-structured(ratio=0.25)", 1e-5)],  # nothing coupled to shrink: exact no-op
}
# Passes that need a structure these one-MatMul graphs lack, with the test that checks the same property for them.
ELSEWHERE = {"moe": "tests/passes/test_moe.py::test_an_ffn_output_that_is_a_graph_output_keeps_its_name"}
# Passes with nothing to change on these graphs (channel-reorder needs ``Y`` read by a second MatMul).
UNCHANGED = {"cleanup", "cse", "dce", "identity-elim", "prune-structured"}
CASES = [pytest.param(text, bound, id=text) for cases in PASS_CASES.values() for text, bound in cases]
D = 64


def _graph(consumed: bool) -> onnx.ModelProto:
    """``MatMul(X, W) -> Y`` (graph output); with ``consumed`` also ``MatMul(Y, W2) -> Z`` (a second output)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, D])]
    inits = [numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "W")]
    if consumed:
        nodes.append(helper.make_node("MatMul", ["Y", "W2"], ["Z"], name="mm2"))
        outputs.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [4, D]))
        inits.append(numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "W2"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, D])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_every_registered_pass_has_a_case():
    assert set(PASS_CASES) | set(ELSEWHERE) == set(registered_passes())


@pytest.mark.parametrize("consumed", [False, True], ids=["output-only", "output-and-read"])
@pytest.mark.parametrize(("text", "bound"), CASES)
def test_pass_keeps_a_rewritten_graph_output_and_its_name(text, bound, consumed):
    proto = _graph(consumed)
    rng = np.random.default_rng(1)
    # outlier input channels give channel-reorder something to group
    feeds = [{"X": (rng.standard_normal((4, D)) * np.linspace(0.1, 4, D)).astype(np.float32)} for _ in range(8)]
    names = [o.name for o in proto.graph.output]
    result = PassManager(parse_pipeline(text, calibration=calibration(feeds))).run(ir.from_proto(proto))
    rewritten = ir.to_proto(result.model)
    assert result.modified == (text.split("(")[0] not in UNCHANGED and (consumed or "reorder" not in text))
    assert [o.name for o in rewritten.graph.output] == names
    onnx.checker.check_model(rewritten, full_check=True)
    ref, new = Reference(ir.from_proto(proto)), Reference(result.model)
    for feed in feeds[:2]:
        for want, got in zip(ref.run(feed), new.run(feed), strict=True):
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= bound * np.abs(want).max()
