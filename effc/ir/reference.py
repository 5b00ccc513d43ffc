"""Reference execution with onnxruntime (CPU), including taps on intermediate values.

The reference is the unmodified (or canonicalized) model run by onnxruntime; every fidelity number in effc is
measured against it.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from effc.errors import DataError, EffcError

logger = logging.getLogger(__name__)

#: Element types onnxruntime's Python bindings cannot exchange (no numpy type they know; ml_dtypes arrays are
#: refused with "Numpy_type 256 can't be converted to MLDataType") → the type that holds every value exactly.
_WIDE_TYPES = {
    onnx.TensorProto.BFLOAT16: onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT8E4M3FN: onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT8E4M3FNUZ: onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT8E5M2: onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT8E5M2FNUZ: onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT8E8M0: onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT4E2M1: onnx.TensorProto.FLOAT, onnx.TensorProto.INT4: onnx.TensorProto.INT8,
    onnx.TensorProto.UINT4: onnx.TensorProto.UINT8, onnx.TensorProto.INT2: onnx.TensorProto.INT8,
    onnx.TensorProto.UINT2: onnx.TensorProto.UINT8,
}
_WIDE_SUFFIX = "__effc_wide"

#: onnxruntime's messages for index values outside a tensor (Gather*, Scatter*): the data's fault, not the model's.
_INDEX_OUT_OF_RANGE = ("out of range value in index", "out of data bounds", "out of bounds", "out of range")


def _widen_boundary(proto: onnx.ModelProto) -> dict[str, np.dtype]:
    """Let ``proto`` (changed in place) exchange narrow-typed graph inputs/outputs as :data:`_WIDE_TYPES` types.

    A narrow input ``x`` becomes the wide input ``x__effc_wide`` followed by ``Cast(to=narrow)`` producing ``x``; a
    narrow output ``y`` becomes ``Cast(to=wide)`` of ``y`` named ``y__effc_wide``. Both casts are exact (every
    narrow value is a wide value), so the model computes the same numbers.

    Returns:
        ``{original name: narrow numpy dtype (ml_dtypes)}`` for every widened input and output.
    """
    graph = proto.graph
    narrow: dict[str, np.dtype] = {}
    casts_in = []
    for value in graph.input:
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        if elem in _WIDE_TYPES:
            narrow[value.name] = onnx.helper.tensor_dtype_to_np_dtype(elem)
            casts_in.append(onnx.helper.make_node("Cast", [value.name + _WIDE_SUFFIX], [value.name], to=elem))
            value.name += _WIDE_SUFFIX
            value.type.tensor_type.elem_type = _WIDE_TYPES[elem]
    for value in graph.output:
        elem = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
        if elem in _WIDE_TYPES:
            narrow[value.name] = onnx.helper.tensor_dtype_to_np_dtype(elem)
            graph.node.append(onnx.helper.make_node("Cast", [value.name], [value.name + _WIDE_SUFFIX],
                                                    to=_WIDE_TYPES[elem]))
            value.name += _WIDE_SUFFIX
            value.type.tensor_type.elem_type = _WIDE_TYPES[elem]
    if casts_in:
        nodes = casts_in + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return narrow


class Reference:
    """An onnxruntime ``InferenceSession`` (CPU) built from an in-memory ``ir.Model``.

    Graph inputs and outputs of types onnxruntime's Python bindings cannot exchange (bfloat16, float8, int4, ...;
    :data:`_WIDE_TYPES`) are passed as float32 / int8 / uint8 through exact boundary casts, so feeds and results
    keep their ml_dtypes types.

    Args:
        model: the model; serialized once with ``ir.to_proto``; must be below the 2 GB protobuf limit.
        threads: ``intra_op_num_threads`` (1 = deterministic single-thread timings, the effc default).

    Raises:
        EffcError: onnxruntime refuses the model (the message carries its reason).
    """

    def __init__(self, model: ir.Model, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Basic level only: the extended/layout fusions rewrite weight-only int8 (QDQ) MatMuls into approximate
        # integer kernels (0.03 off on a digits MLP), and the reference must be the graph's exact semantics.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        proto = ir.to_proto(model)
        self._narrow = _widen_boundary(proto)
        try:
            self.session = ort.InferenceSession(proto.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Fail/InvalidGraph types
            hint = ("effc checks every compile against onnxruntime, which has no CPU kernel for this op and type: "
                    "use a type its kernels support (e.g. float32), or run the model elsewhere"
                    if "NOT_IMPLEMENTED" in str(err) else
                    "run onnx.checker on the model; a pass may have produced an invalid graph")
            raise EffcError(f"onnxruntime cannot load the model: {err}", hint) from err
        self.input_names = [i.name.removesuffix(_WIDE_SUFFIX) for i in self.session.get_inputs()]
        self.output_names = [o.name.removesuffix(_WIDE_SUFFIX) for o in self.session.get_outputs()]
        self._wide_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run once; returns the outputs in graph output order.

        Raises:
            DataError: a model input is missing from ``feeds``, or the feeds make the model compute indices out of
                range (onnxruntime refuses them).
            EffcError: onnxruntime fails while running (an op or dtype its CPU kernels lack, e.g. bfloat16 or
                float8 tensors; a run-time shape error): its reason is quoted.
        """
        missing = [name for name in self.input_names if name not in feeds]
        if missing:
            raise DataError(f"feeds lack model input(s) {missing}; got {sorted(feeds)}",
                            f"provide arrays for every input: {self.input_names}")
        wide = {self._wide_names[k]: self._widen(name, feeds[name]) for k, name in enumerate(self.input_names)}
        try:
            outputs = self.session.run(None, wide)
        except Exception as err:  # onnxruntime raises RuntimeError, its own Fail/InvalidArgument types, TypeError
            reason = str(err).strip().splitlines()[0][:400] if str(err).strip() else type(err).__name__
            if any(pattern in reason.lower() for pattern in _INDEX_OUT_OF_RANGE):
                raise DataError(f"onnxruntime refuses the input samples: an index the model computes from them lies "
                                f"outside a tensor: {reason}",
                                "pass real samples with --data (synthetic samples, used without it, can make the "
                                "model compute indices out of range)") from err
            raise EffcError(f"onnxruntime, the reference every result is checked against, cannot run the model: "
                            f"{reason}",
                            "effc cannot verify what it cannot run in onnxruntime: keep the model to ops and "
                            "dtypes onnxruntime's CPU kernels support (e.g. float32, not bfloat16/float8)") from err
        return [np.asarray(out).astype(self._narrow[name]) if name in self._narrow else out
                for name, out in zip(self.output_names, outputs, strict=True)]

    def _widen(self, name: str, feed: np.ndarray) -> np.ndarray:
        if name not in self._narrow:
            return feed
        elem = onnx.helper.np_dtype_to_tensor_dtype(self._narrow[name])
        return np.asarray(feed).astype(onnx.helper.tensor_dtype_to_np_dtype(_WIDE_TYPES[elem]))


