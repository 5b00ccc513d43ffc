"""The cuda target without a GPU: options and errors, guarded DLight rules, fp16 tensor-core lowering (TIR level),
and the artifact: a fatbin (SASS, not CUDA source) with a kernel per fused function, refused to run without a GPU."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from click.testing import CliRunner
from tvm.script import relax as R

import effc.runtime
from effc.cli import cli
from effc.codegen.cuda import lower, rules
from effc.errors import TargetError, UnsupportedOpError
from effc.passes import nm_sparsity as nm
from effc.runtime.vm import cuda_device_count
from effc.targets import get_target
from effc.targets.cuda import ARCHS, effc_nodes
from tests.passes.nm_helpers import ffn_model
from tests.runtime.helpers import build_artifact, mlp

pytestmark = pytest.mark.skipif(cuda_device_count() > 0, reason="checks the no-GPU behaviour of this machine")
FATBIN_MAGIC = (0xBA55ED50).to_bytes(4, "little")


@pytest.fixture(scope="module")
def cuda_mlp(tmp_path_factory):
    return build_artifact(mlp(), tmp_path_factory.mktemp("cuda") / "out", {"arch": "sm_90"}, target="cuda")


def test_targets_command_lists_cuda_with_its_options():
    out = CliRunner().invoke(cli, ["targets"]).output
    assert "cuda" in out
    assert all(arch in out for arch in ARCHS)
    assert "gpu-precision" in out and "fallback" in out


@pytest.mark.parametrize(("options", "message"), [
    ({"arch": "sm_75"}, "unknown CUDA arch 'sm_75'"),
    ({"gpu_precision": "int3"}, "unknown gpu_precision 'int3'"),
    ({"gpu_precision": "bf16"}, "gpu_precision=bf16 is not implemented yet"),
    ({"fallback": "sparse"}, "unknown fallback 'sparse'"),
])
def test_bad_options_fail_before_any_work(tmp_path, options, message):
    with pytest.raises(TargetError, match=re.escape(message)):
        effc.compile(mlp(), target="cuda", out_dir=tmp_path / "out", target_options=options)
    assert not (tmp_path / "out").exists()


def test_capability_record_per_arch():
    hopper = ARCHS["sm_90"]
    assert hopper.smem_per_block == 227 * 1024 and "fp8" in hopper.tensor_core_dtypes
    assert "fp8" not in ARCHS["sm_80"].tensor_core_dtypes
    target = get_target("cuda").tvm_target({"arch": "sm_86"})
    assert str(target.attrs["arch"]) == "sm_86" and int(target.attrs["max_shared_memory_per_block"]) == 49152


def test_effc_operators_are_an_error_naming_them_unless_fallback_dense(tmp_path):
    model = ffn_model(k=64, hidden=128, seq=16)
    nm.NMSparsityPass(n=2, m=4, vector=16)(model)
    ops = effc_nodes(model)
    assert list(ops) == ["NMSparseMatMul"] and len(ops["NMSparseMatMul"]) == 2
    with pytest.raises(UnsupportedOpError, match="NMSparseMatMul") as info:
        get_target("cuda").build(model, tmp_path, {})
    assert "--fallback dense" in str(info.value.hint)
    from effc.targets.cuda import _dense_bodies

    assert effc_nodes(_dense_bodies(model)) == {}  # what --fallback dense compiles: the reference bodies inlined


class _Crashes(rules.dl.ScheduleRule):
    def apply(self, func, target, tunable):
        raise RuntimeError("Check failed: block_realize == old_block_realize_")

    def is_target_available(self, target):
        return True


def _softmax_module(dtype="float32", shape=(4, 96)):
    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor(shape, dtype)):
            with R.dataflow():
                y = R.nn.softmax(x, axis=-1)
                R.output(y)
            return y

    return Module


def test_a_crashing_rule_declines_and_the_next_one_schedules():
    target = get_target("cuda").tvm_target({})
    log = rules.RuleLog()
    with target:
        mod = tvm.relax.transform.LegalizeOps()(_softmax_module())
        mod = rules.schedule_pass(log, [_Crashes(), rules.dl.gpu.GeneralReduction(), rules.dl.gpu.Fallback()])(mod)
    assert rules.unscheduled(mod) == []
    assert log.chosen == {"softmax": "GeneralReduction"}
    assert log.crashed == {"softmax": ["_Crashes: Check failed: block_realize == old_block_realize_"]}


def _matmul_module(m=128, k=256, n=256):
    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((m, k), "float32"), w: R.Tensor((k, n), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                R.output(y)
            return y

    return Module


@pytest.mark.parametrize(("precision", "tensor_cores"), [
    ("fp32", False),
    # TVM builds its tensor-core intrinsics on first use: 65 s in a fresh process, 12 min in pytest at load 14
    pytest.param("fp16", True, marks=pytest.mark.slow),
])
def test_fp16_precision_puts_gemm_on_tensor_cores_fp32_stays_exact(precision, tensor_cores):
    log = rules.RuleLog()
    lowered = lower(_matmul_module(), get_target("cuda").tvm_target({}), precision, log)
    text = lowered.script()
    assert ("wmma.accumulator" in text) == tensor_cores
    assert ("float16" in text) == tensor_cores
    assert "Matmul" in log.counts()
    if tensor_cores:  # fp16 inputs, fp32 accumulation (TVMScript omits the default float32) and output
        assert not any("float16" in line for line in text.splitlines() if "wmma.accumulator" in line)


def test_artifact_embeds_a_fatbin_with_a_kernel_per_fused_function(cuda_mlp):
    blob = (cuda_mlp / "model.so").read_bytes()
    manifest = effc.runtime.read_manifest(cuda_mlp)
    info = manifest["target"]["info"]
    assert b"__global__" not in blob  # no CUDA source: nvcc ran at build time
    assert FATBIN_MAGIC in blob and info["fatbin_bytes"] > 0
    assert info["arch"] == "sm_90" and info["gpu_precision"] == "fp32"
    assert info["kernels"], "no fused function was scheduled"
    for fused in info["kernels"]:
        kernels = [k for k in info["device_kernels"] if k.startswith(f"{fused}_kernel")]
        assert kernels, f"no __global__ kernel for {fused}"
        for kernel in kernels:  # each kernel's SASS section is in the embedded fatbin
            assert f".text.{kernel}".encode() in blob


def test_loading_without_a_gpu_is_a_clear_error(cuda_mlp):
    with pytest.raises(TargetError, match=re.escape("built for sm_90; no CUDA device found")):
        effc.runtime.load(cuda_mlp)


def test_compile_without_a_gpu_reports_compiled_fidelity_not_measured(tmp_path):
    result = effc.compile(mlp(), target="cuda", out_dir=tmp_path / "out", eval_samples=2)
    assert result.report["fidelity"]["vs_original"] is None
    assert result.report["fidelity"]["rewritten_vs_original"]["summary"]["max_abs"] == 0
    assert result.report["latency"] is None
    assert "not measured" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "model.so").exists()


@pytest.mark.slow
def test_fallback_dense_builds_the_reference_bodies_and_says_so(tmp_path):
    model = ffn_model(k=64, hidden=128, seq=16)
    nm.NMSparsityPass(n=2, m=4, vector=16)(model)
    result = get_target("cuda").build(model, tmp_path, {"fallback": "dense"})
    assert result.info["fallback_dense"] == {"NMSparseMatMul": 2}
    assert b"__global__" not in (tmp_path / "model.so").read_bytes() and result.info["device_kernels"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["minilm-l6", "ppocr-det", "ppocr-rec", "ppocr-cls", "magika", "silero-vad"])
def test_zoo_model_builds_for_sm90_with_a_kernel_per_fused_function(tmp_path, name):
    # 4-35 s each on a quiet machine; the decoder (SmolLM2) is covered by test_cuda_ops' tiny Llama
    result = effc.compile(f"zoo:{name}", target="cuda", out_dir=tmp_path / "out", eval_samples=1,
                          measure_latency=False, target_options={"arch": "sm_90"})
    info = result.manifest["target"]["info"]
    assert sum(info["rule_counts"].values()) == len(info["kernels"]) >= 10
    assert all(any(k.startswith(f"{f}_kernel") for k in info["device_kernels"]) for f in info["kernels"])
    blob = (tmp_path / "out" / "model.so").read_bytes()
    assert b"__global__" not in blob and FATBIN_MAGIC in blob


def test_fp16_stores_constant_lookup_tables_in_half():
    from effc.codegen.cuda import half_tables

    table = np.arange(12, dtype=np.float32).reshape(6, 2)

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(ids: R.Tensor((1, 4), "int64")):
            with R.dataflow():
                y = R.take(R.const(table), ids, axis=0)
                R.output(y)
            return y

    text = half_tables(Module).script()
    assert "R.take(" in text
    assert 'dtype="float16"' in text and 'R.astype(' in text and '"float32")' in text
    assert half_tables(_softmax_module()).script() == _softmax_module().script()  # no take: unchanged
