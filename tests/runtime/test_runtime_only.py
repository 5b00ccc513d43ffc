"""effc.runtime runs a cpu artifact with TVM's runtime libraries only: no ``tvm`` import, no libtvm_compiler.so."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

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
