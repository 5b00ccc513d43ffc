"""Decode-in-GEMV kernels (M = 1) of effc.BlockQuantMatMul: weights/s in cache and streamed from DRAM.

    python benchmarks/block_quant_gemv.py [--formats mxfp4 int4 int4_asym mxint8 int8] [--threads 1 2] [--reps 200]
        [--kernels float vnni] [--no-step]

``--kernels``: ``float`` = the decode-in-GEMV kernels of weight-only mode (fp32 activation,
:mod:`effc.codegen.ops.block_quant_gemv`); ``vnni`` = the integer-dot kernels of ``mode=weight_act,act_format=int8``
(:mod:`effc.codegen.ops.block_quant_vnni`; int4_asym / int4 / int8 only, AVX-512 VNNI CPUs only; the activation
row is quantized inside each call).

Two shapes per format: SmolLM2's up-projection 576→1536 (0.4–0.9 MB packed: sits in L2, so it measures the decode
rate of the kernel) and 576→196,608 (56–113 MB packed, > 3× L3: a stream from DRAM like one decode step's weights).
Then all GEMVs of one SmolLM2-135M decode step (30 layers × 7 projections with distinct weights + the tied LM
head: the weight part of a decode step, effective GB/s). One process, the kernel called ``--reps`` times; min and
median; GB/s of packed weights + scales, G weights/s, and
the read bandwidth of the same process (BLAS ``sdot`` over 512 MB, as in ``llm_decode.py``). Constants are on huge
pages (``effc.runtime.hugepages``), as in a loaded decoder. Outputs are checked against numpy.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import tvm

from effc.codegen.build import set_runtime_threads
from effc.codegen.ops import block_quant_gemv as gemv
from effc.codegen.ops import block_quant_vnni as vnni
from effc.ops.bitpack import pack_blocks
from effc.ops.block_formats import FORMATS, dequantize, quantize, quantize_dequantize
from effc.runtime.hugepages import advise_huge_pages

SHAPES = ((576, 1536), (576, 49152), (576, 196608))  # in L2; the LM head (int8: 30 MB, near L3); DRAM
# One SmolLM2-135M decode step's weights: per layer q, k, v, o, gate, up, down; then the tied LM head.
LAYER = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))
LAYERS, HEAD = 30, (576, 49152)


def _case(name: str, k: int, n: int, target, reps: int, kernel: str = "float") -> dict:
    fmt = FORMATS[name]
    rng = np.random.default_rng(0)
    q = quantize(rng.standard_normal((k, n)).astype(np.float32), fmt, axis=0)
    wq, scales = pack_blocks(q.codes, q.scales, fmt.bits)
    x = rng.standard_normal((1, k)).astype(np.float32)
    with target:
        lib = tvm.compile(tvm.IRModule({"main": _kernel(kernel, k, n, fmt, str(scales.dtype))}), target=target)
    arrays = _arrays(x, gemv.kernel_rows(wq, fmt, k), scales, q, n, kernel)
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    advise_huge_pages()
    fn = lib["main"]  # looked up once: a module lookup per call cost 10-130 us here, more than an L2-sized GEMV
    fn(*args)
    ref = (x if kernel == "float" else quantize_dequantize(x, "int8", scale_dtype="float32")) @ dequantize(q)
    error = float(np.abs(args[-1].numpy() - ref).max() / np.abs(ref).max())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    nbytes = _weight_bytes(arrays, kernel, fmt)
    best, median = min(times), float(np.median(times))
    return {"ms": (best * 1e3, median * 1e3), "gb_s": (nbytes / best / 1e9, nbytes / median / 1e9),
            "gweights_s": k * n / best / 1e9, "rel_error": error, "mb": nbytes / 1e6}


def _kernel(kernel: str, k: int, n: int, fmt, scale_dtype: str):
    """The GEMV PrimFunc of ``kernel`` (``float`` or ``vnni``) for one format and shape."""
    if kernel == "vnni":
        return vnni.vnni_gemv_kernel(k, n, fmt, scale_dtype)
    return gemv.gemv_kernel(k, n, fmt, scale_dtype)


def _weight_bytes(arrays: list[np.ndarray], kernel: str, fmt) -> int:
    """Bytes of the weight arguments: rows, scales, minimums (not the activation, the 16-entry table or Y)."""
    return sum(a.nbytes for a in arrays[1:-1]) - (64 if fmt.bits == 4 and kernel == "float" else 0)


def _arrays(x: np.ndarray, rows: np.ndarray, scales: np.ndarray, q, n: int, kernel: str = "float") -> list[np.ndarray]:
    """The kernel's arguments: X, kernel rows, scales, [minimums,] [16-entry table (float, 4-bit),] Y."""
    fmt = q.fmt
    lows = [gemv.kernel_minimums(q.minimums)] if fmt.has_minimum else []
    table = [fmt.code_table()] if fmt.bits == 4 and kernel == "float" else []
    return [x, rows, scales, *lows, *table, np.zeros((1, n), np.float32)]