def _all_values(model: ir.Model) -> dict[str, ir.Value]:
    values = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def with_taps(model: ir.Model, value_names: Iterable[str]) -> ir.Model:
    """Copy of ``model`` whose graph outputs are the original outputs followed by ``value_names``.

    Args:
        model: the model (unchanged); tapped values must be in the main graph and have a known dtype.
        value_names: names of node outputs or graph inputs to expose.

    Raises:
        EffcError: a name is not a value of the main graph (the message lists close candidates) or has no dtype.
    """
    value_names = list(value_names)
    proto = ir.to_proto(model)
    values = _all_values(model)
    if any(name in values and values[name].dtype is None for name in value_names):
        # values made by a pass may carry no type yet: ONNX shape inference fills it in (graph outputs need one)
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
            logger.debug("shape inference for taps failed: %s", err)
    copy = ir.from_proto(proto)
    values = _all_values(copy)
    present = {v.name for v in copy.graph.outputs}
    for name in value_names:
        if name not in values:
            close = difflib.get_close_matches(name, list(values), n=5, cutoff=0.3) or list(values)[:5]
            raise EffcError(f"no value named {name!r} in the main graph; close names: {close}",
                            "tap a node output of the main graph (see `effc inspect`)")
        value = values[name]
        if value.dtype is None:
            raise EffcError(f"value {name!r} has no known dtype", "canonicalize the model first (shape inference)")
        if name not in present and not value.is_graph_input():
            copy.graph.outputs.append(value)
            present.add(name)
    return copy


def run_with_taps(model: ir.Model, feeds_list: Sequence[Mapping[str, np.ndarray]],
                  value_names: Sequence[str], threads: int = 1) -> list[dict[str, np.ndarray]]:
    """Run ``model`` once per feed and return the named intermediate values.

    Args:
        model: the model (unchanged).
        feeds_list: one feed dict per run.
        value_names: main-graph value names (node outputs, graph inputs or outputs).
        threads: onnxruntime intra-op threads.

    Returns:
        One dict per feed, ``{name: array}`` for every requested name.

    Raises:
        EffcError: an unknown value name (close candidates listed).
        DataError: a feed lacks a model input.
    """
    names = list(dict.fromkeys(value_names))
    tapped = with_taps(model, names)
    ref = Reference(tapped, threads=threads)
    results = []
    for feeds in feeds_list:
        outputs = dict(zip(ref.output_names, ref.run(feeds), strict=True))
        results.append({name: outputs[name] if name in outputs else np.asarray(feeds[name]) for name in names})
    return results
