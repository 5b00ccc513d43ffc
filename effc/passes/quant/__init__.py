"""Helpers of the block-quantization passes: GPTQ / LoRC compensation and the graph queries that find targets.

The formats, bit packing, reference bodies and MAC accounting of the block-quantization operators are in
:mod:`effc.ops.block_formats`, :mod:`effc.ops.bitpack` and :mod:`effc.ops.block_quant`.
"""
