"""effc operators: one module per operator (or family), each holding everything that defines it.

The layer sits above :mod:`effc.ir` and below :mod:`effc.passes`, :mod:`effc.codegen` and :mod:`effc.eval`; it
imports neither of those nor TVM. An operator module holds its schema (inputs, outputs, attributes, shapes, layouts
and dtypes in the module docstring), the builder that inserts the node and attaches its model-local ONNX function
(the reference body onnxruntime runs), the codecs of its constant formats, its MAC accounting and a numpy
reference, registered as an :class:`~effc.ops.base.OpSpec`. Passes decide where operators go and call the
builders; :mod:`effc.codegen.ops` holds the TVM converters and kernels.

Operators: ``NMSparseMatMul`` (:mod:`effc.ops.nm_sparse`); ``BlockQuantMatMul``, ``BlockQuantGather``,
``BlockQDQ`` (:mod:`effc.ops.block_quant`, element and scale codecs in :mod:`effc.ops.block_formats`, bit packing
in :mod:`effc.ops.bitpack`); ``DecodeAttention`` (:mod:`effc.ops.decode_attention`); ``MoEFFN``
(:mod:`effc.ops.moe`).
"""

from effc.ops import block_quant, decode_attention, decode_attention_mx, kv_blocks, moe, nm_sparse  # noqa: F401, E501
from effc.ops.base import EFFC_DOMAIN, OpSpec, PackedWeight, get_op, register_op, registered_ops

__all__ = ["EFFC_DOMAIN", "OpSpec", "PackedWeight", "get_op", "register_op", "registered_ops"]
