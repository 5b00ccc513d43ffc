"""TVM's CPU sort functions (``tvm.contrib.sort.*``) for processes without TVM's compiler library.

TVM lowers ``argsort`` / ``sort`` / ``topk`` on CPU (and so TopK, NonMaxSuppression, Unique, ...) to calls of
packed functions that ``libtvm_compiler.so`` registers (``src/runtime/contrib/sort/sort.cc``); effc's runtime loads
only ``libtvm_runtime.so``, where they are missing ("Cannot find function tvm.contrib.sort.argsort"). This module
registers numpy versions under the same names when, and only when, no other registration exists: in a process
that imported TVM the C++ ones stay in use. Same results as TVM's: stable order (ties keep their input order;
TopK prefers the lower index on ties), NaN where numpy's stable sort puts it (TVM's ``std::stable_sort`` with a
NaN has no defined order).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

__all__ = ["SORT_FUNCTIONS", "register_sort_functions"]


def _read(tensor: Any) -> np.ndarray:
    import tvm_ffi

    array = np.empty(tuple(tensor.shape), dtype=str(tensor.dtype))
    tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)
    return array


def _write(tensor: Any, array: np.ndarray) -> None:
    import tvm_ffi

    array = np.ascontiguousarray(array, dtype=str(tensor.dtype)).reshape(tuple(tensor.shape))
    tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")(tensor, ctypes.c_void_p(array.ctypes.data),
                                                              array.nbytes)


def _order(data: np.ndarray, axis: int, ascending: bool) -> np.ndarray:
    """Stable argsort along ``axis``; descending keeps equal elements in input order (TVM's ``std::stable_sort``)."""
    if ascending:
        return np.argsort(data, axis=axis, kind="stable")
    size = data.shape[axis]
    flipped = np.flip(data, axis=axis)
    return size - 1 - np.flip(np.argsort(flipped, axis=axis, kind="stable"), axis=axis)


def _argsort(data: Any, out: Any, axis: int, is_ascend: bool) -> None:
    _write(out, _order(_read(data), int(axis), bool(is_ascend)))


def _sort(data: Any, out: Any, axis: int, is_ascend: bool) -> None:
    values = _read(data)
    _write(out, np.take_along_axis(values, _order(values, int(axis), bool(is_ascend)), axis=int(axis)))


def _argsort_nms(data: Any, valid_count: Any, out: Any, axis: int, is_ascend: bool) -> None:
    """Argsort of the first ``valid_count`` elements of each row along ``axis``; positions past it keep their index."""
    values, counts = _read(data), _read(valid_count)
    axis = int(axis) % values.ndim
    moved = np.moveaxis(values, axis, -1)
    result = np.broadcast_to(np.arange(moved.shape[-1], dtype=np.int32), moved.shape).copy()
    for row in np.ndindex(moved.shape[:-1]):
        n = int(counts[row])
        result[row][:n] = _order(moved[row][:n], 0, bool(is_ascend))
    _write(out, np.moveaxis(result, -1, axis))


def _topk(data: Any, *args: Any) -> None:
    """``(data, outputs..., k, axis, ret_type, is_ascend)``: outputs are values and/or indices per ``ret_type``."""
    *outputs, k, axis, ret_type, is_ascend = args
    values = _read(data)
    axis = int(axis) % values.ndim
    k = int(k) if int(k) >= 1 else values.shape[axis]
    order = np.take(_order(values, axis, bool(is_ascend)), np.arange(min(k, values.shape[axis])), axis=axis)
    wanted = {"both": ("values", "indices"), "values": ("values",), "indices": ("indices",)}[str(ret_type)]
    for kind, tensor in zip(wanted, outputs, strict=True):
        _write(tensor, np.take_along_axis(values, order, axis=axis) if kind == "values" else order)


#: Packed-function name → numpy implementation with TVM's calling convention.
SORT_FUNCTIONS = {
    "tvm.contrib.sort.argsort": _argsort,
    "tvm.contrib.sort.sort": _sort,
    "tvm.contrib.sort.argsort_nms": _argsort_nms,
    "tvm.contrib.sort.topk": _topk,
}


def register_sort_functions() -> None:
    """Register each of :data:`SORT_FUNCTIONS` that nothing registered yet (idempotent; needs only ``tvm_ffi``)."""
    import tvm_ffi

    for name, function in SORT_FUNCTIONS.items():
        if tvm_ffi.get_global_func(name, allow_missing=True) is None:
            tvm_ffi.register_global_func(name, function)
