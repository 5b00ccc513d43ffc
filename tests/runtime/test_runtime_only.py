"""effc.runtime runs a cpu artifact with TVM's runtime libraries only: no ``tvm`` import, no libtvm_compiler.so."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import effc
from tests.runtime.helpers import build_artifact, mlp, ort_run, random_feeds

_CHILD = """
import json, sys
import numpy as np
import effc.runtime
feeds = dict(np.load(sys.argv[2]))
outputs = effc.runtime.load(sys.argv[1]).run(feeds)
np.save(sys.argv[3], outputs[0])
maps = open("/proc/self/maps").read()
libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in maps.splitlines() if ".so" in line.split()[-1]})
print(json.dumps({"libs": [l for l in libs if "tvm" in l], "tvm_imported": "tvm" in sys.modules}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cpu_artifact_runs_without_the_compiler_library(tmp_path):
    model = mlp()
    out = build_artifact(model, tmp_path / "out", {"threads": 1})
    feeds = random_feeds(model)
    np.savez(tmp_path / "feeds.npz", **feeds)
    args = [sys.executable, "-c", _CHILD, str(out), str(tmp_path / "feeds.npz"), str(tmp_path / "y.npy")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "libtvm_runtime.so" in loaded["libs"] and "libtvm_ffi.so" in loaded["libs"]
    assert "libtvm_compiler.so" not in loaded["libs"]
    assert loaded["tvm_imported"] is False
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ort_run(model, feeds)[0], rtol=1e-5, atol=1e-5)


_CHILD_ALL = """
import sys
import numpy as np
import effc.runtime
outputs = effc.runtime.load(sys.argv[1]).run(dict(np.load(sys.argv[2])))
np.savez(sys.argv[3], *outputs)
assert "tvm" not in sys.modules
"""


def _nms_and_topk() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """NonMaxSuppression (3 overlapping boxes, 2 apart) beside a TopK with ties: both lower to TVM's sort kernels."""
    consts = [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
              (("m", [3], np.int64), ("iou", [0.5], np.float32), ("st", [0.0], np.float32), ("k", [3], np.int64))]
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "m", "iou", "st"], ["selected"]),
         helper.make_node("TopK", ["logits", "k"], ["values", "indices"])], "g",
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 6, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 1, 6]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("selected", TensorProto.INT64, [None, 3]),
         helper.make_tensor_value_info("values", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("indices", TensorProto.INT64, [2, 3])], consts)
    feeds = {
        "boxes": np.array([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, -0.1, 1, 0.9], [0, 10, 1, 11], [0, 10.1, 1, 11.1],
                            [0, 100, 1, 101]]], np.float32),
        "scores": np.array([[[0.9, 0.75, 0.6, 0.95, 0.5, 0.3]]], np.float32),
        "logits": np.array([[3, 1, 3, 2, 5, 5], [0, -1, 7, 7, 7, 1]], np.float32),
    }
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), feeds


def test_sort_kernels_run_without_the_compiler_library(tmp_path):
    # TVM's CPU argsort/topk call tvm.contrib.sort.* packed functions that only libtvm_compiler.so registers
    model, feeds = _nms_and_topk()
    effc.compile(model, out_dir=tmp_path / "out", data=[feeds], measure_latency=False)
    np.savez(tmp_path / "feeds.npz", **feeds)
    args = [sys.executable, "-c", _CHILD_ALL, str(tmp_path / "out"), str(tmp_path / "feeds.npz"),
            str(tmp_path / "y.npz")]
    subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    got = np.load(tmp_path / "y.npz")
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert expected[0].tolist() == [[0, 0, 3], [0, 0, 0], [0, 0, 5]]
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(got[f"arr_{i}"], want)
