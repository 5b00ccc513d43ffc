"""Block number formats: OCP MX (shared E8M0 scale per block) and plain int blocks with float scales.

A tensor is cut into blocks of ``block_size`` consecutive elements along one axis (for weights: the reduction
axis). Every block shares one scale; every element stores a small code.

MX formats (OCP Microscaling Formats (MX) v1.0, section 5 "MX formats" and section 6.3 "Conversion"):

* shared scale ``X = 2^(floor(log2(amax)) - emax_elem)`` stored as E8M0 (an unbiased exponent + 127 in one
  byte, range 2^-127 .. 2^127, 0xFF = NaN, never produced here), where ``amax`` is the largest ``|v|`` of the
  block and ``emax_elem`` is the exponent of the element format's largest normal number;
* element ``P = quantize_to_element_format(v / X)``: round to nearest, ties to even, and saturate values that
  exceed the element format's largest normal number to that number (section 6.3);
* an all-zero block gets the smallest scale 2^-127 and zero elements (no division by zero, no NaN/inf).

MXINT8 elements are 8-bit two's complement with an implicit scale of 2^-6 (values ``k / 64``), symmetric in
[-127, 127] as in the spec's reference code. Plain ``int8``/``int4`` blocks are symmetric with one float16 or
float32 scale ``amax / qmax`` per block (the layout of ONNX ``DequantizeLinear`` with ``block_size``); on weights
already on that grid (GGUF Q8_0: ``w = d * q``, ``d`` float16, ``|q| <= 127`` with 127 reached) int8 blocks of 32
reproduce ``d`` and ``q`` exactly.

Asymmetric ``int4_asym`` blocks (GGUF / llama.cpp ``Q4_1``: ggml-quants.c ``quantize_row_q4_1_ref``) store unsigned
codes ``q`` in 0..15, a scale ``d`` and a minimum ``m`` per block (float16 by default: 5 bits per weight at blocks of
32), ``w = d * q + m``. Quantizing takes ``m = min(block)`` and ``d = (max(block) - m) / 15`` rounded to the scale
type, then ``q = clip(round((w - m) / d), 0, 15)`` with the stored ``d`` and ``m``. A weight already on such a grid
(a dequantized Q4_1 tensor: the block minimum has code 0 and the maximum code 15) comes back bit for bit, since
``d * q`` is exact in float32 (11 + 4 significant bits) and ``d * q + m`` is rounded once both here and in the
kernels (an FMA).

Codes are unsigned bytes holding the element's bit pattern (``ml_dtypes`` layout for the FP formats, two's
complement for ints); :mod:`effc.ops.bitpack` packs them densely.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from effc.errors import PipelineError

__all__ = [
    "E8M0_BIAS",
    "FORMATS",
    "BlockFormat",
    "QuantizedBlocks",
    "bits_per_weight",
    "block_scales",
    "dequantize",
    "element_codes",
    "get_format",
    "quantize",
    "quantize_dequantize",
    "round_to_elements",
    "sqnr_db",
]

E8M0_BIAS = 127


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """One block format.

    Attributes:
        name: spelling used in pipelines (``"mxfp4"``).
        kind: ``"mxfp"`` (FP elements, E8M0 scale), ``"mxint"`` (int8 elements k/64, E8M0 scale), ``"int"``
            (symmetric integers, float scale) or ``"asym"`` (unsigned integers, float scale and float minimum).
        bits: bits per element code.
        element_dtype: the ``ml_dtypes``/numpy element type (FP formats), or None.
        emax: exponent of the element format's largest normal number (MX formats; OCP MX v1.0 table 1-4).
        max_value: largest finite element magnitude (before the shared scale), for saturation.
        qmax: largest integer code magnitude (int kinds; the largest code of ``asym``).
    """

    name: str
    kind: str
    bits: int
    element_dtype: type | None
    emax: int
    max_value: float
    qmax: int = 0

    @property
    def is_mx(self) -> bool:
        """True for formats with a shared E8M0 power-of-two scale."""
        return self.kind in ("mxfp", "mxint")

    @property
    def has_minimum(self) -> bool:
        """True for asymmetric formats: a float minimum per block beside the scale (``w = d * q + m``)."""
        return self.kind == "asym"

    def code_table(self) -> np.ndarray:
        """Value of every element code, shape ``(2**bits,)`` float32 (the decoding lookup table, before scale)."""
        codes = np.arange(2**self.bits, dtype=np.uint8)
        if self.kind == "mxfp":
            return codes.view(self.element_dtype).astype(np.float32)
        if self.kind == "asym":
            return codes.astype(np.float32)
        signed = np.where(codes >= 2 ** (self.bits - 1), codes.astype(np.int32) - 2**self.bits, codes)
        values = signed.astype(np.float32)
        return values / 64.0 if self.kind == "mxint" else values


# Format table (OCP MX v1.0 section 5.3, tables 2-4; emax of E4M3 = 8 since 448 = 1.75 * 2^8).
FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("mxint8", "mxint", 8, None, 0, 127 / 64, 127),
        BlockFormat("mxfp8_e4m3", "mxfp", 8, ml_dtypes.float8_e4m3fn, 8, 448.0),
        BlockFormat("mxfp8_e5m2", "mxfp", 8, ml_dtypes.float8_e5m2, 15, 57344.0),
        BlockFormat("mxfp6_e3m2", "mxfp", 6, ml_dtypes.float6_e3m2fn, 4, 28.0),
        BlockFormat("mxfp6_e2m3", "mxfp", 6, ml_dtypes.float6_e2m3fn, 2, 7.5),
        BlockFormat("mxfp4", "mxfp", 4, ml_dtypes.float4_e2m1fn, 2, 6.0),
        BlockFormat("int8", "int", 8, None, 0, 127.0, 127),
        BlockFormat("int4", "int", 4, None, 0, 7.0, 7),
        BlockFormat("int4_asym", "asym", 4, None, 0, 15.0, 15),
    )
}


def get_format(name: str) -> BlockFormat:
    """The format called ``name``.

    Raises:
        PipelineError: unknown name (the message lists the known formats).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise PipelineError(f"unknown block format {name!r}", f"format must be one of {', '.join(FORMATS)}") from None


