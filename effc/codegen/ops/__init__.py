"""TVM lowerings of effc operators: one module per operator, each registering its converter on import."""

from effc.codegen.ops import (  # noqa: F401  (register converters)
    block_quant,
    decode_attention,
    decode_attention_mx,
    kv_blocks,
    moe,
    nm_sparse,
)
