"""effc operators on the cuda target: which ones lower to GPU kernels, and those lowerings.

:data:`CUDA_LOWERINGS` is the cuda target's policy per effc operator (:func:`policy`):

* ``kernel`` — a GPU lowering: the operator's TIR compute, left unscheduled so that DLight's rules
  (:mod:`effc.codegen.cuda.rules`) schedule it like any fused kernel. ``effc.BlockQuantMatMul`` gets the
  decode-in-GEMM compute of :func:`effc.codegen.ops.block_quant.block_quant_kernel` (``Y = X · W`` with ``W``
  decoded from the packed codes and block scales inside the kernel: the weights stay packed on the GPU, no fp32
  copy exists); DLight's ``GEMV`` rule takes ``M = 1`` (decoding), ``Matmul`` larger ``M``, after inlining the
  decode. For ``M = 1`` (a decoder's decode step) DLight's ``GEMV`` rule crashes on this compute ("The loop no
  longer exists", declined) and ``Fallback`` would give one thread a whole row, so :func:`schedule_gemv` schedules it:
  4 output rows per block (``threadIdx.y``), 32 lanes along ``K`` (``threadIdx.x``, each lane a strided slice of the
  row; adjacent lanes read adjacent bytes of the lane-nibble layout), a warp all-reduce at the end.
  ``effc.BlockQuantGather`` and ``effc.BlockQDQ`` use their default converters, whose computes are already
  unscheduled (DLight schedules them).
* ``reference`` — the operator's ONNX reference body is inlined before import: ``effc.DecodeAttention`` (an
  attention fusion effc inserts into decoders, not a compression the user asked for) computes the same
  ``softmax(Q·Kᵀ + mask)·V`` over the whole cache with slots past the context masked; its GPU kernel that reads only
  the valid prefix is not written yet. The build's ``effc_ops`` info says so.
* absent — an error naming the operator, unless ``--fallback dense`` (reference body, stated in the manifest).

Numerics: the computes are the CPU target's (tested against onnxruntime there); DLight only reorders loops and binds
them to threads, and the GPU's fp32 arithmetic is IEEE (nvcc without fast math). Runs on a GPU are checked by
``benchmarks/gpu_check.py``; here the build and the kernels in the fatbin are (tests/targets/test_cuda.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax, s_tir

from effc.codegen.frontend import constant_input, register_converter
from effc.codegen.ops import block_quant
from effc.codegen.ops.block_quant_gemv import kernel_rows

__all__ = ["CUDA_LOWERINGS", "BlockQuantMatMulGpu", "policy", "schedule_gemv"]

#: GEMV schedule: output rows per thread block (threadIdx.y) and lanes along K (threadIdx.x: one warp).
GEMV_ROWS, GEMV_LANES = 4, 32

#: effc op_type → how the cuda target lowers it (module docstring).
CUDA_LOWERINGS: dict[str, str] = {
    "BlockQuantMatMul": "kernel",
    "BlockQuantGather": "kernel",
    "BlockQDQ": "kernel",
    "DecodeAttention": "reference",
}


def policy(op_type: str) -> str | None:
    """``kernel``, ``reference`` or None (no CUDA lowering: an error unless ``--fallback dense``)."""
    return CUDA_LOWERINGS.get(op_type)


def schedule_gemv(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """The ``M = 1`` decode-in-GEMV schedule of the module docstring (marks ``tirx.is_scheduled``).

    ``func`` is :func:`~effc.codegen.ops.block_quant.block_quant_kernel` with ``M = 1``; ``N`` and ``K`` need not be
    multiples of the tile (the splits pad with guards).
    """
    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("W"))
    i, j, r = sch.get_loops(sch.get_sblock("Y"))
    j_block, j_thread = sch.split(j, [None, GEMV_ROWS])
    r_serial, r_lane = sch.split(r, [None, GEMV_LANES])
    sch.reorder(i, j_block, j_thread, r_lane, r_serial)
    sch.bind(j_block, "blockIdx.x")
    sch.bind(j_thread, "threadIdx.y")
    sch.bind(r_lane, "threadIdx.x")  # a reduction bound to threads: lowered to an in-warp all-reduce
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


@register_converter("BlockQuantMatMul", target="cuda")
class BlockQuantMatMulGpu:
    """``effc.BlockQuantMatMul(X, Wq, S[, M])`` → ``call_tir`` of the unscheduled decode-in-GEMM compute.

    ``X (..., K)`` float32, ``Wq`` the packed codes ``(N, K · bits / 8)``, ``S`` the block scales ``(N, K / B)``,
    ``M`` the block minimums of ``int4_asym``; ``Y (..., N)`` float32. Constants in the layout of the CPU kernels
    (:func:`~effc.codegen.ops.block_quant_gemv.kernel_rows`, ``kernel_minimums``), so a tied embedding
    (``BlockQuantGather``) shares them.
    """

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: list[Any], attr: dict[str, Any], params: Any) -> relax.Expr:
        x, wq_e, s_e = inputs[:3]
        fmt, bs = block_quant._format_attrs(attr)
        what = "BlockQuantMatMul packed weights, scales and minimums"
        wq, scales = constant_input(wq_e, params, what), constant_input(s_e, params, what)
        lows = block_quant._minimums(inputs[3:], params, what)
        n, k = wq.shape[0], scales.shape[1] * bs
        x = bb.normalize(x)
        shape = [int(d) for d in x.ty.shape.values]
        rows = int(np.prod(shape[:-1]))
        func = block_quant.block_quant_kernel(rows, k, n, fmt, bs, str(scales.dtype))
        func = schedule_gemv(func) if rows == 1 else func  # larger M: DLight's Matmul rule
        gv = bb.add_func(func.without_attr("global_symbol"), f"effc_block_quant_gpu_{fmt.name}")
        wr = kernel_rows(wq, fmt, k)
        x2 = bb.normalize(relax.op.reshape(x, (rows, k)))
        y = relax.call_tir(gv, [x2, relax.const(wr), relax.const(scales), *(relax.const(v) for v in lows)],
                           out_ty=relax.TensorType((rows, n), "float32"))
        block_quant.LOWERING_LOG.append({"format": fmt.name, "shape": [rows, k, n],
                                         "kernel": "cuda-gemv" if rows == 1 else "cuda-dlight",
                                         "weight_bytes": int(wr.nbytes + scales.nbytes + sum(v.nbytes for v in lows))})
        return relax.op.reshape(bb.normalize(y), [*shape[:-1], n])
