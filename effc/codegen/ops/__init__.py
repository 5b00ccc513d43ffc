"""TVM lowerings of effc operators: one module per operator, each registering its converter on import."""

from effc.codegen.ops import block_quant, decode_attention, moe, nm_sparse  # noqa: F401  (register converters)
