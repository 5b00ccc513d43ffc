"""The run-time range check of index inputs: out-of-range indices raise a DataError before the kernel runs.

The manifest lists, per integer input, the index operands it reaches (``index_checks``, written by
:func:`effc.ir.index_inputs.index_checks` at compile time). Compiled index kernels do not check bounds, so a value
outside ``[-size, size)`` would read or write outside a tensor (garbage or SIGSEGV); onnxruntime raises instead.
The check is two reductions (min, max) over the input per listed operand: about 1 µs per 1000 int64 indices, far
below any model's run time (see docs/BENCHMARKS.md). ``effc.runtime.load(..., check_indices=False)`` and
``effc run --no-check-indices`` skip it for inputs known to be valid.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from effc.errors import DataError

__all__ = ["GUARD_FUNCTION", "MARKER", "check_feeds", "check_index_input", "checks_of", "guard_error",
           "register_guard_function"]

#: Prefix of the message of the in-graph index checks (:mod:`effc.codegen.index_guard`) in a TVM error.
MARKER = "effc-index-check:"
#: The packed function a compiled model calls before each computed index operand is used: ``(ok, message)``.
GUARD_FUNCTION = "effc.index_guard"

#: Ops whose index inputs are usually token ids into an embedding table.
_TOKEN_HINT = {op: " (token ids: a tokenizer with the model's own vocabulary)" for op in ("Gather", "BlockQuantGather")}


def checks_of(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The index checks of one manifest input spec (``index_checks``, or a legacy ``index_range: [low, high]``)."""
    checks = list(spec.get("index_checks") or [])
    if "index_range" in spec:  # artifacts compiled before index_checks: token ids into a Gather table
        low, high = spec["index_range"]
        checks.append({"op": "Gather", "node": "", "axes": [0], "low": [low], "high": [high], "per_coordinate": False})
    return checks


def _first_bad(array: np.ndarray, low: np.ndarray, high: np.ndarray) -> tuple[tuple[int, ...], int, int] | None:
    """Position, coordinate and value of the first element outside ``[low, high)`` (broadcast on the last axis)."""
    if array.min() >= low.max() and array.max() < high.min():
        return None  # the common case: two reductions, no temporaries
    bad = (array < low) | (array >= high)
    if not bad.any():
        return None
    flat = int(np.argmax(bad.reshape(-1)))
    position = tuple(int(i) for i in np.unravel_index(flat, array.shape))
    coordinate = position[-1] if low.size > 1 else 0
    return position, coordinate, int(array[position])


def check_index_input(name: str, array: np.ndarray, checks: Sequence[Mapping[str, Any]]) -> None:
    """Raise when ``array`` (the input ``name``) holds a value outside the range of an index operand it reaches.

    Args:
        name: the input's name (for the message).
        array: its value, already of the manifest's shape and an integer dtype.
        checks: the input's ``index_checks`` from the manifest (:func:`checks_of`).

    Raises:
        DataError: the first out-of-range value: names the input, the position, the value, the operand (op, node,
            data axis and its size) and the valid range.
    """
    if not array.size:
        return
    for check in checks:
        low, high = np.asarray(check["low"], dtype=np.int64), np.asarray(check["high"], dtype=np.int64)
        found = _first_bad(array, low, high)
        if found is None:
            continue
        position, j, value = found
        node = f" {check['node']!r}" if check.get("node") else ""
        axis = check["axes"][j] if check.get("per_coordinate") else check["axes"][0]
        where = f"coordinate {j} of " if check.get("per_coordinate") else ""
        raise DataError(
            f"input {name!r} holds {value} at {list(position)}, outside the valid range {low[j]}..{high[j] - 1}: it "
            f"is {where}an index of {check['op']}{node} into axis {axis} of size {high[j]} (negative values count "
            "from the end; a value out of range would make the compiled code access memory out of bounds)",
            f"give {name!r} values in {low[j]}..{high[j] - 1}" + _TOKEN_HINT.get(check["op"], ""),
        )


def check_feeds(feeds: Sequence[Mapping[str, np.ndarray]], specs: Sequence[Mapping[str, Any]], where: str) -> None:
    """Check the index inputs of every sample of user data (``--data``) before anything runs on it.

    Args:
        feeds: one dict input name -> array per sample (already conformed to the model's shapes and dtypes).
        specs: the model's input specs with their ``index_checks`` (``effc.ir.model.io_signature(model)["inputs"]``).
        where: how the message names the data, e.g. ``"--data samples.npz"``.

    Raises:
        DataError: the first out-of-range value, prefixed with ``where`` and the sample number.
    """
    indexed = [(spec["name"], checks_of(spec)) for spec in specs if checks_of(spec)]
    for index, feed in enumerate(feeds):
        for name, checks in indexed:
            try:
                check_index_input(name, np.asarray(feed[name]), checks)
            except DataError as exc:
                raise DataError(f"{where}: sample {index}: {exc.message}", exc.hint) from None


def guard_error(exc: BaseException) -> DataError | None:
    """The :class:`DataError` for a run-time failure of an in-graph index check, None for any other failure.

    Indices computed in the model (``Add(idx, 1)``, ``Cast(float -> int64)``) are checked by the compiled code
    itself (:mod:`effc.codegen.index_guard`): its assertion names the op, the node and the valid range.
    """
    text = str(exc)
    start = text.find(MARKER)
    if start < 0:
        return None
    message = text[start + len(MARKER):].strip().splitlines()[0]
    return DataError(message, "give the model inputs from which it computes in-range indices (the data the model "
                              "expects); onnxruntime rejects these inputs too")


def _index_guard(ok: Any, message: str) -> None:
    """Nothing when ``ok`` (a bool scalar tensor, on any device) holds, else raise ``message``."""
    import tvm_ffi

    flag = np.zeros((), dtype=np.bool_)
    tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")(ok, ctypes.c_void_p(flag.ctypes.data), flag.nbytes)
    if not bool(flag):
        raise IndexError(message)


def register_guard_function() -> None:
    """Register :data:`GUARD_FUNCTION` with the TVM FFI (idempotent; needs ``tvm_ffi``, not the TVM compiler)."""
    import tvm_ffi

    if tvm_ffi.get_global_func(GUARD_FUNCTION, allow_missing=True) is None:
        tvm_ffi.register_global_func(GUARD_FUNCTION, _index_guard)
