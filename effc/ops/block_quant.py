"""The effc block-quantization operators: schemas, reference bodies (ONNX functions of standard ops), MACs, numpy.

Schemas (domain ``effc``, opset 1; attributes ``format`` (string, a name of
:data:`effc.ops.block_formats.FORMATS`) and ``block_size`` (int) on all three; one function overload per format and
block size, e.g. ``"mxfp4_b32"``):

* ``Y = effc.BlockQuantMatMul(X, Wq, S)``: ``Y = X @ W`` with ``X`` ``(..., K)`` float32 and ``W`` of shape
  ``(K, N)`` stored transposed and packed: ``Wq`` uint8 ``(N, K * bits / 8)`` (each row = one output channel, codes
  along the reduction axis K, see :mod:`effc.ops.bitpack`), ``S`` uint8 E8M0 ``(N, K / block_size)`` (MX formats)
  or float16 / float32 scale values (int8 / int4 / int4_asym). ``Y`` ``(..., N)`` float32. MACs: rows × K × N.
  Asymmetric formats (``int4_asym``, GGUF Q4_1) take a fourth input ``M``, the block minimums (shape and type of
  ``S``): ``W = code * S + M`` per block (``Y = effc.BlockQuantMatMul(X, Wq, S, M)``).
* ``Y = effc.BlockQuantGather(Tq, S, I)``: ``Y = Gather(T, I)`` for an embedding table ``T`` ``(V, D)`` stored
  as ``Tq`` uint8 ``(V, D * bits / 8)`` and ``S`` ``(V, D / block_size)`` (blocks along D); ``I`` int64 of any
  shape, negative ids count from the end; ``Y`` ``(*I.shape, D)`` float32. MACs: 0 (a table lookup). Asymmetric
  formats: ``effc.BlockQuantGather(Tq, S, I, M)``.
* ``Y = effc.BlockQDQ(X)``: dynamic MX quantize-dequantize of an activation ``X`` ``(..., K)`` float32 along its
  last axis in blocks of ``block_size`` (weights + activations mode, KV mode); ``Y`` has ``X``'s shape. MACs: 0.
  ``format=int8`` (activations only, GGUF Q8_0 / Q8_1 style): symmetric codes ``q = round(x / s)`` in
  ``[-127, 127]`` with one float32 scale ``s = amax / 127`` per block (1 for an all-zero block), ``Y = q * s``:
  :func:`effc.ops.block_formats.quantize` with ``scale_dtype="float32"``, bit for bit.

Decoding is bit-exact with :func:`effc.ops.block_formats.dequantize`: codes are unpacked with integer
``Div``/``Mod`` (opset 13+), element values come from a lookup table (``Gather``), scales from a 256-entry table of
``2^(s - 127)`` and one exact product (a power of two times an element value); asymmetric blocks add the minimum
after the exact product ``code * S`` (one rounding, as an FMA in the kernels). ``BlockQDQ`` computes
``floor(log2 |x|)`` with ``Log`` plus an exact correction step against ``Pow(2, e)``, so scales are exact too.
Nodes carry ``format`` and ``block_size`` attributes for the TVM converters (:mod:`effc.codegen.ops.block_quant`).
Source: OCP MX v1.0 sections 5.3 and 6.3.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from effc.ir.queries import static_shape
from effc.ops.base import EFFC_DOMAIN, OpSpec, add_function, register_op
from effc.ops.bitpack import unpack_codes
from effc.ops.block_formats import E8M0_BIAS, BlockFormat, get_format, quantize_dequantize

__all__ = ["add_block_qdq", "add_block_quant_gather", "add_block_quant_matmul", "decode_rows", "overload_name"]

_MIN_OPSET = 13


def overload_name(fmt: BlockFormat, block_size: int) -> str:
    """Function overload for one format and block size, e.g. ``"mxfp4_b32"``."""
    return f"{fmt.name}_b{block_size}"


class _Body:
    """Accumulates the nodes of a function body with unique value names."""

    def __init__(self, prefix: str, opset: int) -> None:
        self.prefix, self.nodes, self.n, self.opset = prefix, [], 0, opset

    def const(self, array: np.ndarray) -> str:
        name = self.fresh("c")
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array))))
        return name

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}_{hint}{self.n}"

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = self.fresh(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def i32(self, v: int) -> str:
        return self.const(np.array(v, np.int32))


def _unpack(b: _Body, packed: str, bits: int) -> str:
    """int32 codes ``(R, C)`` from packed uint8 rows ``(R, C * bits / 8)`` (little-endian bit stream)."""
    p = b.op("Cast", packed, to=TensorProto.INT32)
    if bits == 8:
        return p
    if bits == 4:
        parts = [b.op("Mod", p, b.i32(16)), b.op("Div", p, b.i32(16))]
        group = 2
    elif bits == 6:
        grouped = b.op("Reshape", p, b.const(np.array([0, -1, 3], np.int64)))
        b0, b1, b2 = (b.op("Gather", grouped, b.const(np.array(i, np.int64)), axis=2) for i in range(3))
        parts = [
            b.op("Mod", b0, b.i32(64)),
            b.op("Add", b.op("Div", b0, b.i32(64)), b.op("Mul", b.op("Mod", b1, b.i32(16)), b.i32(4))),
            b.op("Add", b.op("Div", b1, b.i32(16)), b.op("Mul", b.op("Mod", b2, b.i32(4)), b.i32(16))),
            b.op("Div", b2, b.i32(4)),
        ]
        group = 4
    else:
        raise ValueError(f"no unpacking rule for {bits}-bit codes")
    axes = b.const(np.array([-1], np.int64))
    stacked = b.op("Concat", *(b.op("Unsqueeze", x, axes) for x in parts), axis=-1)  # (R, C/group, group)
    del group
    return b.op("Reshape", stacked, b.const(np.array([0, -1], np.int64)))


def _dequant_rows(b: _Body, packed: str, scales: str, fmt: BlockFormat, block_size: int,
                  minimums: str | None = None) -> str:
    """float32 rows ``(R, C)`` from packed codes and scales ``(R, C / block_size)`` (plus minimums, asymmetric)."""
    codes = _unpack(b, packed, fmt.bits)
    values = b.op("Gather", b.const(fmt.code_table()), codes, axis=0)
    if fmt.is_mx:
        pow2 = np.append(np.ldexp(1.0, np.arange(255) - E8M0_BIAS), np.nan).astype(np.float32)  # 0xFF: NaN
        scale = b.op("Gather", b.const(pow2), b.op("Cast", scales, to=TensorProto.INT32), axis=0)
    else:  # int formats: float16 / float32 scale values
        scale = b.op("Cast", scales, to=TensorProto.FLOAT)
    blocks = b.op("Reshape", values, b.const(np.array([0, -1, block_size], np.int64)))
    scaled = b.op("Mul", blocks, b.op("Unsqueeze", scale, b.const(np.array([-1], np.int64))))
    if minimums is not None:
        low = b.op("Cast", minimums, to=TensorProto.FLOAT)
        scaled = b.op("Add", scaled, b.op("Unsqueeze", low, b.const(np.array([-1], np.int64))))
    return b.op("Reshape", scaled, b.const(np.array([0, -1], np.int64)))


def _floor_log2(b: _Body, a: str) -> str:
    """Exact ``floor(log2(a))`` for positive float32 ``a`` (``Log`` estimate corrected by one step either way)."""
    est = b.op("Floor", b.op("Div", b.op("Log", a), b.const(np.float32(math.log(2.0)))))
    two = b.const(np.float32(2.0))
    p = b.op("Pow", two, est)
    too_big = b.op("Cast", b.op("Greater", p, a), to=TensorProto.FLOAT)
    too_small = b.op("Cast", b.op("LessOrEqual", b.op("Mul", p, two), a), to=TensorProto.FLOAT)
    return b.op("Add", b.op("Sub", est, too_big), too_small)


def _qdq_last_axis(b: _Body, x: str, fmt: BlockFormat, block_size: int) -> str:
    """MX quantize-dequantize of ``x`` along its last axis (length divisible by ``block_size``)."""
    shape = b.op("Shape", x)
    lead = b.op("Slice", shape, b.const(np.array([0], np.int64)), b.const(np.array([-1], np.int64)))
    blocked_shape = b.op("Concat", lead, b.const(np.array([-1, block_size], np.int64)), axis=0)
    xb = b.op("Reshape", x, blocked_shape)
    if b.opset >= 18:  # ReduceMax takes axes as an input from opset 18
        amax = b.op("ReduceMax", b.op("Abs", xb), b.const(np.array([-1], np.int64)), keepdims=1)
    else:
        amax = b.op("ReduceMax", b.op("Abs", xb), axes=[-1], keepdims=1)
    tiny = b.const(np.float32(2.0**-126))
    shared = b.op("Sub", _floor_log2(b, b.op("Max", amax, tiny)), b.const(np.float32(fmt.emax)))
    shared = b.op("Clip", shared, b.const(np.float32(-E8M0_BIAS)), b.const(np.float32(E8M0_BIAS)))
    scale = b.op("Pow", b.const(np.float32(2.0)), shared)
    lim = fmt.max_value
    v = b.op("Clip", b.op("Div", xb, scale), b.const(np.float32(-lim)), b.const(np.float32(lim)))
    if fmt.kind == "mxint":
        c64 = b.const(np.float32(64.0))
        q = b.op("Div", b.op("Round", b.op("Mul", v, c64)), c64)
    else:
        info = _fp_info(fmt)
        e = b.op("Max", _floor_log2(b, b.op("Abs", v)), b.const(np.float32(info[0])))
        quantum = b.op("Pow", b.const(np.float32(2.0)), b.op("Sub", e, b.const(np.float32(info[1]))))
        q = b.op("Mul", b.op("Round", b.op("Div", v, quantum)), quantum)
    return b.op("Reshape", b.op("Mul", q, scale), shape)


def _qdq_int_last_axis(b: _Body, x: str, fmt: BlockFormat, block_size: int) -> str:
    """Symmetric int quantize-dequantize of ``x`` along its last axis, float32 scale ``amax / qmax`` per block.

    The float operations of :func:`effc.ops.block_formats.quantize` (``scale_dtype="float32"``): ``s = amax / qmax``
    (1 where it is 0), ``q = round_half_even(clip(x / s, -qmax, qmax))``, ``Y = q * s``.
    """
    shape = b.op("Shape", x)
    lead = b.op("Slice", shape, b.const(np.array([0], np.int64)), b.const(np.array([-1], np.int64)))
    xb = b.op("Reshape", x, b.op("Concat", lead, b.const(np.array([-1, block_size], np.int64)), axis=0))
    if b.opset >= 18:
        amax = b.op("ReduceMax", b.op("Abs", xb), b.const(np.array([-1], np.int64)), keepdims=1)
    else:
        amax = b.op("ReduceMax", b.op("Abs", xb), axes=[-1], keepdims=1)
    scale = b.op("Div", amax, b.const(np.float32(fmt.qmax)))
    one = b.const(np.float32(1.0))
    scale = b.op("Where", b.op("Greater", scale, b.const(np.float32(0.0))), scale, one)
    lim = float(fmt.qmax)
    q = b.op("Round", b.op("Clip", b.op("Div", xb, scale), b.const(np.float32(-lim)), b.const(np.float32(lim))))
    return b.op("Reshape", b.op("Mul", q, scale), shape)


def _fp_info(fmt: BlockFormat) -> tuple[int, int]:
    """``(emin, mantissa bits)`` of an FP element format (subnormals share the exponent ``emin``)."""
    import ml_dtypes

    fi = ml_dtypes.finfo(fmt.element_dtype)
    return int(fi.minexp), int(fi.nmant)


def _function(name: str, fmt: BlockFormat, block_size: int, inputs: list[str], b: _Body, out: str) -> ir.Function:
    b.nodes.append(helper.make_node("Identity", [out], ["Y"]))
    proto = helper.make_function(
        EFFC_DOMAIN,
        name,
        inputs,
        ["Y"],
        b.nodes,
        [helper.make_opsetid("", b.opset)],
        attributes=["format", "block_size"],
    )
    proto.overload = overload_name(fmt, block_size)
    return ir.serde.deserialize_function(proto)


def _opset(model: ir.Model) -> int:
    """The model's default-domain opset (function bodies must import the same version).

    Raises:
        ValueError: the model's opset is older than 13.
    """
    opset = model.opset_imports.get("", model.graph.opset_imports.get("", _MIN_OPSET))
    if opset < _MIN_OPSET:
        raise ValueError(f"block quantization needs opset >= {_MIN_OPSET}, the model imports {opset}")
    return opset


def _node_attrs(fmt: BlockFormat, block_size: int) -> list[ir.Attr]:
    return [ir.AttrString("format", fmt.name), ir.AttrInt64("block_size", block_size)]


def _minimums_input(fmt: BlockFormat, minimums: ir.Value | None) -> list[ir.Value]:
    """``[minimums]`` for an asymmetric format, ``[]`` otherwise.

    Raises:
        ValueError: minimums given for a format without them, or missing for one with them.
    """
    if fmt.has_minimum != (minimums is not None):
        raise ValueError(f"format {fmt.name} {'needs' if fmt.has_minimum else 'takes no'} block minimums")
    return [minimums] if minimums is not None else []


def add_block_quant_matmul(
    model: ir.Model, x: ir.Value, wq: ir.Value, scales: ir.Value, fmt: BlockFormat, block_size: int, name: str,
    minimums: ir.Value | None = None,
) -> ir.Node:
    """A new (not yet inserted) ``effc.BlockQuantMatMul`` node; attaches the function body to ``model``.

    Args:
        model: the model that receives the function body (its default-domain opset is the body's).
        x: activation ``(..., K)``.
        wq: packed weight codes ``(N, K * bits / 8)`` uint8, one row per output channel, blocks along K.
        scales: block scales ``(N, K / block_size)`` (E8M0 uint8 for MX formats, float16/float32 for int).
        fmt: element format of the codes.
        block_size: elements per block along K.
        name: node name.
        minimums: block minimums ``(N, K / block_size)`` (type of ``scales``) of an asymmetric format, else None.

    Returns:
        The node, ``Y (..., N) = X @ decode(wq, scales[, minimums])ᵀ``.

    Raises:
        ValueError: the model's opset is older than 13, or ``minimums`` does not fit the format.
    """
    extra = _minimums_input(fmt, minimums)
    b = _Body("bqmm", _opset(model))
    w_nk = _dequant_rows(b, "Wq", "S", fmt, block_size, "M" if extra else None)
    y = b.op("MatMul", "X", b.op("Transpose", w_nk, perm=[1, 0]))
    add_function(model, _function("BlockQuantMatMul", fmt, block_size, ["X", "Wq", "S", *("M" for _ in extra)], b, y))
    return ir.Node(EFFC_DOMAIN, "BlockQuantMatMul", [x, wq, scales, *extra], _node_attrs(fmt, block_size),
                   overload=overload_name(fmt, block_size), name=name, num_outputs=1)


def add_block_quant_gather(
    model: ir.Model, tq: ir.Value, scales: ir.Value, ids: ir.Value, fmt: BlockFormat, block_size: int, name: str,
    minimums: ir.Value | None = None,
) -> ir.Node:
    """A new ``effc.BlockQuantGather`` node (embedding lookup of a block-quantized ``(V, D)`` table).

    Args:
        model: the model that receives the function body.
        tq: packed table codes ``(V, D * bits / 8)`` uint8, blocks along D.
        scales: block scales ``(V, D / block_size)``.
        ids: int64 indices into the V rows (any shape).
        fmt: element format of the codes.
        block_size: elements per block along D.
        name: node name.
        minimums: block minimums ``(V, D / block_size)`` (type of ``scales``) of an asymmetric format, else None.

    Returns:
        The node, ``Y (*ids.shape, D)``.

    Raises:
        ValueError: the model's opset is older than 13, or ``minimums`` does not fit the format.
    """
    extra = _minimums_input(fmt, minimums)
    b = _Body("bqg", _opset(model))
    table = _dequant_rows(b, "Tq", "S", fmt, block_size, "M" if extra else None)
    y = b.op("Gather", table, "I", axis=0)
    add_function(model, _function("BlockQuantGather", fmt, block_size, ["Tq", "S", "I", *("M" for _ in extra)], b, y))
    return ir.Node(EFFC_DOMAIN, "BlockQuantGather", [tq, scales, ids, *extra], _node_attrs(fmt, block_size),
                   overload=overload_name(fmt, block_size), name=name, num_outputs=1)


def add_block_qdq(model: ir.Model, x: ir.Value, fmt: BlockFormat, block_size: int, name: str) -> ir.Node:
    """A new ``effc.BlockQDQ`` node: dynamic quantize-dequantize of ``x`` along its last axis.

    Args:
        model: the model that receives the function body.
        x: float activation; its last axis is split into blocks of ``block_size``.
        fmt: an MX element format (OCP MX v1.0: shared E8M0 scale per block) or ``int8`` (float32 scale
            ``amax / 127`` per block, see the module docstring).
        block_size: elements per block.
        name: node name.

    Returns:
        The node; its output has ``x``'s shape and type.

    Raises:
        ValueError: ``fmt`` is neither an MX format nor ``int8``, or the model's opset is older than 13.
    """
    if not (fmt.is_mx or fmt.name == "int8"):
        raise ValueError(f"dynamic activation quantization needs an MX format or int8, got {fmt.name}")
    b = _Body("bqdq", _opset(model))
    y = (_qdq_last_axis if fmt.is_mx else _qdq_int_last_axis)(b, "X", fmt, block_size)
    add_function(model, _function("BlockQDQ", fmt, block_size, ["X"], b, y))
    node = ir.Node(EFFC_DOMAIN, "BlockQDQ", [x], _node_attrs(fmt, block_size),
                   overload=overload_name(fmt, block_size), name=name, num_outputs=1)
    # Same shape and type as X: the consumers' MAC counters and shape-dependent lowering read it.
    node.outputs[0].shape, node.outputs[0].type = x.shape, x.type
    return node


def check_function_proto(function: ir.Function) -> None:
    """Run the ONNX checker on one function body (debug helper)."""
    onnx.checker.check_function(ir.serde.serialize_function(function))


def decode_rows(packed: np.ndarray, scales: np.ndarray, fmt: BlockFormat | str, block_size: int,
                minimums: np.ndarray | None = None) -> np.ndarray:
    """Numpy decode of packed rows: ``(R, C * bits / 8)`` uint8 codes and ``(R, C / block_size)`` scales → ``(R, C)``.

    Scales are E8M0 codes (MX formats) or float16 / float32 values (int formats); ``minimums`` (the scales' shape and
    type) are added per block for asymmetric formats. float32 result, bit-exact with the function bodies and
    :func:`effc.ops.block_formats.dequantize`.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    cols = scales.shape[1] * block_size
    values = fmt.code_table()[unpack_codes(packed, fmt.bits, cols)]
    if fmt.is_mx:
        scale = np.ldexp(np.float32(1.0), scales.astype(np.int32) - E8M0_BIAS).astype(np.float32)
    else:
        scale = scales.astype(np.float32)
    blocks = values.reshape(len(values), -1, block_size) * scale[..., None]
    if minimums is not None:
        blocks = blocks + minimums.astype(np.float32)[..., None]
    return blocks.reshape(len(values), cols)


def matmul_reference(x: np.ndarray, wq: np.ndarray, s: np.ndarray, m: np.ndarray | None = None, *,
                     format: str, block_size: int) -> np.ndarray:  # noqa: A002
    """Numpy ``effc.BlockQuantMatMul``: ``X (..., K) @ decode_rows(Wq, S[, M]).T`` → ``(..., N)`` float32."""
    return np.matmul(x, decode_rows(wq, s, format, block_size, m).T)


def gather_reference(tq: np.ndarray, s: np.ndarray, ids: np.ndarray, m: np.ndarray | None = None, *,
                     format: str, block_size: int) -> np.ndarray:  # noqa: A002
    """Numpy ``effc.BlockQuantGather``: rows ``ids`` of the decoded ``(V, D)`` table → ``(*ids.shape, D)``."""
    return decode_rows(tq, s, format, block_size, m)[ids]


def qdq_reference(x: np.ndarray, *, format: str, block_size: int) -> np.ndarray:  # noqa: A002
    """Numpy ``effc.BlockQDQ``: MX (or int8, float32 scales) quantize-dequantize of ``x`` along its last axis.

    Equal to the function body except for MX blocks whose largest magnitude is below 2^-126 (subnormal): the body
    and the kernel take it as 2^-126 there, :func:`effc.ops.block_formats.quantize` uses its exact exponent.
    """
    return quantize_dequantize(x, format, axis=-1, block_size=block_size, scale_dtype="float32")


def matmul_macs(node: ir.Node) -> int | None:
    """MACs of ``effc.BlockQuantMatMul``: rows × K × N, from the activation ``(..., K)`` and packed ``(N, ...)``."""
    x, weight = static_shape(node.inputs[0]), node.inputs[1]
    packed = static_shape(weight) or (tuple(weight.const_value.shape) if weight.const_value is not None else None)
    return None if x is None or packed is None else int(np.prod(x[:-1])) * int(x[-1]) * int(packed[0])


def _no_macs(node: ir.Node) -> int:
    """Decode-only operators (table lookup, quantize-dequantize): no multiply-accumulates."""
    del node
    return 0


_ATTRS = ("format", "block_size")
def _coded_reader(codes_index: int):
    """Reader of the codes at input ``codes_index``: ``(value, (R, C) float32, label)``.

    Scales follow the codes; the minimums of an asymmetric format are input 3 when present.
    """

    def read(node: ir.Node) -> tuple[ir.Value, np.ndarray, str] | None:
        fmt_name, block_size = node.attributes.get_string("format"), node.attributes.get_int("block_size")
        codes = node.inputs[codes_index] if len(node.inputs) > codes_index + 1 else None
        scales = node.inputs[codes_index + 1] if codes is not None else None
        low = node.inputs[3] if len(node.inputs) > 3 else None
        if codes is None or codes.const_value is None or scales.const_value is None or not fmt_name:
            return None
        if low is not None and low.const_value is None:
            return None
        dense = decode_rows(codes.const_value.numpy(), scales.const_value.numpy(), fmt_name, block_size,
                            None if low is None else low.const_value.numpy())
        return codes, dense, f"block-quantized {fmt_name}"

    return read


register_op(OpSpec("BlockQuantMatMul", ("X", "Wq", "S", "M"), _ATTRS, matmul_macs, matmul_reference,
                   coded_weight=_coded_reader(1)))
register_op(OpSpec("BlockQuantGather", ("Tq", "S", "I", "M"), _ATTRS, _no_macs, gather_reference,
                   coded_weight=_coded_reader(0)))
register_op(OpSpec("BlockQDQ", ("X",), _ATTRS, _no_macs, qdq_reference))
