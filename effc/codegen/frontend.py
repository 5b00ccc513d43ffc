"""ONNX IR → TVM Relax: the one module that touches TVM's ONNX frontend.

TVM 0.27's ``from_onnx`` looks every node up by ``op_type`` alone in the table that
``tvm.relax.frontend.onnx.onnx_frontend._get_convert_map()`` rebuilds on each call (domains ignored, model-local
functions not inlined). effc operators (domain ``effc``) enter through converters registered with
:func:`register_converter`; during :func:`to_relax` their nodes are renamed to ``effc.<op_type>`` in a private
copy of the graph and the convert map is extended with those names, then restored (see shared/notes/lowering.md).

Before converting anything, :func:`check_importable` checks every node — including the bodies of ``If``/``Loop``/
``Scan`` — and raises one error listing all unsupported operators (TVM's own pre-check skips subgraphs).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import tvm
from tvm.relax.frontend.onnx import onnx_frontend as _tvm_onnx

from effc.codegen.tvm_output import tvm_output_to_log
from effc.errors import TargetError, UnsupportedOpError
from effc.ops.base import EFFC_DOMAIN

logger = logging.getLogger(__name__)

# Ops the TVM importer handles itself rather than through the convert map.
_DIRECT_OPS = frozenset({"If", "Constant"})
# effc nodes are imported under this op_type prefix (TVM matches op_type only, so effc names could clash).
_EFFC_PREFIX = "effc."

_EFFC_CONVERTERS: dict[str, type] = {}
#: TVM target kind (``cuda``) → effc op_type → a converter that replaces the default one while a target of that kind
#: is in scope (``with tvm_target: to_relax(model)``): e.g. GPU lowerings whose kernels DLight schedules.
_TARGET_CONVERTERS: dict[str, dict[str, type]] = {}


def register_converter(op_type: str, domain: str = EFFC_DOMAIN, target: str | None = None) -> Callable[[type], type]:
    """Register a TVM converter for an effc operator (active only during :func:`to_relax`).

    The decorated class follows TVM's ``OnnxOpConverter`` protocol: classmethods ``_impl_vN(cls, bb, inputs, attr,
    params)`` returning a Relax expression built with the BlockBuilder ``bb`` (e.g. ``relax.call_tir`` of an effc
    PrimFunc). ``N`` is matched against the model's default-domain opset; a single ``_impl_v1`` always applies.

    Args:
        op_type: the effc operator name, e.g. ``"NMSparseMatMul"``.
        domain: must be ``"effc"`` (standard ops are TVM's business).
        target: a TVM target kind (``"cuda"``): the converter applies only while a target of that kind is in scope,
            in place of the default one; None: the default converter.

    Returns:
        A class decorator that registers the class and returns it unchanged.

    Raises:
        ValueError: ``domain`` is not ``effc``, or the class has no ``_impl_vN`` method.
    """
    if domain != EFFC_DOMAIN:
        raise ValueError(f"effc converters must be registered for domain {EFFC_DOMAIN!r}, got {domain!r}")

    def decorate(cls: type) -> type:
        if not any(name.startswith("_impl_v") for name in dir(cls)):
            raise ValueError(f"converter {cls.__name__} for effc.{op_type} defines no _impl_vN method")
        table = _EFFC_CONVERTERS if target is None else _TARGET_CONVERTERS.setdefault(target, {})
        if op_type in table and table[op_type] is not cls:
            logger.warning("converter for effc.%s replaced by %s", op_type, cls.__name__)
        table[op_type] = cls
        return cls

    return decorate


def constant_input(expr: Any, params: dict | None, what: str) -> np.ndarray:
    """The numpy value of a converter input that must be a constant (a Relax constant or a named param).

    Args:
        expr: the Relax expression TVM's frontend passed for the input.
        params: the converter's ``params`` (initializers TVM kept as parameters), or None.
        what: the operator and input for the error, e.g. ``"NMSparseMatMul values"``.

    Raises:
        TypeError: the input is computed at run time (effc's kernels pre-pack these inputs at compile time).
    """
    value = getattr(expr, "value", None) or getattr(expr, "data", None)
    if value is not None and hasattr(value, "numpy"):
        return value.numpy()
    name = getattr(expr, "name_hint", None)
    if params and name in params:
        return params[name].numpy() if hasattr(params[name], "numpy") else np.asarray(params[name])
    raise TypeError(f"{what} must be constant (initializers)")


def _load_builtin_converters() -> None:
    """Import ``effc.codegen.ops`` and the GPU lowerings so every built-in converter is registered (idempotent)."""
    import effc.codegen.cuda.ops  # noqa: F401  (registration side effect)
    import effc.codegen.ops  # noqa: F401


def registered_converters(target: str | None = None) -> dict[str, type]:
    """The registered converters, ``{effc op_type: converter class}`` (a copy).

    Args:
        target: a TVM target kind: the converters in effect for it (its own over the defaults); None: the defaults.
    """
    _load_builtin_converters()
    return {**_EFFC_CONVERTERS, **_TARGET_CONVERTERS.get(target or "", {})}


def _target_kind() -> str | None:
    """The kind of the TVM target in scope (``llvm``, ``cuda``, ...), or None."""
    current = tvm.target.Target.current(allow_none=True)
    return str(current.kind.name) if current is not None else None


def _tvm_supported_op_types() -> frozenset[str]:
    return frozenset(_tvm_onnx._get_convert_map()) | _DIRECT_OPS


def _node_label(node: ir.Node) -> str:
    if node.name:
        return node.name
    outputs = [v.name for v in node.outputs if v is not None and v.name]
    return f"<{node.op_type} producing {outputs[0]}>" if outputs else f"<unnamed {node.op_type}>"


def unsupported_ops(model: ir.Model) -> dict[str, list[str]]:
    """Operators that neither TVM's ONNX frontend nor an effc converter can import.

    Every node is checked, including those inside ``If``/``Loop``/``Scan`` bodies. Nodes calling a model-local
    function outside the ``effc`` domain are reported too (TVM does not inline functions).

    Args:
        model: the model to check (not modified).

    Returns:
        ``{op_type: [node names]}`` (key ``"domain::op_type"`` for non-standard domains), empty when all import.
    """
    _load_builtin_converters()
    tvm_ops = _tvm_supported_op_types()
    missing: dict[str, list[str]] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        domain = node.domain or ""
        if domain == EFFC_DOMAIN:
            supported = node.op_type in _EFFC_CONVERTERS
        elif domain not in ("", "ai.onnx") and (domain, node.op_type, node.overload) in model.functions:
            supported = False
        else:
            supported = node.op_type in tvm_ops
        if not supported:
            key = node.op_type if domain in ("", "ai.onnx") else f"{domain}::{node.op_type}"
            missing.setdefault(key, []).append(_node_label(node))
    return missing


def check_importable(model: ir.Model) -> None:
    """Raise if any operator of ``model`` (subgraphs included) cannot be imported.

    Raises:
        UnsupportedOpError: lists every unsupported operator type with example node names.
        TargetError: a graph input or output is not a tensor an artifact can take or return
            (:func:`check_io_types`).
    """
    missing = unsupported_ops(model)
    if missing:
        raise UnsupportedOpError(missing)
    check_io_types(model)


#: Element types an artifact cannot take or return: TVM's runtime packs sub-byte types 2 (4) per byte where numpy
#: (ml_dtypes) uses a byte each, and has no string tensors. Type → what the user can do instead.
_IO_TYPES = {
    **{t: f"pass it as {wide} and Cast inside the model" for t, wide in (
        (ir.DataType.INT4, "int8"), (ir.DataType.UINT4, "uint8"), (ir.DataType.INT2, "int8"),
        (ir.DataType.UINT2, "uint8"), (ir.DataType.FLOAT4E2M1, "float32"))},
    ir.DataType.STRING: "turn the strings into numbers (e.g. token ids) before the model",
}


def _users_label(value: ir.Value) -> str:
    """``"Cast node 'n'"``: the node making ``value`` (a graph output) or its first user (a graph input)."""
    node = value.producer()
    if node is None:
        users = [use.node for use in value.uses()]
        node = users[0] if users else None
    return f"{node.op_type} node '{_node_label(node)}'" if node is not None else "no node"


def check_io_types(model: ir.Model) -> None:
    """Raise if a graph input or output is not a tensor an artifact can take or return.

    Raises:
        TargetError: a sequence / optional, a string tensor or a sub-byte tensor (int4, uint4, int2, uint2,
            float4e2m1) at the graph boundary; the message names the value and the op that reads or makes it.
    """
    for value in [*model.graph.inputs, *model.graph.outputs]:
        role = "input" if value in model.graph.inputs else "output"
        where = f"graph {role} {value.name!r} (of {_users_label(value)})"
        if value.type is not None and not isinstance(value.type, ir.TensorType):
            raise TargetError(f"{where} is a sequence or optional, not a tensor",
                              "effc artifacts take and return tensors: make the model output a tensor "
                              "(e.g. ConcatFromSequence) or run it with onnxruntime")
        dtype = value.dtype
        if dtype in _IO_TYPES:
            raise TargetError(f"{where} has element type {dtype.name}, which an effc artifact cannot take or return "
                              "(TVM's runtime stores sub-byte types packed, strings not at all)",
                              f"{_IO_TYPES[dtype]}, or run it with onnxruntime")


def _rename_effc_nodes(graph: onnx.GraphProto) -> None:
    """Give effc-domain nodes (subgraphs included) the op_type ``effc.<op>`` so they cannot clash with TVM's."""
    for node in graph.node:
        if node.domain == EFFC_DOMAIN:
            node.op_type = _EFFC_PREFIX + node.op_type
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_effc_nodes(attr.g)
            for sub in attr.graphs:
                _rename_effc_nodes(sub)


class _NodeConversionError(Exception):
    """A converter failed; carries the op and node so the caller can name them."""

    def __init__(self, op_name: str, node_name: str, cause: BaseException):
        super().__init__(f"{op_name} {node_name}: {cause}")
        self.op_name, self.node_name, self.cause = op_name, node_name, cause


def _as_tvm_converter(cls: type) -> type:
    """``cls`` with TVM's ``OnnxOpConverter.get_converter`` (opset → ``_impl_vN``) mixed in when it lacks it."""
    if issubclass(cls, _tvm_onnx.OnnxOpConverter):
        return cls
    return type(cls.__name__, (cls, _tvm_onnx.OnnxOpConverter), {})


@contextlib.contextmanager
def _effc_converters_active(keep_tvm: frozenset[str] = frozenset(), index_guards: bool = True) -> Iterator[None]:
    """Extend TVM's convert map (effc converters, effc's fixes of standard ops), name failing nodes; then restore.

    The standard-op fixes are :data:`effc.codegen.std_ops.STANDARD_OVERRIDES`, less the op types in ``keep_tvm``;
    the index range checks :data:`effc.codegen.index_guard.INDEX_GUARDS`.
    """
    _load_builtin_converters()
    original_map = _tvm_onnx._get_convert_map
    importer = _tvm_onnx.ONNXGraphImporter
    original_convert = importer._convert_operator
    import effc.codegen.std_nan  # noqa: F401  (registers its converters in STANDARD_OVERRIDES)
    from effc.codegen.index_guard import INDEX_GUARDS
    from effc.codegen.std_ops import STANDARD_OVERRIDES

    converters = registered_converters(_target_kind())
    extra = {_EFFC_PREFIX + op: _as_tvm_converter(cls) for op, cls in converters.items()}
    # standard ops TVM lowers wrongly: effc's own converters
    extra.update({op: cls for op, cls in STANDARD_OVERRIDES.items() if op not in keep_tvm})
    if index_guards:
        extra.update(INDEX_GUARDS)  # gathers/scatters refuse out-of-range computed indices at run time

    def extended_map() -> dict[str, Any]:
        table = original_map()
        table.update(extra)
        return table

    def convert_naming_node(self, op_name, inputs, attrs, opset):
        try:
            return original_convert(self, op_name, inputs, attrs, opset)
        except _NodeConversionError:
            raise
        except Exception as exc:  # noqa: BLE001  (any converter failure is reported with its node)
            node_name = (attrs.get("tvm_custom") or {}).get("name", "?")
            raise _NodeConversionError(op_name, str(node_name), exc) from exc

    _tvm_onnx._get_convert_map = extended_map
    importer._convert_operator = convert_naming_node
    try:
        yield
    finally:
        _tvm_onnx._get_convert_map = original_map
        importer._convert_operator = original_convert


def to_relax(model: ir.Model, *, keep_tvm: frozenset[str] = frozenset(), index_guards: bool = True) -> tvm.IRModule:
    """Import a canonical (static-shape, constant-folded) model into a Relax module with function ``main``.

    ``main``'s parameters follow the graph inputs' order; weights become constants.

    Args:
        model: the model (not modified), canonicalized by :func:`effc.ir.canonicalize.canonicalize`.
        keep_tvm: standard op types for which TVM's own converter is used instead of effc's fix in
            :data:`effc.codegen.std_ops.STANDARD_OVERRIDES` (a target that accepts the documented difference).
        index_guards: insert the in-graph range checks of computed indices
            (:data:`effc.codegen.index_guard.INDEX_GUARDS`); they call a function of effc's runtime, so targets
            without it (plain C for microcontrollers) turn them off.

    Returns:
        The Relax ``IRModule``.

    Raises:
        UnsupportedOpError: an operator has no converter (all are listed), or a converter rejected a node
            as not implemented.
        TargetError: a converter failed on a node (message names the op and node, with TVM's reason).
    """
    check_importable(model)
    logs = _lowering_logs()
    marks = [len(log) for log in logs]
    proto = ir.to_proto(model)
    _rename_effc_nodes(proto.graph)
    captured = io.StringIO()
    try:
        converters = _effc_converters_active(keep_tvm, index_guards)
        with converters, warnings.catch_warnings(), contextlib.redirect_stdout(captured), tvm_output_to_log():
            warnings.simplefilter("ignore")
            mod = _tvm_onnx.from_onnx(proto)
    except _NodeConversionError as exc:
        op = exc.op_name.removeprefix(_EFFC_PREFIX)
        if isinstance(exc.cause, NotImplementedError | tvm.error.OpNotImplemented):
            raise UnsupportedOpError({op: [exc.node_name]}, hint=f"TVM said: {str(exc.cause)[:300]}") from exc
        raise TargetError(
            f"TVM's ONNX frontend failed on {op} node {exc.node_name!r}: {type(exc.cause).__name__}: "
            f"{str(exc.cause)[:400]}",
            "canonicalize the model first (static input shapes, constant folding), or rewrite this node",
        ) from exc
    except Exception as exc:  # noqa: BLE001  (never let a TVM traceback escape)
        raise TargetError(
            f"TVM's ONNX frontend failed: {type(exc).__name__}: {str(exc)[:400]}",
            "canonicalize the model first (static input shapes, constant folding)",
        ) from exc
    if captured.getvalue():
        logger.debug("TVM ONNX frontend output: %s", captured.getvalue()[:2000])
    _LAST_LOWERING[:] = [entry for log, mark in zip(logs, marks, strict=True) for entry in log[mark:]]
    if any(node.op_type == "If" for node in proto.graph.node):
        from effc.codegen.branch_sink import sink_into_branches

        mod, moved = sink_into_branches(mod)  # TVM's frontend computes both branches of an If; run the taken one
        mod = tvm.relax.transform.ConvertToDataflow()(mod)  # its graph has no dataflow block: nothing would fuse
        logger.debug("moved %d binding(s) into If branches", moved)
    if index_guards:
        # a module with guards calls effc.index_guard when it runs: make it callable in the process that built it
        # too (a plain relax.VirtualMachine, not only effc's runners, which register it when they load an artifact)
        from effc.runtime.index_check import register_guard_function

        register_guard_function()
    return mod


_LAST_LOWERING: list[dict] = []


def _lowering_logs() -> list[list[dict]]:
    """The ``LOWERING_LOG`` lists of the effc-operator modules (each converter appends what it chose and why)."""
    import sys

    _load_builtin_converters()
    return [
        module.LOWERING_LOG
        for name, module in sorted(sys.modules.items())
        if name.startswith("effc.codegen.ops.") and isinstance(getattr(module, "LOWERING_LOG", None), list)
    ]


def last_lowering_log() -> list[dict]:
    """What the effc-operator converters chose in the most recent :func:`to_relax` call.

    Returns:
        One dict per lowered effc node (e.g. packed vs dense N:M, with the measured reason); a copy, empty when
        the model had no effc operators.
    """
    return [dict(entry) for entry in _LAST_LOWERING]
