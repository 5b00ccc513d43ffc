"""The effc.DecodeAttention TIR kernel against the numpy reference: serial and parallel heads, contexts 0..S."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from effc.codegen.ops.decode_attention import attention_kernel
from effc.ops.decode_attention import reference

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
HKV, G, D, S = 3, 3, 64, 64


@pytest.mark.parametrize("parallel_from", [1, 10**9])
def test_kernel_reads_only_the_valid_prefix(parallel_from):
    lib = tvm.compile(tvm.IRModule({"main": attention_kernel(HKV, G, 1, D, S, D ** -0.5, parallel_from)}),
                      target=TARGET)
    rng = np.random.default_rng(3)
    for length in (0, 1, 15, 16, 17, 63, 64):
        arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
                  ((HKV, G, 1, D), (HKV, D, S), (HKV, S, D), (HKV, D, 1), (HKV, 1, D))]
        arrays[1][:, :, length:] = np.nan  # slots past the context must not count
        arrays[2][:, length:] = np.nan
        mask, positions = np.zeros((1, S + 1), np.float32), np.array([[length]], np.int64)
        args = [tvm.runtime.tensor(a) for a in (*arrays, mask, positions, np.zeros((HKV, G, 1, D), np.float32))]
        lib["main"](*args)
        want = reference(*arrays, mask, positions, scale=D ** -0.5)
        np.testing.assert_allclose(args[-1].numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [5, 32])  # 32: the chunk's keys in vectors of 16; 5: one by one
def test_chunk_of_tokens_in_parallel(tokens):
    """A prefill chunk (causal mask inside the chunk) after ``length`` cached slots: tokens x heads in parallel."""
    lib = tvm.compile(tvm.IRModule({"main": attention_kernel(HKV, G, tokens, D, S, D ** -0.5, 10**9)}), target=TARGET)
    rng = np.random.default_rng(4)
    causal = np.triu(np.full((tokens, tokens), -1.0e9, np.float32), 1)
    for length in (0, 7, 16, 64):
        arrays = [rng.standard_normal(shape).astype(np.float32) for shape in
                  ((HKV, G, tokens, D), (HKV, D, S), (HKV, S, D), (HKV, D, tokens), (HKV, tokens, D))]
        arrays[1][:, :, length:] = np.nan
        arrays[2][:, length:] = np.nan
        mask = np.concatenate([np.zeros((tokens, S), np.float32), causal], axis=1)
        positions = (length + np.arange(tokens, dtype=np.int64)).reshape(1, tokens)
        args = [tvm.runtime.tensor(a) for a in (*arrays, mask, positions, np.zeros((HKV, G, tokens, D), np.float32))]
        lib["main"](*args)
        want = reference(*arrays, mask, positions, scale=D ** -0.5)
        np.testing.assert_allclose(args[-1].numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mx", [False, True])
def test_a_cache_the_kernel_cannot_read_is_refused_naming_the_node(mx):
    """float32: 24 slots (the kernel steps 16 at a time); MX: blocks of 4 (the kernel decodes 8 codes at a time)."""
    import onnx_ir as ir

    import effc.codegen.ops  # noqa: F401  (registers the converters)
    from effc.codegen.frontend import to_relax
    from effc.errors import UnsupportedOpError
    from effc.ops import decode_attention, decode_attention_mx
    from effc.ops.block_formats import get_format

    hkv, g, d, s = 1, 2, 16, 24
    cache = [(hkv, s, d + d // 4)] * 2 if mx else [(hkv, d, s), (hkv, s, d)]
    shapes = [(hkv, g, 1, d), *cache, (hkv, d, 1), (hkv, 1, d), (1, s + 1), (1, 1)]
    dtypes = [ir.DataType.FLOAT] + [ir.DataType.UINT8 if mx else ir.DataType.FLOAT] * 2 + [ir.DataType.FLOAT] * 3 + [
        ir.DataType.INT64]
    inputs = [ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))
              for name, shape, dtype in zip(decode_attention.INPUTS, shapes, dtypes, strict=True)]
    model = ir.Model(ir.Graph(inputs, [], nodes=[], opset_imports={"": 17}, name="attention"), ir_version=10)
    if mx:
        node = decode_attention_mx.decode_attention_mx(model, inputs, d ** -0.5, get_format("mxint8"), 4, "attn")
    else:
        node = decode_attention.decode_attention(model, inputs, d ** -0.5, "attn")
    node.outputs[0].shape, node.outputs[0].type = ir.Shape((hkv, g, 1, d)), ir.TensorType(ir.DataType.FLOAT)
    model.graph.append(node)
    model.graph.outputs.append(node.outputs[0])
    with pytest.raises(UnsupportedOpError, match="DecodeAttention.*attn.*max-cache"):
        to_relax(model)