def bits_per_weight(fmt: BlockFormat | str, block_size: int = 32, scale_bits: int | None = None) -> float:
    """Storage bits per element including the shared scale (e.g. 4.25 for MXFP4, 5.0 for int4_asym, blocks of 32).

    Args:
        fmt: the format or its name.
        block_size: elements per block.
        scale_bits: bits of one scale (and of one minimum for asymmetric formats); default 8 (E8M0) for MX formats,
            16 (float16) for int formats.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if scale_bits is None:
        scale_bits = 8 if fmt.is_mx else 16
    return fmt.bits + scale_bits * (2 if fmt.has_minimum else 1) / block_size


@dataclasses.dataclass
class QuantizedBlocks:
    """A block-quantized tensor.

    Attributes:
        codes: element codes, uint8, shape ``(*other, nblocks, block_size)``; the blocked axis is moved last and
            zero-padded to a multiple of ``block_size``.
        scales: per-block scales, shape ``(*other, nblocks)``: uint8 E8M0 codes for MX formats, float16/float32
            values for int formats.
        fmt: the format.
        shape: the original tensor shape.
        axis: the blocked axis of the original tensor (non-negative).
        block_size: elements per block.
        minimums: per-block minimums of asymmetric formats, shape and dtype of ``scales``; None for the others.
    """

    codes: np.ndarray
    scales: np.ndarray
    fmt: BlockFormat
    shape: tuple[int, ...]
    axis: int
    block_size: int
    minimums: np.ndarray | None = None

    def scale_values(self) -> np.ndarray:
        """Scales as float32 values, shape ``(*other, nblocks)``."""
        if self.fmt.is_mx:
            return np.ldexp(np.float32(1.0), self.scales.astype(np.int32) - E8M0_BIAS).astype(np.float32)
        return self.scales.astype(np.float32)


def _blocks(x: np.ndarray, axis: int, block_size: int) -> tuple[np.ndarray, int]:
    """Move ``axis`` last, zero-pad it to a multiple of ``block_size`` and split it: ``(*other, nb, bs)``."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    n = moved.shape[-1]
    pad = (-n) % block_size
    if pad:
        moved = np.concatenate([moved, np.zeros((*moved.shape[:-1], pad), np.float32)], axis=-1)
    return moved.reshape(*moved.shape[:-1], -1, block_size), n


