"""Tile table: per vector width, the register blocking and chunk sizes the templates use. Data, not code.

Values measured on AMD Zen 4 (AVX-512, 32 zmm registers; shared/notes/cpu.md): a 4×64 fp32 GEMM micro-tile
(16 accumulators) reached 96–98 % of FMA peak; 8×32 was equivalent; non-power-of-two vector widths (nr=48)
vectorized as one wide vector were 6–22× slower. Every ``nr`` is a multiple of the lane count; the GEMM template
splits a non-power-of-two count of vectors (AVX2 nr=24 = 3 ymm) into lane-wide vectors, which is as fast as it
should be (Zen 3 / AVX2 values below).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiling parameters for one vector width.

    Attributes:
        lanes: fp32 elements per SIMD register (16 for AVX-512, 8 for AVX2, 4 for NEON/SSE).
        gemm_mr: output rows per GEMM micro-tile (unrolled; the A element is broadcast).
        gemm_nr: candidate output columns per micro-tile, best first (vectorized; each a multiple of ``lanes``).
        conv_co: output channels per conv micro-tile (the weight scalar is broadcast).
        conv_co_wide: output channels per conv micro-tile when the tile is two vectors wide and the channel count
            is a multiple of it (0: use ``conv_co``). AVX2: 6 x 2 vectors = 12 accumulators instead of 8 (Zen 3,
            1 thread, loaded box: PP-OCR rec 240->240 1x1 at 12x80 -16 %, 480->480 -12 %, det 96->24 3x3 at 80x80
            with rows outer 6.4 -> 4.7 ms).
        unroll_k: reduction-loop unroll factor in the GEMM micro-kernel (1 = none).
        min_parallel_elems: below this many output elements an injective kernel runs single-threaded.
        min_parallel_macs: below this many multiply-accumulates a GEMM/conv kernel runs single-threaded (waking
            the thread pool costs more than it saves). Zen 3, 2 threads: PP-OCR cls 1.93 ms with every kernel
            parallel, 1.03 ms with these thresholds; MiniLM's 128x384 row-wise/injective kernels (49,152
            elements, under ``min_parallel_elems``) single-threaded took MiniLM from 31.7 to 23.6 ms; a MAC
            threshold of 2^21 instead of 2^18 cost PP-OCR det ~10 %.
        min_parallel_gemv: below this many multiply-accumulates (= weight elements) a one-row GEMM (GEMV) runs
            single-threaded. Kept at ``min_parallel_macs`` until measured on a quiet machine: one core already
            reads ~90 % of the memory bandwidth here (docs/notes/cpu_decode.md), so SmolLM2's 576×192 K/V
            projections (110,592) stay on one thread.
        gemv_chunk: widest column chunk, in elements, that a GEMV with a runtime (not pre-packed) weight reads
            per row: each thread walks ``(K, chunk)`` blocks of the row-major weight, runs of ``chunk`` floats
            instead of ``nr`` (the accumulator row lives in L1).
        threads: worker threads the kernels are split for (the target's ``num-cores``): a runtime-weight GEMV
            splits its K rows into this many blocks.
    """

    lanes: int
    gemm_mr: int
    gemm_nr: tuple[int, ...]
    conv_co: int
    conv_co_wide: int = 0
    unroll_k: int = 1
    min_parallel_elems: int = 65536
    min_parallel_macs: int = 262144
    min_parallel_gemv: int = 262144
    gemv_chunk: int = 4096
    threads: int = 1


# Keyed by fp32 lanes. 32 vector registers on AVX-512 → 16 accumulators + loads. 16 on AVX2 → 4×24 = 12 accumulators
# + 3 B vectors + 1 broadcast (Zen 3, 1 thread: +3-15 % GFLOP/s over 4×16 on MiniLM's dense shapes; 8×16 and 4×32,
# 16 accumulators, spill and halve the speed).
TILE_TABLE: dict[int, TileConfig] = {
    16: TileConfig(lanes=16, gemm_mr=4, gemm_nr=(64, 32, 16), conv_co=8),
    8: TileConfig(lanes=8, gemm_mr=4, gemm_nr=(24, 16, 8), conv_co=4, conv_co_wide=6),
    4: TileConfig(lanes=4, gemm_mr=4, gemm_nr=(16, 8, 4), conv_co=4),
}

# LLVM -mcpu names with AVX-512F (fp32 lanes 16); other x86 CPUs with AVX2 get 8. Arm (NEON) gets 4.
_AVX512_CPUS = frozenset(
    {
        "znver4", "znver5", "skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake-client",
        "icelake-server", "tigerlake", "sapphirerapids", "emeraldrapids", "graniterapids", "rocketlake",
        "knl", "knm", "x86-64-v4",
    }
)
_AVX2_CPUS = frozenset(
    {
        "znver1", "znver2", "znver3", "haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake",
        "x86-64-v3", "gracemont", "arrowlake", "lunarlake",
    }
)


def vector_lanes(target: Any) -> int:
    """fp32 SIMD lanes of an LLVM target, from its ``mcpu``/``mattr``/``mtriple``.

    Args:
        target: a ``tvm.target.Target`` of kind ``llvm``.

    Returns:
        16, 8 or 4 (4 when nothing is known: every loop split stays valid, only slower).
    """
    attrs = target.attrs
    mcpu = str(attrs.get("mcpu", "") or "")
    mattr = [str(a) for a in (attrs.get("mattr", None) or [])]
    triple = str(attrs.get("mtriple", "") or "")
    if mcpu in _AVX512_CPUS or "+avx512f" in mattr:
        return 16
    if mcpu in _AVX2_CPUS or "+avx2" in mattr:
        return 8
    if triple.startswith("aarch64") or triple.startswith("arm"):
        return 4
    return 4


def tile_config(target: Any) -> TileConfig:
    """The :data:`TILE_TABLE` row for ``target``'s vector width, with ``threads`` from its ``num-cores``."""
    cores = int(target.attrs.get("num-cores", 1) or 1)
    return dataclasses.replace(TILE_TABLE[vector_lanes(target)], threads=max(cores, 1))
