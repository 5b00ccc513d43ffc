"""Canonicalize a model for compilation: static input dims, constant configuration inputs, folding, LSTM unrolled.

The recipe is the one measured in ``shared/notes/import.md`` (it made 15 of 15 real models import into TVM 0.27):

1. drop initializers listed as graph inputs (old exporters), turn configuration inputs (Silero's ``sr``) into
   initializers, fix every input dimension (from the model or ``input_shapes``);
2. ``onnx.shape_inference.infer_shapes(data_prop=True)``;
3. onnxscript's constant folder with ``ConstantOfShape`` allowed to fold and large size limits (``CastLike``
   nodes become ``Cast`` first, keeping their attributes: ``effc.ir.cast_like``);
4. unroll LSTM (``effc.ir.lstm``), recursing into ``If``/``Loop`` bodies; replace reductions of empty tensors by
   their identity element (``effc.ir.empty_reduce``); expand ops TVM cannot import (ONNX ``Attention``) into
   their ONNX function bodies (``effc.ir.expand``); unroll ``Scan`` with a static length (``effc.ir.scan``);
   repeat 2-3 until nothing changes.

What was done is recorded in ``model.metadata_props["effc.canonicalize"]`` (JSON).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.optimizer import _constant_folding

from effc.errors import LoadError, ShapeError
from effc.ir.cast_like import cast_likes_to_casts
from effc.ir.empty_reduce import fold_empty_reductions
from effc.ir.expand import expand_function_ops
from effc.ir.lstm import unroll_lstms
from effc.ir.scan import unroll_scans

logger = logging.getLogger(__name__)

#: Folding limits in elements (the notes: input 2^24, output 2^26).
FOLD_INPUT_LIMIT = 2**24
FOLD_OUTPUT_LIMIT = 2**26
MAX_ROUNDS = 3
FOLD_STEPS = 4
_SHAPE_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\d+(?:\s*x\s*\d+)*)\s*$")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``"name=1x3x48x192"`` into ``("name", (1, 3, 48, 192))``.

    Raises:
        ShapeError: the text is not ``name=DxDx...`` with positive integer dims.
    """
    match = _SHAPE_RE.match(text)
    dims = tuple(int(d) for d in match.group(2).split("x")) if match else ()
    if not match or any(d <= 0 for d in dims):
        raise ShapeError(f"cannot parse input shape {text!r}",
                         "write NAME=D1xD2x... with positive integers, e.g. --input-shape x=1x3x48x192")
    return match.group(1), dims


def _dims_text(value: ir.Value) -> str:
    if value.shape is None:
        return "unknown rank"
    return "x".join(str(d) if isinstance(d, int) and d >= 0 else f"?{'' if not str(d) or str(d) == '?' else str(d)}"
                    for d in value.shape)


def _example_shape(value: ir.Value, wanted: Sequence[int] = ()) -> str:
    """A valid ``--input-shape`` text for ``value``: its fixed dims, else the dim in ``wanted``, else 1."""
    dims = []
    for i, d in enumerate(value.shape if value.shape is not None else [1]):
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        else:
            dims.append(wanted[i] if i < len(wanted) else 1)
    return f"{value.name}={'x'.join(map(str, dims))}"


def _is_static(value: ir.Value) -> bool:
    return value.shape is not None and all(isinstance(d, int) and d >= 0 for d in value.shape)


