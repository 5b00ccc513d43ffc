"""The cpu target: capability record, TVM target from options, build → manifest → effc.runtime.load vs onnxruntime."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tvm

import effc.runtime
from effc.errors import TargetError, UnsupportedOpError
from effc.targets import get_target
from effc.targets.cpu import CpuTarget, set_runtime_threads
from tests.runtime.helpers import build_artifact, conv_pool, mlp, ort_run, random_feeds, two_in_two_out


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_capability_record_describes_the_host():
    cpu = get_target("cpu")
    assert isinstance(cpu, CpuTarget) and cpu.name == "cpu"
    assert cpu.mcpu == str(tvm.target.codegen.llvm_get_system_cpu()) and cpu.mcpu
    flags = _cpu_flags()
    expected = 512 if "avx512f" in flags else 256 if "avx2" in flags else None
    if expected is not None:
        assert cpu.vector_bits == expected
    assert 1 <= cpu.num_cores
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.mcpu = "other"  # type: ignore[misc]
    assert {"threads", "mcpu"} <= set(cpu.option_names())


def test_tvm_target_from_options():
    cpu = get_target("cpu")
    target = cpu.tvm_target({"threads": 3, "mcpu": "skylake-avx512"})
    assert str(target.attrs["mcpu"]) == "skylake-avx512" and int(target.attrs["num-cores"]) == 3
    assert str(cpu.tvm_target({}).attrs["mcpu"]) == cpu.mcpu
    with pytest.raises(TargetError, match="mcpu='pentium-9000'"):
        cpu.tvm_target({"mcpu": "pentium-9000"})
    with pytest.raises(TargetError, match="threads"):
        cpu.tvm_target({"threads": 0})


@pytest.mark.parametrize("make", [mlp, conv_pool], ids=["mlp", "conv_pool"])
def test_build_load_run_matches_ort(tmp_path, make):
    model = make()
    out = build_artifact(model, tmp_path / "out", {"threads": 1})
    assert (out / "model.so").is_file()
    compiled = effc.runtime.load(out)
    info = compiled.manifest["target"]["info"]
    assert info["mcpu"] == get_target("cpu").mcpu and info["threads"] == 1 and info["kernels"]
    assert min(info["compile_seconds"], info["export_seconds"], info["import_seconds"]) > 0
    assert '"num-cores":1' in info["tvm_target"]
    for seed in (0, 1):
        feeds = random_feeds(model, seed)
        got, want = compiled.run(feeds), ort_run(model, feeds)
        assert len(got) == len(want) == 1
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_two_inputs_two_outputs_in_manifest_order(tmp_path):
    model = two_in_two_out()
    compiled = effc.runtime.load(build_artifact(model, tmp_path / "out"))
    assert [s["name"] for s in compiled.inputs] == ["a", "b"]
    assert [s["name"] for s in compiled.outputs] == ["s", "m"]
    feeds = random_feeds(model, 3)
    got = compiled.run({"b": feeds["b"], "a": feeds["a"]})  # dict order does not matter
    want = ort_run(model, feeds)
    assert [g.shape for g in got] == [(3, 5), (3,)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_unsupported_op_stops_the_build_before_tvm(tmp_path):
    from tests.codegen.test_frontend import _model_with_unsupported

    with pytest.raises(UnsupportedOpError, match="Det"):
        get_target("cpu").build(_model_with_unsupported(), tmp_path, {})
    assert not (tmp_path / "model.so").exists()


def test_runtime_threads_option_is_applied():
    assert set_runtime_threads(1) == 1 == tvm.runtime.num_threads()
    assert set_runtime_threads(2) == tvm.runtime.num_threads() <= 2


def test_fresh_process_runs_with_the_manifest_thread_count(tmp_path):
    """TVM's default pool is half the logical CPUs; a fresh process must still get threads=2 (where 2 cores exist).

    The same process shows that loading and running an artifact never imports effc.passes.
    """
    model = two_in_two_out()
    out = build_artifact(model, tmp_path / "out", {"threads": 2})
    code = (
        "import sys, numpy as np, tvm, effc.runtime\n"
        f"m = effc.runtime.load({str(out)!r})\n"
        "m.run({'a': np.zeros((3, 5), np.float32), 'b': np.zeros(5, np.float32)})\n"
        "print('effc.passes' in sys.modules, tvm.runtime.num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    passes_imported, threads = done.stdout.split()[-2:]
    assert passes_imported == "False"
    assert int(threads) == min(2, get_target("cpu").num_cores)


PPOCR_CLS = "ch_ppocr_mobile_v2.0_cls_infer.onnx"


@pytest.mark.slow
def test_ppocr_cls_matches_ort(tmp_path):
    import rapidocr_onnxruntime

    from effc.ir.canonicalize import canonicalize
    from effc.ir.model import load

    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / PPOCR_CLS
    if not path.is_file():
        pytest.skip(f"{PPOCR_CLS} not shipped with rapidocr_onnxruntime")
    model = canonicalize(load(path), input_shapes={"x": (1, 3, 48, 192)})
    start = time.perf_counter()
    out = build_artifact(model, tmp_path / "out", {"threads": 1})
    build_seconds = time.perf_counter() - start
    compiled = effc.runtime.load(out)
    feeds = {"x": np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)}
    got, want = compiled.run(feeds), ort_run(model, feeds)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4)
    assert np.argmax(got[0]) == np.argmax(want[0])
    assert build_seconds < 300