def quantize(
    x: np.ndarray, fmt: BlockFormat | str, axis: int = -1, block_size: int = 32, scale_dtype: str = "float16"
) -> QuantizedBlocks:
    """Quantize ``x`` into blocks of ``block_size`` along ``axis``.

    Args:
        x: float tensor of any shape.
        fmt: the format or its name.
        axis: the axis blocks run along (for a MatMul weight ``(K, N)``: 0, the reduction axis).
        block_size: elements per block (32 in OCP MX v1.0).
        scale_dtype: ``"float16"`` or ``"float32"``, scale type of the int formats (MX scales are always E8M0).

    Returns:
        The codes and scales (see :class:`QuantizedBlocks`).

    Raises:
        PipelineError: unknown format, block size < 1, or an unknown scale dtype.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    if block_size < 1:
        raise PipelineError(f"invalid block_size={block_size}", "block_size must be a positive integer, e.g. 32")
    if scale_dtype not in ("float16", "float32"):
        raise PipelineError(f"invalid scale_dtype={scale_dtype!r}", "scale_dtype must be float16 or float32")
    x = np.asarray(x, dtype=np.float32)
    axis = axis % max(x.ndim, 1)
    blocks, _ = _blocks(x, axis, block_size)
    if fmt.has_minimum:
        scales, minimums, codes = _asym_blocks(blocks, fmt, scale_dtype)
        return QuantizedBlocks(codes, scales, fmt, tuple(x.shape), axis, block_size, minimums)
    scales, scale_values = block_scales(blocks, fmt, scale_dtype)
    codes = element_codes(blocks / scale_values[..., None] if not fmt.is_mx else
                          np.ldexp(blocks, -(scales.astype(np.int32) - E8M0_BIAS)[..., None]), fmt)
    return QuantizedBlocks(codes, scales, fmt, tuple(x.shape), axis, block_size)


def _asym_blocks(blocks: np.ndarray, fmt: BlockFormat, scale_dtype: str) -> tuple[np.ndarray, ...]:
    """``(scales, minimums, codes)`` of blocks ``(..., block_size)`` in an asymmetric format (module docstring).

    ``m = min(block)`` and ``d = (max(block) - m) / qmax`` are rounded to ``scale_dtype`` (clamped to its finite
    range); codes use the stored ``d`` and ``m``. A constant block gets ``d = 0`` and codes 0 (``w = m``).
    """
    finite = float(np.finfo(scale_dtype).max)
    lo = np.clip(np.min(blocks, axis=-1), -finite, finite).astype(scale_dtype)
    m = lo.astype(np.float32)
    d = np.clip((np.max(blocks, axis=-1) - m) / np.float32(fmt.qmax), 0.0, finite).astype(scale_dtype)
    step = d.astype(np.float32)
    scaled = (blocks - m[..., None]) / np.where(step > 0, step, np.float32(1.0))[..., None]
    return d, lo, element_codes(np.where(step[..., None] > 0, scaled, 0.0), fmt)


def block_scales(blocks: np.ndarray, fmt: BlockFormat, scale_dtype: str = "float16") -> tuple[np.ndarray, np.ndarray]:
    """Scales of blocks ``(..., block_size)`` (last axis = one block).

    Returns:
        ``(stored, values)``: stored scales (uint8 E8M0 codes for MX formats, float16/float32 for int formats)
        and their float32 values, both of shape ``blocks.shape[:-1]``. MX: ``2^(floor(log2 amax) - emax)``
        clamped to the E8M0 range, 2^-127 for an all-zero block; int: ``amax / qmax`` (1 for an all-zero block).
    """
    amax = np.max(np.abs(blocks), axis=-1)
    if fmt.is_mx:
        _, e = np.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)  =>  floor(log2(amax)) = e - 1 (exact)
        shared = np.clip(np.where(amax > 0, e - 1 - fmt.emax, -E8M0_BIAS), -E8M0_BIAS, E8M0_BIAS).astype(np.int32)
        return (shared + E8M0_BIAS).astype(np.uint8), np.ldexp(np.float32(1.0), shared).astype(np.float32)
    scale = (amax / fmt.qmax).astype(scale_dtype)
    scale = np.where(scale > 0, scale, np.ones_like(scale))  # all-zero (or underflowing) block: scale 1
    return scale, scale.astype(np.float32)


def element_codes(scaled: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Codes (uint8) of values already divided by their block scale: saturate, then round to nearest even."""
    if fmt.has_minimum:  # (w - m) / d: unsigned codes 0..qmax
        return np.clip(np.rint(np.asarray(scaled, np.float32)), 0, fmt.qmax).astype(np.uint8)
    scaled = np.clip(np.asarray(scaled, np.float32), -fmt.max_value, fmt.max_value)  # OCP MX v1.0 section 6.3
    if fmt.kind == "mxfp":
        return scaled.astype(fmt.element_dtype).view(np.uint8)
    step = 64.0 if fmt.kind == "mxint" else 1.0
    q = np.clip(np.rint(scaled * step), -fmt.qmax, fmt.qmax).astype(np.int8)
    return q.view(np.uint8) & np.uint8(2**fmt.bits - 1)


def round_to_elements(scaled: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Nearest element values (float32) of values already divided by their block scale (used by GPTQ)."""
    return fmt.code_table()[element_codes(scaled, fmt)]


def dequantize(q: QuantizedBlocks) -> np.ndarray:
    """Values of a :class:`QuantizedBlocks`, float32 with the original shape.

    Code value × block scale, plus the block minimum of asymmetric formats.
    """
    values = q.fmt.code_table()[q.codes] * q.scale_values()[..., None]
    if q.minimums is not None:
        values = values + q.minimums.astype(np.float32)[..., None]
    flat = values.reshape(*values.shape[:-2], -1)[..., : q.shape[q.axis]]
    return np.ascontiguousarray(np.moveaxis(flat, -1, q.axis))


def quantize_dequantize(
    x: np.ndarray, fmt: BlockFormat | str, axis: int = -1, block_size: int = 32, scale_dtype: str = "float16"
) -> np.ndarray:
    """Round trip ``dequantize(quantize(x, ...))``: the values the quantized tensor stands for (same shape)."""
    return dequantize(quantize(x, fmt, axis, block_size, scale_dtype))


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x^2 / sum (x - q)^2)`` in dB (inf when equal)."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((ref - np.asarray(approx, np.float64)) ** 2))
    signal = float(np.sum(ref**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-300) / noise))
