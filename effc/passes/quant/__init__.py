"""Block quantization numerics: MX / int block formats, bit packing, GPTQ-style update and LoRC compensation.

Pure numpy (no graph, no TVM): the ``block-quant`` and ``channel-reorder`` passes and the TVM kernels build on it.
"""

from effc.passes.quant.formats import (
    FORMATS,
    BlockFormat,
    QuantizedBlocks,
    bits_per_weight,
    dequantize,
    get_format,
    quantize,
    quantize_dequantize,
    sqnr_db,
)
from effc.passes.quant.packing import pack_blocks, pack_codes, packed_row_bytes, unpack_codes

__all__ = [
    "FORMATS",
    "BlockFormat",
    "QuantizedBlocks",
    "bits_per_weight",
    "dequantize",
    "get_format",
    "pack_blocks",
    "pack_codes",
    "packed_row_bytes",
    "quantize",
    "quantize_dequantize",
    "sqnr_db",
    "unpack_codes",
]
