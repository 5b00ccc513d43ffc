"""effc operators and decoders on the cuda target, without a GPU.

What runs here: the GPU lowerings' Relax modules compiled for the CPU (same unscheduled TIR computes that DLight
schedules for the GPU) against onnxruntime; the cuda builds (fatbin with the expected kernels); the device-cache
decoder backend on a CPU build of the same entry points + KV writers against onnxruntime. The GPU run itself is
benchmarks/gpu_check.py's job.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from effc.codegen.frontend import to_relax
from effc.passes.block_quant import BlockQuantPass
from effc.runtime.vm import cuda_device_count
from effc.targets import get_target
from tests.passes.nm_helpers import ffn_model

pytestmark = pytest.mark.skipif(cuda_device_count() > 0, reason="checks the no-GPU behaviour of this machine")
CUDA = get_target("cuda")


def _quantized_ffn(fmt: str, seq: int = 16) -> ir.Model:
    model = ffn_model(k=64, hidden=128, seq=seq)
    BlockQuantPass(format=fmt, min_params=0)(model)
    return model


@pytest.mark.parametrize(("fmt", "seq"), [("int4", 16), ("mxfp4", 1), ("mxint8", 16), ("int4_asym", 1),
                                        ("int4_asym", 16)])
def test_gpu_lowering_of_block_quant_matches_onnxruntime_on_cpu(fmt, seq, monkeypatch):
    from effc.codegen.cuda import ops as cuda_ops

    # M = 1 gets a thread-bound schedule (GPU only); schedules only reorder and bind loops, so the compute is
    # what is checked here
    monkeypatch.setattr(cuda_ops, "schedule_gemv", lambda func: func)
    model = _quantized_ffn(fmt, seq)
    x = np.random.default_rng(3).standard_normal((1, seq, 64)).astype(np.float32)
    ref = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    with CUDA.tvm_target({}):  # the cuda converter: the unscheduled decode-in-GEMM compute
        mod = to_relax(model)
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum(k.startswith("effc_block_quant_gpu") for k in kernels) == 2
    assert not any(f.attrs and "tir.is_scheduled" in f.attrs for f in mod.functions.values()
                   if isinstance(f, tvm.tirx.PrimFunc))  # left to DLight on the GPU
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("fmt", "seq"), [("int4", 16), ("mxfp4", 1), ("int4_asym", 1)])
def test_block_quant_builds_for_cuda_without_fallback(tmp_path, fmt, seq):
    result = CUDA.build(_quantized_ffn(fmt, seq), tmp_path, {"arch": "sm_90"})
    info = result.info
    assert info["effc_ops"] == {"BlockQuantMatMul": {"nodes": 2, "lowering": "kernel"}}
    assert "fallback_dense" not in info
    gpu = sorted({k.removesuffix("_kernel") for k in info["device_kernels"] if "block_quant_gpu" in k})
    assert len(gpu) == 2
    if seq == 1:  # effc's GEMV schedule (DLight's GEMV rule declines this compute)
        assert not any(k in info["kernels"] for k in gpu)
    else:  # DLight's Matmul rule
        assert {info["kernels"][k] for k in gpu} == {"Matmul"}
    assert b"__global__" not in (tmp_path / "model.so").read_bytes()


def _kv_writer_module() -> tvm.IRModule:
    from effc.codegen.kv_write import add_kv_writer

    builder = relax.BlockBuilder()
    add_kv_writer(builder, "decode", [("past_key.0", "key.0", 2, (2, 4, 16), "float32"),
                                      ("past_value.0", "value.0", 1, (2, 16, 4), "float32")], 3)
    return builder.get()


def test_kv_writer_writes_in_place_and_drops_slots_past_the_cache():
    rng = np.random.default_rng(0)
    vm = relax.VirtualMachine(tvm.compile(_kv_writer_module(), target="llvm"), tvm.cpu())
    k, v = rng.standard_normal((2, 4, 3)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)
    pk, pv = tvm.runtime.tensor(np.zeros((2, 4, 16), np.float32)), tvm.runtime.tensor(np.zeros((2, 16, 4), np.float32))
    for start in (5, 14):  # 14: the third token would land at slot 16, past the cache
        positions = tvm.runtime.tensor(np.arange(start, start + 3, dtype=np.int64)[None])
        vm["decode_kv_write"](pk, pv, tvm.runtime.tensor(k), tvm.runtime.tensor(v), positions)
    keys, values = pk.numpy(), pv.numpy()  # the tensors given are the caches written
    np.testing.assert_array_equal(keys[:, :, 5:8], k)
    np.testing.assert_array_equal(values[:, 5:8], v)
    np.testing.assert_array_equal(keys[:, :, 14:], k[:, :, :2])
    np.testing.assert_array_equal(values[:, 14:], v[:, :2])
    untouched = [i for i in range(16) if i not in (5, 6, 7, 14, 15)]
    assert not keys[:, :, untouched].any() and not values[:, untouched].any()


def test_kv_writer_compiles_for_cuda():
    from effc.codegen.cuda import compile_cuda

    _, info = compile_cuda(_kv_writer_module(), CUDA.tvm_target({}), {})
    assert info["kernels"] == {"decode_kv_write_axis1": "Fallback", "decode_kv_write_axis2": "Fallback"}
    assert info["device_kernels"] == ["decode_kv_write_axis1_kernel", "decode_kv_write_axis2_kernel"]


def _tiny_graph():
    from benchmarks.gpu_check import tiny_llama

    return tiny_llama(vocab_size=256, max_cache=32, chunk=8)


def _entries(graph: ir.Model) -> dict[str, ir.Model]:
    """``prefill`` (the chunk) and ``decode`` (one token), attention fused in both, as compile_decoder makes them."""
    from effc.decoder.attention import fuse_decode_attention
    from effc.ir.decoder import specialize

    entries = {"prefill": specialize(graph, 8), "decode": specialize(graph, 1)}
    assert [fuse_decode_attention(model) for model in entries.values()] == [2, 2]
    return entries


@pytest.fixture(scope="module")
def tiny():
    return _tiny_graph()


def _cpu_library_with_kv_writers(graphs: dict[str, ir.Model], path):
    """The cuda decoder's functions (entries + <entry>_kv_write) built for this CPU, loaded by a VmRunner."""
    from effc.codegen import build as tvm_build
    from effc.codegen.cpu import compile_cpu
    from effc.codegen.entries import merge_entry_modules
    from effc.codegen.kv_write import kv_write_module
    from effc.runtime.vm import VmRunner

    target = get_target("cpu").tvm_target({"threads": 1})
    with target:
        mod = merge_entry_modules({name: to_relax(g) for name, g in graphs.items()})
    for gvar, func in kv_write_module(graphs).functions_items():
        mod[gvar] = func
    executable, _ = compile_cpu(mod, target, {})
    tvm_build.export_library(executable, path)
    return VmRunner(path, "cpu", [v.name for v in graphs["prefill"].graph.inputs], 1, "prefill")


