"""Dense bit packing of element codes: 4-bit codes two per byte, 6-bit codes four per three bytes, 8-bit as is.

Layout (little-endian bit stream, the layout the effc kernels and ONNX function bodies decode): code ``i`` of a
row occupies bits ``[i*bits, (i+1)*bits)`` of the row's byte string, least significant bit first. So for 4 bits
the even element sits in the low nibble; for 6 bits, bytes ``b0 b1 b2`` hold ``c0 = b0 & 63``,
``c1 = (b0 >> 6) | (b1 & 15) << 2``, ``c2 = (b1 >> 4) | (b2 & 3) << 4``, ``c3 = b2 >> 2``.
"""

from __future__ import annotations

import numpy as np

from effc.errors import PipelineError

__all__ = ["pack_blocks", "pack_codes", "packed_row_bytes", "unpack_codes"]


def packed_row_bytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take (rounded up to whole bytes)."""
    return (n * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of ``codes`` densely.

    Args:
        codes: uint8 codes, shape ``(..., n)``; only the low ``bits`` bits of each are kept.
        bits: 1..8 bits per code.

    Returns:
        uint8 array of shape ``(..., ceil(n * bits / 8))``.

    Raises:
        PipelineError: ``bits`` outside 1..8.
    """
    if not 1 <= bits <= 8:
        raise PipelineError(f"cannot pack {bits}-bit codes", "bits must be in 1..8")
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes.copy()
    lead, n = codes.shape[:-1], codes.shape[-1]
    bitplanes = np.unpackbits(codes[..., None], axis=-1, bitorder="little")[..., :bits]
    stream = bitplanes.reshape(*lead, n * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: uint8 codes of shape ``(..., n)``."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :n].copy()
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : n * bits]
    planes = stream.reshape(*packed.shape[:-1], n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (planes.astype(np.uint16) * weights).sum(axis=-1).astype(np.uint8)


def pack_blocks(codes: np.ndarray, scales: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Storage of a 2-D block-quantized tensor: packed rows and per-block scales.

    Args:
        codes: uint8 codes ``(R, nblocks, block_size)`` (:attr:`QuantizedBlocks.codes` of a 2-D tensor whose
            blocked axis was moved last, e.g. a MatMul weight ``(K, N)`` blocked along K gives ``R = N``).
        scales: ``(R, nblocks)``.
        bits: bits per code.

    Returns:
        ``(packed (R, nblocks * block_size * bits / 8) uint8, scales (R, nblocks))``.
    """
    rows = codes.reshape(codes.shape[0], -1)
    return pack_codes(rows, bits), np.ascontiguousarray(scales)