def _fix_inputs(model: ir.Model, input_shapes: Mapping[str, Sequence[int]],
                constant_inputs: Mapping[str, np.ndarray]) -> dict:
    graph = model.graph
    dropped = [v.name for v in graph.inputs if v.is_initializer()]
    for name in dropped:
        graph.inputs.remove(graph.initializers[name])
    by_name = {v.name: v for v in graph.inputs}
    # Idempotent: a constant input made an initializer by an earlier canonicalize is simply kept.
    done = json.loads(model.metadata_props.get("effc.canonicalize", "{}")).get("constant_inputs", [])
    constant_inputs = {k: v for k, v in constant_inputs.items()
                       if k in by_name or (k not in graph.initializers and k not in done)}
    for name in list(constant_inputs) + list(input_shapes):
        if name not in by_name:
            raise ShapeError(f"model has no input named {name!r}; its inputs are {sorted(by_name)}",
                             "use one of the listed names in --input-shape / constant inputs")
    for name, array in constant_inputs.items():
        value = by_name.pop(name)
        np_dtype = value.dtype.numpy() if value.dtype is not None else None
        arr = np.asarray(array, dtype=np_dtype)
        if value.shape is not None and len(value.shape) != arr.ndim:
            raise ShapeError(f"constant input {name!r} has rank {arr.ndim}, the model expects {_dims_text(value)}",
                             f"give {name!r} a value of rank {len(value.shape)}")
        graph.inputs.remove(value)
        value.const_value = ir.tensor(arr, name=name)
        value.shape = ir.Shape(arr.shape)
        graph.register_initializer(value)
    for name, dims in input_shapes.items():
        value = by_name[name]
        dims = tuple(int(d) for d in dims)
        if value.shape is not None and len(value.shape) != len(dims):
            raise ShapeError(f"input {name!r} has rank {len(value.shape)} ({_dims_text(value)}), got shape {dims}",
                             f"give {len(value.shape)} dims, e.g. --input-shape {_example_shape(value)}")
        for have, want in zip(value.shape or (), dims, strict=False):
            if isinstance(have, int) and have >= 0 and have != want:
                raise ShapeError(f"input {name!r} has fixed dims {_dims_text(value)}, cannot set {dims}",
                                 f"keep the fixed dims: --input-shape {_example_shape(value, dims)}")
        value.shape = ir.Shape(dims)
    unknown = [v for v in graph.inputs if not _is_static(v)]
    if unknown:
        listed = ", ".join(f"{v.name} ({_dims_text(v)})" for v in unknown)
        example = _example_shape(unknown[0])
        raise ShapeError(f"input(s) with unknown dims: {listed}",
                         f"give a deployment shape for each, e.g. --input-shape {example} (like name=1x3x48x192)")
    return {"dropped_initializer_inputs": len(dropped), "constant_inputs": sorted({*constant_inputs, *done}),
            "input_shapes": {v.name: list(v.shape) for v in graph.inputs}}


def _infer_shapes(model: ir.Model) -> ir.Model:
    """Clear stale intermediate shapes, run ONNX shape inference with data propagation, return the new model."""
    for graph in model.graphs():
        for node in graph:
            for out in node.outputs:
                out.shape = None
    for out in model.graph.outputs:
        out.shape = None
    _branch_constants(model)
    proto = ir.to_proto(model)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
        logger.warning("ONNX shape inference failed (%s); continuing with node-level inference only", err)
    return ir.from_proto(proto)


def _branch_constants(model: ir.Model) -> None:
    """Give each subgraph (an ``If`` branch) ``Constant`` copies of the small integer initializers it reads.

    The copies are of main-graph initializers (axes, shapes) read by the subgraph's nodes.

    ONNX shape inference does not see the values of outer-scope initializers inside a subgraph, so a ``ReduceMean``
    whose axes come from the main graph leaves every shape after it unknown, the ``If``'s outputs and all that
    follows included (``layer-skip(mode=adaptive)``'s branches). The folder lifts them back; this runs before each
    inference.
    """
    for graph in model.graphs():
        if graph is model.graph:
            continue
        local: dict[int, ir.Node] = {}
        for node in list(graph):
            for i, value in enumerate(node.inputs):
                tensor = value.const_value if value is not None and value.is_initializer() else None
                if (tensor is None or value.graph is graph or tensor.size > 64
                        or tensor.dtype not in (ir.DataType.INT64, ir.DataType.INT32)):
                    continue
                if id(value) not in local:
                    local[id(value)] = ir.node("Constant", [], attributes={"value": ir.tensor(tensor.numpy())},
                                               name=f"{graph.name}_{value.name}_local")
                    local[id(value)].outputs[0].name = f"{graph.name}_{value.name}_local"
                node.replace_input_with(i, local[id(value)].outputs[0])
        if local:
            graph.insert_before(graph[0], list(local.values()))


def _should_fold(node: ir.Node) -> bool | None:
    return True if node.op_type == "ConstantOfShape" else None