@pytest.mark.slow
def test_device_cache_backend_matches_onnxruntime_on_a_cpu_build(tiny, tmp_path):
    """The cuda decoder's runtime path (cache in device tensors, <entry>_kv_write in place) on a CPU build; its
    ``prefill_last`` (the last token's logits, ``last_index`` after the cache) gives prefill's last row."""
    from effc.decoder.last_token import entry_graph
    from effc.ir.decoder import PREFILL_LAST, decoder_info
    from effc.runtime.decoder import DecoderSession, DeviceCacheBackend, OrtBackend

    graphs = {**_entries(tiny), PREFILL_LAST: entry_graph(tiny, 8)}
    info = {**decoder_info(tiny), "chunk": 8, "entries": list(graphs)}  # as the manifest lists them
    mine = DecoderSession(DeviceCacheBackend(_cpu_library_with_kv_writers(graphs, tmp_path / "model.so")), info)
    ref = DecoderSession(OrtBackend(graphs), info)
    ids = [5, 17, 3, 99, 42, 7, 1, 250, 64, 8, 31]  # one full chunk, one padded chunk of 3
    np.testing.assert_allclose(mine.prefill(ids), ref.prefill(ids), atol=1e-4)
    for token in (12, 200, 77):
        np.testing.assert_allclose(mine.decode(token), ref.decode(token), atol=1e-4)
    assert not any(a.any() for a in mine.cache.values())  # the host arrays stay untouched: the cache is in tensors
    mine.reset()
    ref.reset()
    np.testing.assert_allclose(mine.prefill(ids[:4]), ref.prefill(ids[:4]), atol=1e-4)  # stale slots are masked
    mine.reset()
    ref.reset()
    assert mine.has_prefill_last
    np.testing.assert_allclose(mine.prefill_last(ids), ref.prefill(ids)[-1], atol=1e-4)
    np.testing.assert_allclose(mine.decode(12), ref.decode(12), atol=1e-4)  # the cache prefill_last wrote