def _decoder_step(name: str, target, reps: int, kernel: str = "float") -> dict:
    """All GEMVs of one SmolLM2 decode step, each layer with its own (random) weights: ms and GB/s of the weights.

    Every call goes through Python (``LAYERS * 7 + 1`` calls, a few microseconds each, included).
    """
    fmt, rng = FORMATS[name], np.random.default_rng(0)
    kernels, calls, nbytes = {}, [], 0
    for k, n in [s for _ in range(LAYERS) for s in LAYER] + [HEAD]:
        if (k, n) not in kernels:
            q = quantize(rng.standard_normal((k, n)).astype(np.float32), fmt, axis=0)
            wq, scales = pack_blocks(q.codes, q.scales, fmt.bits)
            with target:
                kernels[k, n] = (tvm.compile(tvm.IRModule({"main": _kernel(kernel, k, n, fmt, str(scales.dtype))}),
                                             target=target), gemv.kernel_rows(wq, fmt, k), scales, q)
        lib, rows, scales, q = kernels[k, n]
        rows = np.ascontiguousarray(np.roll(rows, len(calls), axis=0))  # a distinct copy per layer
        arrays = _arrays(np.ones((1, k), np.float32), rows, scales, q, n, kernel)
        calls.append((lib["main"], [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]))
        nbytes += _weight_bytes(arrays, kernel, fmt)
    advise_huge_pages()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for fn, args in calls:
            fn(*args)
        times.append(time.perf_counter() - start)
    best, median = min(times), float(np.median(times))
    return {"mb": nbytes / 1e6, "ms": (best * 1e3, median * 1e3), "gb_s": (nbytes / best / 1e9, nbytes / median / 1e9)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", nargs="+", default=["mxfp4", "int4", "int4_asym", "mxint8", "int8"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--kernels", nargs="+", default=["float"], choices=("float", "vnni"))
    parser.add_argument("--no-step", action="store_true", help="only the single-GEMV shapes")
    args = parser.parse_args()
    from llm_decode import cpu_description, read_bandwidth  # benchmarks/ is on sys.path (the script's folder)

    mcpu = str(tvm.target.codegen.llvm_get_system_cpu())
    print(f"CPU: {cpu_description()}; load {os.getloadavg()}")
    print("| threads | format | kernel | K→N | MB packed | read GB/s | ms min (median) | GB/s min (median) | "
          "G weights/s | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        set_runtime_threads(threads)
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": threads})
        bandwidth = read_bandwidth(threads)
        for name, kernel, (k, n) in _runs(args.formats, args.kernels):
            r = _case(name, k, n, target, args.reps if n < 10000 else max(args.reps // 10, 5), kernel)
            print(f"| {threads} | {name} | {kernel} | {k}→{n} | {r['mb']:.1f} | {bandwidth:.1f} | {r['ms'][0]:.3f} "
                  f"({r['ms'][1]:.3f}) | {r['gb_s'][0]:.1f} ({r['gb_s'][1]:.1f}) | {r['gweights_s']:.1f} | "
                  f"{r['rel_error']:.1e} |", flush=True)
    if args.no_step:
        return
    print("\n| threads | format | kernel | one SmolLM2 decode step's GEMVs | MB of weights | read GB/s | "
          "ms min (median) | GB/s min (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        set_runtime_threads(threads)
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": threads})
        bandwidth = read_bandwidth(threads)
        for name, kernel, _ in _runs(args.formats, args.kernels, SHAPES[:1]):
            r = _decoder_step(name, target, max(args.reps // 10, 5), kernel)
            print(f"| {threads} | {name} | {kernel} | {LAYERS}×7 + LM head | {r['mb']:.1f} | {bandwidth:.1f} | "
                  f"{r['ms'][0]:.2f} "
                  f"({r['ms'][1]:.2f}) | {r['gb_s'][0]:.1f} ({r['gb_s'][1]:.1f}) |", flush=True)
    print(f"load at the end {os.getloadavg()}")


def _runs(formats: list[str], kernels: list[str], shapes=SHAPES) -> list[tuple]:
    """``(format, kernel, shape)`` to measure: the VNNI kernels only for their formats (int4_asym, int4, int8)."""
    return [(name, kernel, shape) for name in formats for shape in shapes for kernel in kernels
            if kernel == "float" or name in vnni.OFFSETS]


if __name__ == "__main__":
    main()
