"""Indices computed in the model are range-checked by the compiled code itself (issue 20, part 3).

The Python pre-check only covers index operands that are graph inputs (through Cast/Reshape/...). Computed ones
escaped it: ``Add(idx, 1) -> GatherElements`` with idx=2**40 crashed ``effc run`` (SIGSEGV) and idx=3 returned
garbage; ``Cast(float -> int64) -> Gather`` with 7 returned 1.3e16 and -2**31 crashed. onnxruntime raises. Now an
``R.assert_op`` before the kernel fails and the runtime raises a DataError naming the node and the range.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

import effc.runtime
from effc.errors import DataError
from effc.ir.model import save
from tests.runtime.helpers import _model, build_artifact, ort_run

_F, _I = TensorProto.FLOAT, TensorProto.INT64
DATA = np.arange(12, dtype=np.float32).reshape(3, 4)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _add_gather_elements():
    nodes = [helper.make_node("Add", ["i", "one"], ["j"], name="add"),
             helper.make_node("GatherElements", ["d", "j"], ["y"], name="ge", axis=1)]
    return _model(nodes, [_vi("d", _F, [3, 4]), _vi("i", _I, [3, 2])], [_vi("y", _F, [3, 2])],
                  {"one": np.array(1, np.int64)}, opset=17)


def _cast_gather():
    nodes = [helper.make_node("Cast", ["f"], ["j"], name="cast", to=_I),
             helper.make_node("Gather", ["d", "j"], ["y"], name="g", axis=1)]
    return _model(nodes, [_vi("d", _F, [3, 4]), _vi("f", _F, [2])], [_vi("y", _F, [3, 2])], {}, opset=17)


MODELS = {"add_gather_elements": (_add_gather_elements, "i", "ge", np.array([[-5, 0], [2, 1], [-1, -2]], np.int64)),
          "cast_gather": (_cast_gather, "f", "g", np.array([-4.0, 3.0], np.float32))}
BAD = {"add_gather_elements": [2**40, 3, -6], "cast_gather": [7.0, -2.0**31, -5.0]}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("guard")
    for name, (make, *_rest) in MODELS.items():
        build_artifact(make(), root / name, {"threads": 1})
        save(make(), root / name / "model.onnx")
    return root


def _run_in_subprocess(art, index_name, index):
    """Run the artifact in a child process: a segfault there fails the test instead of killing pytest."""
    code = ("import sys, numpy as np, effc.runtime\n"
            "from effc.errors import DataError\n"
            f"m = effc.runtime.load({str(art)!r})\n"
            f"feeds = {{'d': np.arange(12, dtype='float32').reshape(3, 4), {index_name!r}: np.array({index.tolist()!r},"
            f" dtype={str(index.dtype)!r})}}\n"
            "try:\n    m.run(feeds)\nexcept DataError as exc:\n    print('DATAERROR', exc); sys.exit(0)\n"
            "print('NO ERROR'); sys.exit(5)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_computed_out_of_range_indices_raise_a_data_error_not_a_crash(artifacts, name):
    _make, index_name, node, good = MODELS[name]
    for bad in BAD[name]:
        index = good.copy()
        index.flat[0] = bad
        done = _run_in_subprocess(artifacts / name, index_name, index)
        assert done.returncode == 0, (bad, done.returncode, done.stdout, done.stderr[-2000:])
        assert f"node '{node}'" in done.stdout and "-4..3" in done.stdout, done.stdout


@pytest.mark.parametrize("name", sorted(MODELS))
def test_computed_in_range_indices_match_onnxruntime(artifacts, name):
    make, index_name, _node, good = MODELS[name]
    feeds = {"d": DATA, index_name: good}
    compiled = effc.runtime.load(artifacts / name)
    np.testing.assert_array_equal(compiled.run(feeds)[0], ort_run(make(), feeds)[0])
    with pytest.raises(DataError, match="outside the valid range"):  # in-process, once known not to crash
        compiled.run({"d": DATA, index_name: (good + 4).astype(good.dtype)})


def test_compile_without_data_whose_synthetic_samples_make_indices_out_of_range_asks_for_data(tmp_path):
    """Synthetic samples push ``Add(idx, 1)`` out of range in onnxruntime: a DataError, not an internal one."""
    from click.testing import CliRunner

    from effc.cli import cli

    model = tmp_path / "add.onnx"
    save(_add_gather_elements(), model)
    done = CliRunner().invoke(cli, ["compile", str(model), "-o", str(tmp_path / "out")])
    output = " ".join(done.output.split())
    assert done.exit_code == 1, output
    assert "onnxruntime refuses the input samples" in output and "pass real samples with --data" in output
    assert not (tmp_path / "out" / "model.so").exists()


def test_microcontroller_lowering_leaves_the_guard_out():
    """The guard calls effc's Python runtime; plain-C firmware has none, so the Cortex-M import omits it."""
    import onnx_ir as ir
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from effc.codegen.frontend import to_relax
    from effc.codegen.mcu.lower import model_to_relax

    table = nh.from_array(np.arange(32, dtype=np.float32).reshape(8, 4), "table")
    one = nh.from_array(np.array(1, dtype=np.int64), "one")
    graph = h.make_graph(
        [h.make_node("Add", ["idx", "one"], ["i2"]), h.make_node("Gather", ["table", "i2"], ["y"], axis=0)],
        "g", [h.make_tensor_value_info("idx", TensorProto.INT64, [1, 3])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])], [table, one])
    model = ir.from_proto(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)]))
    assert "effc.index_guard" in to_relax(model).script()
    assert "effc.index_guard" not in model_to_relax(model).script()
