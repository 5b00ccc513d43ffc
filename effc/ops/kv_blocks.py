"""KV-cache rows in MX blocks: ``effc.KVBlockEncode`` / ``effc.KVBlockDecode`` and the numpy codec of one row.

A cached key or value (one token, one KV head) of ``D`` float32 entries is stored as one row of ``W`` bytes:
the ``D`` element codes (8-bit MX formats: one byte each), then the ``D / block_size`` E8M0 scale bytes of its
blocks of ``block_size`` consecutive entries along ``head_dim`` (OCP MX v1.0, sections 5.3 and 6.3; codes and
scales exactly those of :func:`effc.ops.block_formats.quantize`). A cache of ``S`` slots is ``(Hkv, S, W)`` uint8:
each slot one contiguous row, so a kernel that walks the slots streams memory (keys and values alike), and the
runtime writes a token's entries with one row copy per head.

Schemas (domain ``effc``, opset 1; attributes ``format`` (an 8-bit MX format of
:data:`effc.ops.block_formats.FORMATS`: :data:`STORED_FORMATS`) and ``block_size``; one function overload per
format and block size):

* ``R = effc.KVBlockEncode(X)``: ``X`` ``(..., D)`` float32 → ``R`` ``(..., W)`` uint8, ``W = D + D / block_size``.
  Scales ``2^(floor(log2 amax) - emax)`` (E8M0 byte ``0`` for an all-zero block; a block whose ``amax`` is below
  ``2^-126`` takes ``2^-126 · 2^-emax``), elements rounded to nearest even and saturated (section 6.3).
* ``X = effc.KVBlockDecode(R)``: the inverse: ``X[..., c] = element(R[..., c]) · 2^(R[..., D + c // bs] - 127)``.

Both bodies are standard ONNX ops (opset ≥ 13): exact ``floor(log2)`` as in :mod:`effc.ops.block_quant`, element
codes computed arithmetically (FP: ``(e + bias - 1) · 2^m + round(|v| / 2^(e - m))`` with ``e`` clamped to the
smallest normal exponent, so subnormals and a rounding carry into the next exponent come out right; MXINT8:
``round(64 v) mod 256``), decoding by lookup tables. MACs: 0.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto

from effc.ops.base import EFFC_DOMAIN, OpSpec, add_function, register_op
from effc.ops.block_formats import E8M0_BIAS, BlockFormat, get_format, quantize
from effc.ops.block_quant import _Body, _floor_log2, _fp_info, _function, _node_attrs, _opset, overload_name

__all__ = ["STORED_FORMATS", "add_kv_decode", "add_kv_encode", "check_stored", "decode_body", "decode_reference",
           "encode_reference", "row_bytes", "row_head_dim", "row_overload", "stores"]

#: Formats a cache row can hold (one byte per element code).
STORED_FORMATS = ("mxint8", "mxfp8_e4m3", "mxfp8_e5m2")
#: Value of each E8M0 scale byte (0xFF: NaN).
_POW2 = np.append(np.ldexp(1.0, np.arange(255) - E8M0_BIAS), np.nan).astype(np.float32)


def stores(fmt: BlockFormat) -> bool:
    """True when cache rows can hold ``fmt`` (8-bit MX elements)."""
    return fmt.name in STORED_FORMATS


def row_bytes(head_dim: int, block_size: int) -> int:
    """Bytes of one cached row: ``head_dim`` codes plus ``head_dim / block_size`` E8M0 scales."""
    return head_dim + head_dim // block_size


def row_head_dim(width: int, block_size: int) -> int:
    """``head_dim`` of rows of ``width`` bytes (the inverse of :func:`row_bytes`)."""
    return width * block_size // (block_size + 1)


def row_overload(fmt: BlockFormat, block_size: int, head_dim: int) -> str:
    """Function overload of an operator whose body splits rows of ``head_dim`` codes (the split is static)."""
    return f"{overload_name(fmt, block_size)}_d{head_dim}"


def encode_reference(x: np.ndarray, *, format: str, block_size: int) -> np.ndarray:  # noqa: A002
    """Numpy ``effc.KVBlockEncode``: rows ``(..., D + D / bs)`` uint8 from the codec of :mod:`effc.ops.block_formats`.

    Equal to the function body except for non-zero blocks whose largest magnitude is below 2^-126 (see the module
    docstring).
    """
    x = np.asarray(x, np.float32)
    q = quantize(x, format, axis=-1, block_size=block_size)
    codes = q.codes.reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]
    return np.concatenate([codes, q.scales], axis=-1)


def decode_reference(rows: np.ndarray, *, format: str, block_size: int) -> np.ndarray:  # noqa: A002
    """Numpy ``effc.KVBlockDecode``: float32 ``(..., D)`` of rows ``(..., D + D / bs)``."""
    fmt = get_format(format)
    d = row_head_dim(rows.shape[-1], block_size)
    values = fmt.code_table()[rows[..., :d]].reshape(*rows.shape[:-1], -1, block_size)
    scales = _POW2[rows[..., d:]]
    return (values * scales[..., None]).reshape(*rows.shape[:-1], d)


def _lead_shape(b: _Body, x: str, tail: list[int]) -> str:
    """``Shape(x)[:-1] + tail`` (int64), for reshapes that keep the leading axes."""
    lead = b.op("Slice", b.op("Shape", x), b.const(np.array([0], np.int64)), b.const(np.array([-1], np.int64)))
    return b.op("Concat", lead, b.const(np.array(tail, np.int64)), axis=0)


def _encode_body(b: _Body, fmt: BlockFormat, block_size: int) -> str:
    xb = b.op("Reshape", "X", _lead_shape(b, "X", [-1, block_size]))
    if b.opset >= 18:
        amax = b.op("ReduceMax", b.op("Abs", xb), b.const(np.array([-1], np.int64)), keepdims=1)
    else:
        amax = b.op("ReduceMax", b.op("Abs", xb), axes=[-1], keepdims=1)
    shared = b.op("Sub", _floor_log2(b, b.op("Max", amax, b.const(np.float32(2.0**-126)))),
                  b.const(np.float32(fmt.emax)))
    shared = b.op("Clip", shared, b.const(np.float32(-E8M0_BIAS)), b.const(np.float32(E8M0_BIAS)))
    zero = b.op("LessOrEqual", amax, b.const(np.float32(0.0)))
    shared = b.op("Where", zero, b.const(np.float32(-E8M0_BIAS)), shared)
    lim = np.float32(fmt.max_value)
    v = b.op("Clip", b.op("Div", xb, b.op("Pow", b.const(np.float32(2.0)), shared)), b.const(-lim), b.const(lim))
    if fmt.kind == "mxint":
        code = b.op("Add", b.op("Round", b.op("Mul", v, b.const(np.float32(64.0)))), b.const(np.float32(256.0)))
        code = b.op("Mod", b.op("Cast", code, to=TensorProto.INT32), b.i32(256))
    else:
        emin, mant = _fp_info(fmt)
        a = b.op("Abs", v)
        e = b.op("Max", _floor_log2(b, a), b.const(np.float32(emin)))
        quantum = b.op("Pow", b.const(np.float32(2.0)), b.op("Sub", e, b.const(np.float32(mant))))
        # exponent field (e - emin) for normals and 0 for subnormals; the rounded significand adds the rest
        mag = b.op("Add", b.op("Mul", b.op("Sub", e, b.const(np.float32(emin))), b.const(np.float32(2**mant))),
                   b.op("Round", b.op("Div", a, quantum)))
        sign = b.op("Mul", b.op("Cast", b.op("Less", v, b.const(np.float32(0.0))), to=TensorProto.FLOAT),
                    b.const(np.float32(128.0)))
        code = b.op("Cast", b.op("Add", mag, sign), to=TensorProto.INT32)
    codes = b.op("Reshape", b.op("Cast", code, to=TensorProto.UINT8), _lead_shape(b, "X", [-1]))
    scales = b.op("Cast", b.op("Cast", b.op("Add", shared, b.const(np.float32(E8M0_BIAS))), to=TensorProto.INT32),
                  to=TensorProto.UINT8)
    scales = b.op("Reshape", scales, _lead_shape(b, "X", [-1]))
    return b.op("Concat", codes, scales, axis=-1)


def decode_body(b: _Body, fmt: BlockFormat, block_size: int, d: int, rows: str = "R") -> str:
    """Append the nodes decoding rows named ``rows`` ``(..., W)`` to ``b``; returns the float32 ``(..., d)`` name."""
    w = row_bytes(d, block_size)
    axis = b.const(np.array([-1], np.int64))
    codes = b.op("Slice", rows, b.const(np.array([0], np.int64)), b.const(np.array([d], np.int64)), axis)
    scales = b.op("Slice", rows, b.const(np.array([d], np.int64)), b.const(np.array([w], np.int64)), axis)
    values = b.op("Gather", b.const(fmt.code_table()), b.op("Cast", codes, to=TensorProto.INT32), axis=0)
    scale = b.op("Gather", b.const(_POW2), b.op("Cast", scales, to=TensorProto.INT32), axis=0)
    blocks = b.op("Reshape", values, _lead_shape(b, rows, [-1, block_size]))
    return b.op("Reshape", b.op("Mul", blocks, b.op("Unsqueeze", scale, axis)), _lead_shape(b, rows, [d]))


def check_stored(fmt: BlockFormat, d: int, block_size: int) -> None:
    """Raises: ValueError: ``fmt`` is not in :data:`STORED_FORMATS` or ``d`` is not a multiple of ``block_size``."""
    if not stores(fmt):
        raise ValueError(f"KV cache rows hold {', '.join(STORED_FORMATS)}, not {fmt.name}")
    if d % block_size:
        raise ValueError(f"head_dim {d} is not a multiple of block_size {block_size}")


def _add_node(model: ir.Model, function: ir.Function, x: ir.Value, fmt: BlockFormat, block_size: int,
              width: int, dtype: ir.DataType, name: str) -> ir.Node:
    """A new node calling ``function`` (attached to ``model``) on ``x`` ``(..., n)`` → ``(..., width)`` ``dtype``."""
    add_function(model, function)
    node = ir.Node(EFFC_DOMAIN, function.name, [x], _node_attrs(fmt, block_size), overload=function.overload,
                   name=name, num_outputs=1)
    if x.shape is not None:
        node.outputs[0].shape = ir.Shape([*list(x.shape)[:-1], width])
    node.outputs[0].type = ir.TensorType(dtype)
    return node


def add_kv_encode(model: ir.Model, x: ir.Value, fmt: BlockFormat, block_size: int, name: str) -> ir.Node:
    """A new (not yet inserted) ``effc.KVBlockEncode`` node of ``x`` ``(..., D)`` (static shape) → rows ``(..., W)``.

    Raises:
        ValueError: ``fmt`` is not in :data:`STORED_FORMATS`, ``D`` is not a multiple of ``block_size``, or the
            model's opset is older than 13.
    """
    d = int(x.shape[-1])
    check_stored(fmt, d, block_size)
    b = _Body("kvenc", _opset(model))
    function = _function("KVBlockEncode", fmt, block_size, ["X"], b, _encode_body(b, fmt, block_size))
    return _add_node(model, function, x, fmt, block_size, row_bytes(d, block_size), ir.DataType.UINT8, name)


def add_kv_decode(model: ir.Model, rows: ir.Value, fmt: BlockFormat, block_size: int, head_dim: int,
                  name: str) -> ir.Node:
    """A new (not yet inserted) ``effc.KVBlockDecode`` node of ``rows`` ``(..., W)`` uint8 → ``(..., head_dim)``.

    The function overload is per format, block size and ``head_dim`` (:func:`row_overload`).

    Raises:
        ValueError: as :func:`add_kv_encode`.
    """
    check_stored(fmt, head_dim, block_size)
    b = _Body("kvdec", _opset(model))
    function = _function("KVBlockDecode", fmt, block_size, ["R"], b, decode_body(b, fmt, block_size, head_dim))
    function.overload = row_overload(fmt, block_size, head_dim)
    return _add_node(model, function, rows, fmt, block_size, head_dim, ir.DataType.FLOAT, name)


def _no_macs(node: ir.Node) -> int:
    del node
    return 0


register_op(OpSpec("KVBlockEncode", ("X",), ("format", "block_size"), _no_macs, encode_reference))
register_op(OpSpec("KVBlockDecode", ("R",), ("format", "block_size"), _no_macs, decode_reference))