@pytest.mark.slow
@pytest.mark.parametrize("passes", ["", "block-quant(format=int4)"])
def test_decoder_builds_for_cuda_with_kv_writers(tiny, tmp_path, passes):
    from effc.passes.pipeline import parse_pipeline

    graph = _tiny_graph() if passes else tiny  # passes rewrite the graph in place
    for pass_ in parse_pipeline(passes) if passes else []:
        pass_(graph)
    result = CUDA.build_entries(_entries(graph), tmp_path, {"arch": "sm_90"})
    info = result.info
    assert info["entries"] == ["prefill", "decode"]
    assert info["effc_ops"]["DecodeAttention"] == {"nodes": 4, "lowering": "reference"}  # 2 layers, 2 entries
    if passes:
        assert info["effc_ops"]["BlockQuantMatMul"]["lowering"] == "kernel"
        assert any("block_quant_gpu" in k for k in info["kernels"])
    for entry in ("prefill", "decode"):
        assert any(k.startswith(f"{entry}_kv_write_axis2") for k in info["device_kernels"])
        assert any(k.startswith(f"{entry}_kv_write_axis1") for k in info["device_kernels"])
    assert all(any(d.startswith(f"{k}_kernel") for d in info["device_kernels"]) for k in info["kernels"])
    blob = (tmp_path / "model.so").read_bytes()
    assert b"__global__" not in blob and b"decode_kv_write" in blob


@pytest.mark.slow
def test_decoder_compiles_for_cuda_and_says_what_was_not_measured(tmp_path):
    import effc
    import effc.runtime
    from benchmarks.gpu_check import tiny_llama
    from effc.errors import TargetError

    result = effc.compile(tiny_llama(), target="cuda", out_dir=tmp_path / "out", measure_latency=False)
    decoder = result.report["decoder"]
    assert decoder["perplexity"]["compiled"] is None and decoder["perplexity_change_pct"] is None
    assert decoder["perplexity"]["rewritten_onnxruntime"]["perplexity"] > 1
    assert "compiled: not measured" in (tmp_path / "out" / "report.md").read_text()
    assert result.manifest["target"]["info"]["entries"] == ["prefill", "decode", "prefill_last"]
    with pytest.raises(TargetError, match="built for sm_90; no CUDA device found"):
        effc.runtime.load(tmp_path / "out")


@pytest.mark.slow
def test_gpu_check_replays_decoder_calls_on_a_cpu_build(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py's decoder references and replay (what a GPU run does), on the CPU."""
    import argparse

    import effc
    from benchmarks import gpu_check
    from effc.ir.model import load

    result = effc.compile(gpu_check.tiny_llama(), target="cpu", out_dir=tmp_path / "art", measure_latency=False)
    refs = gpu_check._decoder_references(result.out_dir)
    entries = [str(e) for e in refs["entries"]]
    assert entries == ["prefill", "prefill"] + ["decode"] * gpu_check.DECODER_STEPS
    assert refs["call_1_ref"].shape == (3, 49152)  # the padded second chunk: its 3 real tokens
    graphs = _entries(load(result.out_dir / "model.onnx"))
    runner = _cpu_library_with_kv_writers(graphs, tmp_path / "replay.so")
    monkeypatch.setattr(gpu_check, "_time_cuda", lambda fn, warmup, repeat: (fn(), {"median_ms": None})[1])
    row = gpu_check._run_decoder(runner, result.manifest, refs, argparse.Namespace(warmup=1, repeat=1))
    assert row["ok"] and row["calls"] == len(entries) and row["worst_max_abs"] < 1e-3


def test_hardmax_override_builds_for_cuda(tmp_path):
    """effc's Hardmax (effc.codegen.std_nan) reduces in shapes DLight schedules: a max and a min of plain types."""
    from onnx import TensorProto, helper

    node = helper.make_node("Hardmax", ["x"], ["y"], axis=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [9, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [9, 7])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    info = CUDA.build(model, tmp_path, {"arch": "sm_90"}).info
    assert any("hardmax" in k for k in info["device_kernels"])