def _fold(model: ir.Model) -> None:
    """``onnxscript.optimizer.optimize_ir`` without its pattern rewriter (slow, and not needed for static shapes).

    Constant folding (ConstantOfShape allowed, large limits) and dead-node removal iterate to a fixed point, then
    constants are lifted to initializers and deduplicated. Model-local functions are inlined unless they are effc
    operators (those must survive as functions).
    """
    common = ir.passes.common
    steps = []
    if model.functions and not any(key[0] == "effc" for key in model.functions):
        steps.append(common.InlinePass())
    steps += [
        ir.passes.PassManager(
            [_constant_folding.FoldConstantsPass(shape_inference=True, input_size_limit=FOLD_INPUT_LIMIT,
                                                 output_size_limit=FOLD_OUTPUT_LIMIT, should_fold=_should_fold),
             common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass()],
            steps=FOLD_STEPS, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    ]
    ir.passes.Sequential(*steps)(model)
    _constants_as_tensors(model)


#: Constant's attribute forms other than ``value`` → numpy dtype (TVM's importer reads only ``value``).
_CONSTANT_FORMS = {"value_int": np.int64, "value_ints": np.int64, "value_float": np.float32,
                   "value_floats": np.float32}


def _constants_as_tensors(model: ir.Model) -> None:
    """Rewrite ``Constant`` nodes given as ``value_int(s)`` / ``value_float(s)`` to the ``value`` tensor form.

    The folder leaves such a node where a graph output is a constant (``Shape`` of a static input), and TVM's
    importer fails on it with "no value in Constant".
    """
    for graph in model.graphs():
        for node in graph:
            form = next((k for k in _CONSTANT_FORMS if k in node.attributes), None)
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or form is None:
                continue
            array = np.array(node.attributes[form].value, dtype=_CONSTANT_FORMS[form])
            del node.attributes[form]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))


def _count_nodes(model: ir.Model) -> int:
    return sum(len(g) for g in model.graphs())


def _sort_nodes(model: ir.Model) -> None:
    """Put the nodes (subgraphs included) in topological order, which ONNX requires but some tools do not write.

    Raises:
        LoadError: the graph has a cycle (no order exists).
    """
    try:
        model.graph.sort()
    except ValueError as exc:
        raise LoadError(f"the graph has a cycle, so its nodes have no topological order: {exc}",
                        "re-export the model; ONNX graphs must be acyclic (onnx.checker.check_model finds it)") from exc


def canonicalize(model: ir.Model, input_shapes: Mapping[str, Sequence[int]] | None = None,
                 constant_inputs: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """Return a canonical copy of ``model``: every main-graph value has a static shape, constants folded.

    Args:
        model: the model (left unchanged, except that tensors still in external files are read into memory).
        input_shapes: deployment shape per input name for dims the model leaves symbolic, e.g.
            ``{"x": (1, 3, 48, 192)}`` (parse CLI text with :func:`parse_input_shape`).
        constant_inputs: inputs that are configuration, not data (Silero's ``sr``): name -> value; they become
            initializers and disappear from the graph inputs.

    Returns:
        A new ``ir.Model`` that onnxruntime runs with the same numbers (within float rounding of folded
        constants), with LSTM nodes unrolled; ``metadata_props["effc.canonicalize"]`` records what was done.

    Raises:
        ShapeError: an input keeps unknown dims (message lists them and the ``--input-shape`` fix), a name in
            ``input_shapes``/``constant_inputs`` is not an input, or a given shape has the wrong rank.
    """
    ir.external_data.load_to_model(model)  # lazy external tensors would lose their base folder in the copy
    work = ir.from_proto(ir.to_proto(model))
    _sort_nodes(work)
    record = _fix_inputs(work, dict(input_shapes or {}), dict(constant_inputs or {}))
    nodes_before = _count_nodes(work)
    lstms = 0
    for round_index in range(MAX_ROUNDS):
        before = _count_nodes(work)
        work = _infer_shapes(work)
        cast_likes_to_casts(work)  # before the folder, which drops CastLike's saturate / round_mode
        _fold(work)
        work = _infer_shapes(work)
        work, expanded = expand_function_ops(work)
        work, scans = unroll_scans(work)
        unrolled = unroll_lstms(work)
        emptied = fold_empty_reductions(work)
        lstms += unrolled
        logger.debug("canonicalize round %d: %d -> %d nodes, %d LSTM unrolled", round_index, before,
                     _count_nodes(work), unrolled)
        if not (unrolled or emptied or expanded or scans):  # optimize_ir already iterated folding to a fixed point
            break
    dynamic = [v.name for node in work.graph for v in node.outputs if not _is_static(v)]
    if dynamic:
        logger.warning("canonicalize: %d value(s) keep a dynamic shape, first %r", len(dynamic), dynamic[0])
    record.update(nodes_before=nodes_before, nodes_after=_count_nodes(work), lstm_unrolled=lstms,
                  dynamic_values=len(dynamic))
    work.metadata_props["effc.canonicalize"] = json.dumps(record, sort_keys=True)
    return work
