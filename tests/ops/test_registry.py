"""Every registered effc operator: ONNX body (onnxruntime) == numpy reference == compiled TVM kernel.

One case per operator (or per stored format) builds a one-node model with the operator's builder on random
inputs and runs it three ways. All three decode the same stored codes, so they agree up to float32 summation order
(1e-5); a registered operator without a case here fails :func:`test_every_operator_has_a_case`.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from effc.codegen.cpu import compile_cpu
from effc.codegen.frontend import to_relax
from effc.codegen.ops import nm_sparse as nm_codegen
from effc.ops import block_quant as bq
from effc.ops import decode_attention, decode_attention_mx, get_op, kv_blocks, moe, nm_sparse, registered_ops
from effc.ops.bitpack import pack_blocks
from effc.ops.block_formats import get_format, quantize

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu())})
RNG = np.random.default_rng(12)


def _value(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))


def _model(feed: dict[str, np.ndarray], consts: dict[str, np.ndarray], build) -> ir.Model:
    """One effc node ``build(model, values) -> node`` reading graph inputs ``feed`` and initializers ``consts``."""
    values = {name: _value(name, a) for name, a in feed.items()}
    graph = ir.Graph(list(values.values()), [], nodes=[], opset_imports={"": 17}, name="one_op")
    for name, array in consts.items():
        values[name] = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        values[name].shape, values[name].type = ir.Shape(array.shape), ir.TensorType(values[name].const_value.dtype)
        graph.register_initializer(values[name])
    model = ir.Model(graph, ir_version=10)
    node = build(model, values)
    graph.append(node)
    graph.outputs.append(node.outputs[0])
    node.outputs[0].name = "Y"
    return model


def _nm(vector: int):
    w = RNG.standard_normal((64, 32)).astype(np.float32)
    keep = np.argsort(-np.abs(w.reshape(16, 4, 32 // vector, vector).sum(-1)), axis=1)[:, :2]  # 2:4 along K
    mask = np.zeros((16, 4, 32 // vector), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    values, indices = nm_sparse.pack_nm(w * np.repeat(mask, vector, -1).reshape(64, 32), 2, 4, vector)
    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)

    def build(model, v):
        node = nm_sparse.nm_sparse_matmul(model, v["X"], v["values"], v["indices"], 2, 4, vector, "nm")
        node.outputs[0].shape, node.outputs[0].type = ir.Shape((2, 5, 32)), ir.TensorType(ir.DataType.FLOAT)
        return node

    return {"X": x}, {"values": values, "indices": indices}, build, {"n": 2, "m": 4, "vector": vector}


def _packed(rows: int, cols: int, fmt: str):
    q = quantize(RNG.standard_normal((rows, cols)).astype(np.float32), fmt, axis=1, block_size=32)
    return pack_blocks(q.codes, q.scales, get_format(fmt).bits)


def _matmul(fmt: str):
    wq, s = _packed(48, 64, fmt)  # (N, K) rows: W is (K, N) = (64, 48)
    x = RNG.standard_normal((3, 64)).astype(np.float32)

    def build(model, v):
        node = bq.add_block_quant_matmul(model, v["X"], v["Wq"], v["S"], get_format(fmt), 32, "bqmm")
        node.outputs[0].shape, node.outputs[0].type = ir.Shape((3, 48)), ir.TensorType(ir.DataType.FLOAT)
        return node

    return {"X": x}, {"Wq": wq, "S": s}, build, {"format": fmt, "block_size": 32}


def _gather(fmt: str):
    tq, s = _packed(50, 64, fmt)
    ids = np.array([[0, 7, 49, -1, 3]], np.int64)

    def build(model, v):
        node = bq.add_block_quant_gather(model, v["Tq"], v["S"], v["I"], get_format(fmt), 32, "bqg")
        node.outputs[0].shape, node.outputs[0].type = ir.Shape((1, 5, 64)), ir.TensorType(ir.DataType.FLOAT)
        return node

    return {"I": ids}, {"Tq": tq, "S": s}, build, {"format": fmt, "block_size": 32}


def _qdq(fmt: str):
    x = (RNG.standard_normal((4, 64)) * np.exp(RNG.standard_normal((4, 64)))).astype(np.float32)

    def build(model, v):
        return bq.add_block_qdq(model, v["X"], get_format(fmt), 32, "qdq")

    return {"X": x}, {}, build, {"format": fmt, "block_size": 32}


def _moe(activation: str, gated: bool, shared: int, top_k: int, lead: tuple[int, ...] = (2, 3),
         zero: tuple[str, ...] = (), zero_bias: float = 0.0):
    """``zero``: zero-computation experts; ``zero_bias`` added to their router logits (large: every token takes
    them)."""
    k, c, experts, size = 32, 32 if zero else 24, 4, 16
    hidden, routes = shared + experts * size, experts + len(zero)
    consts = {"router_w": RNG.standard_normal((k, routes)),
              "router_b": RNG.standard_normal(routes) + np.r_[np.zeros(experts), np.full(len(zero), zero_bias)],
              "W1": RNG.standard_normal((k, hidden)) / 4, "b1": RNG.standard_normal(hidden),
              "W2": RNG.standard_normal((hidden, c)) / 4, "b2": RNG.standard_normal(c),
              "fill": RNG.standard_normal((experts, c))}
    if gated:
        consts["W3"] = RNG.standard_normal((k, hidden)) / 4
    if zero:
        consts["zero_values"] = RNG.standard_normal((len(zero), c)) * np.array([[z == "const"] for z in zero])
    consts = {name: a.astype(np.float32) for name, a in consts.items()}
    x = RNG.standard_normal((*lead, k)).astype(np.float32)  # 6 tokens (grouped kernel) or 1 (decode kernel)
    layout = moe.MoELayout(k, c, shared, experts, size, top_k, gated, activation, zero)

    def build(model, v):
        node = moe.add_moe_ffn(model, v["X"], {name: v.get(name) for name in moe.INPUTS[1:]}, layout, "moe")
        node.outputs[0].shape, node.outputs[0].type = ir.Shape((*lead, c)), ir.TensorType(ir.DataType.FLOAT)
        return node

    attrs = {"activation": activation, "gated": int(gated), "experts": experts, "top_k": top_k, "shared": shared,
             "zero_experts": ",".join(zero)}
    return {"X": x}, consts, build, attrs


def _attention(tokens: int, length: int):
    """GQA over a 32-slot cache whose first ``length`` slots are valid; the mask also admits slots past ``length``,
    which the operator must ignore."""
    hkv, g, d, s = 2, 3, 16, 32
    r = lambda *shape: RNG.standard_normal(shape).astype(np.float32)  # noqa: E731
    mask = np.zeros((tokens, s + tokens), np.float32)
    mask[:, s:] = np.triu(np.full((tokens, tokens), -1.0e9, np.float32), 1)
    feed = {"Q": r(hkv, g, tokens, d), "past_key": r(hkv, d, s), "past_value": r(hkv, s, d), "key": r(hkv, d, tokens),
            "value": r(hkv, tokens, d), "attn_mask": mask, "positions": (length + np.arange(tokens))[None]}

    def build(model, v):
        node = decode_attention.decode_attention(model, [v[name] for name in decode_attention.INPUTS], d ** -0.5,
                                                 "attention")
        node.outputs[0].shape, node.outputs[0].type = ir.Shape((hkv, g, tokens, d)), ir.TensorType(ir.DataType.FLOAT)
        return node

    return feed, {}, build, {"scale": d ** -0.5}


def _kv_rows(fmt: str):
    """Rows of ``(2, 5, 64)`` entries spanning many magnitudes, with an all-zero block and a saturating one."""
    x = (RNG.standard_normal((2, 5, 64)) * np.exp(2 * RNG.standard_normal((2, 5, 1)))).astype(np.float32)
    x[0, 0, :32] = 0.0
    x[1, 2, 40] = 1.0e6
    return x


def _kv_encode(fmt: str):
    def build(model, v):
        return kv_blocks.add_kv_encode(model, v["X"], get_format(fmt), 32, "encode")

    return {"X": _kv_rows(fmt)}, {}, build, {"format": fmt, "block_size": 32}


def _kv_decode(fmt: str):
    rows = kv_blocks.encode_reference(_kv_rows(fmt), format=fmt, block_size=32)

    def build(model, v):
        return kv_blocks.add_kv_decode(model, v["R"], get_format(fmt), 32, 64, "decode")

    return {"R": rows}, {}, build, {"format": fmt, "block_size": 32}


def _attention_mx(fmt: str, tokens: int, length: int):
    """As :func:`_attention`, the cache stored as MX rows."""
    hkv, g, d, s = 2, 3, 64, 32
    feed, _, _, _ = _attention(tokens, length)
    feed["Q"] = RNG.standard_normal((hkv, g, tokens, d)).astype(np.float32)
    feed["key"], feed["value"] = (RNG.standard_normal(shape).astype(np.float32) for shape in
                                  ((hkv, d, tokens), (hkv, tokens, d)))
    for name in ("past_key", "past_value"):
        feed[name] = kv_blocks.encode_reference(RNG.standard_normal((hkv, s, d)).astype(np.float32), format=fmt,
                                                block_size=32)

    def build(model, v):
        node = decode_attention_mx.decode_attention_mx(model, [v[name] for name in decode_attention.INPUTS],
                                                       d ** -0.5, get_format(fmt), 32, "attention")
        node.outputs[0].shape, node.outputs[0].type = ir.Shape((hkv, g, tokens, d)), ir.TensorType(ir.DataType.FLOAT)
        return node

    return feed, {}, build, {"scale": d ** -0.5, "format": fmt, "block_size": 32}


CASES = {
    "DecodeAttention": [lambda: _attention(1, 13), lambda: _attention(1, 0), lambda: _attention(3, 32)],
    "DecodeAttentionMX": [lambda: _attention_mx("mxint8", 1, 13), lambda: _attention_mx("mxfp8_e4m3", 1, 0),
                          lambda: _attention_mx("mxfp8_e5m2", 3, 32), lambda: _attention_mx("mxint8", 16, 9)],
    "KVBlockEncode": [lambda f=f: _kv_encode(f) for f in kv_blocks.STORED_FORMATS],
    "KVBlockDecode": [lambda f=f: _kv_decode(f) for f in kv_blocks.STORED_FORMATS],
    "NMSparseMatMul": [lambda: _nm(1), lambda: _nm(8)],
    "BlockQuantMatMul": [lambda f=f: _matmul(f) for f in ("mxfp4", "mxfp6_e2m3", "mxint8", "int4")],
    "BlockQuantGather": [lambda f=f: _gather(f) for f in ("mxfp4", "int8")],
    "BlockQDQ": [lambda f=f: _qdq(f) for f in ("mxfp4", "mxfp8_e4m3")],
    "MoEFFN": [lambda: _moe("gelu", False, 8, 2), lambda: _moe("silu", True, 0, 1), lambda: _moe("relu", False, 4, 4),
               lambda: _moe("gelu_tanh", True, 16, 3), lambda: _moe("silu", True, 8, 2, (1, 1)),
               lambda: _moe("gelu", False, 0, 3, (1, 1)),
               lambda: _moe("silu", True, 8, 2, (2, 3), ("zero", "const", "copy")),
               lambda: _moe("silu", True, 8, 2, (1, 1), ("zero", "const", "copy")),
               lambda: _moe("gelu", False, 0, 2, (2, 3), ("const", "zero"), 20.0)],
}


def test_every_operator_has_a_case():
    assert sorted(CASES) == sorted(registered_ops())


@pytest.mark.parametrize(("op_type", "index"), [(op, i) for op, cases in CASES.items() for i in range(len(cases))])
def test_onnx_body_numpy_reference_and_kernel_agree(op_type, index):
    feed, consts, build, attrs = CASES[op_type][index]()
    model = _model(feed, consts, build)
    spec = get_op(op_type)
    assert [n.op_type for n in model.graph] == [op_type] and spec.attributes == tuple(attrs)

    onnx_out = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feed)[0]
    arrays = {**feed, **consts}
    numpy_out = spec.reference(*(None if v is None else arrays[v.name] for v in model.graph.node(0).inputs), **attrs)
    with nm_codegen.lowering_policy("packed"):  # the N:M kernel, not its dense fallback
        ex, _ = compile_cpu(to_relax(model), TARGET, {})
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(a) for a in feed.values()))
    tvm_out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()

    assert onnx_out.shape == numpy_out.shape == tvm_out.shape
    np.testing.assert_allclose(numpy_out, onnx_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tvm_out, onnx_out, rtol=1e-5, atol=1e-5)
    assert np.abs(onnx_out).max() > 0.1  # a real result, not all zeros
