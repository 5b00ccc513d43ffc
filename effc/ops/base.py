"""effc operators: ``effc``-domain nodes whose reference body is an ONNX model-local function; their registry.

An effc operator (``effc.NMSparseMatMul``, ``effc.BlockQuantMatMul``, ``effc.MoEFFN``, ...) is a node with
``domain="effc"``. Its semantics are given by an ``ir.Function`` of standard ONNX ops attached to the model
(``model.functions``), so onnxruntime — which inlines model-local functions — runs the rewritten model unchanged.
TVM lowers the same node to a dedicated kernel through a converter registered in ``effc.codegen``; a test per
operator keeps the two equal, and equal to the operator's numpy reference.

Every operator registers an :class:`OpSpec` (:func:`register_op`): ``effc.eval`` finds its MAC counter and, for
operators that store a weight in fewer elements than it stands for, its :class:`PackedWeight` reader here, keyed by
op type; the tests find its numpy reference.

Source: ONNX IR spec, "Functions" (model-local functions, opset_import of the function's domain).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

EFFC_DOMAIN = "effc"
EFFC_OPSET_VERSION = 1


def add_function(model: ir.Model, function: ir.Function) -> ir.Function:
    """Attach ``function`` to ``model`` (once) and import the ``effc`` opset.

    Args:
        model: the model to extend, modified in place.
        function: a function with ``domain == "effc"``; when the model already holds a function with the same
            identifier it is kept and returned instead (bodies of one operator name must be identical).

    Returns:
        The function now attached to the model under ``function.identifier()``.

    Raises:
        ValueError: the function is not in the ``effc`` domain.
    """
    if function.domain != EFFC_DOMAIN:
        raise ValueError(f"effc operator functions must be in domain {EFFC_DOMAIN!r}, got {function.domain!r}")
    key = function.identifier()
    if key not in model.functions:
        model.functions[key] = function
    model.opset_imports.setdefault(EFFC_DOMAIN, EFFC_OPSET_VERSION)
    model.graph.opset_imports.setdefault(EFFC_DOMAIN, EFFC_OPSET_VERSION)
    return model.functions[key]


def effc_nodes(model: ir.Model, op_type: str | None = None) -> list[ir.Node]:
    """Nodes of the main graph in the ``effc`` domain (optionally only those of one ``op_type``)."""
    return [
        node
        for node in model.graph
        if node.domain == EFFC_DOMAIN and (op_type is None or node.op_type == op_type)
    ]


def remove_unused_functions(model: ir.Model) -> int:
    """Drop effc functions that no node of the main graph calls any more; returns how many were removed."""
    used = {(n.domain, n.op_type, n.overload) for n in model.graph}
    unused = [key for key in model.functions if key[0] == EFFC_DOMAIN and key not in used]
    for key in unused:
        del model.functions[key]
    return len(unused)


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """One packed weight tensor and the dense weight it stands for.

    Attributes:
        node: name of the effc operator node that reads it.
        storage: how it is stored, for reports, e.g. ``"packed 2:4, vector 16"``.
        dense_shape: shape of the dense weight it stands for, e.g. ``(K, Cout)`` for ``MatMul(X, W)``.
        stored_elements: elements the stored tensor holds (kept values only).
    """

    node: str
    storage: str
    dense_shape: tuple[int, ...]
    stored_elements: int

    @property
    def dense_elements(self) -> int:
        """Elements of the dense weight (stored values plus the zeros the format leaves out)."""
        return math.prod(self.dense_shape)

    @property
    def structural_zeros(self) -> int:
        """Zeros of the dense weight that the packed format does not store."""
        return self.dense_elements - self.stored_elements


MacCounter = Callable[[ir.Node], "int | None"]
"""A counter: takes a node, returns its MACs, or None when the shapes it needs are not static."""
PackedReader = Callable[[ir.Node], "tuple[ir.Value, PackedWeight] | None"]
CodedReader = Callable[[ir.Node], "tuple[ir.Value, np.ndarray, str] | None"]


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What the other layers need to know about one effc operator (its module's docstring gives the schema).

    Attributes:
        op_type: the operator's name in the ``effc`` domain, e.g. ``"NMSparseMatMul"``.
        inputs: input names in order (as in the function body).
        attributes: attribute names.
        count_macs: ``fn(node) -> MACs`` (a multiply plus an accumulate each), None when a needed shape is not
            static; decode-only operators return 0.
        reference: numpy implementation ``fn(*inputs, **attributes) -> output`` with the node's inputs as arrays
            and its attributes as keyword arguments (the string ``format`` as ``str``).
        packed_weight: for an operator whose stored weight has fewer elements than the dense weight it stands for:
            ``fn(node) -> (stored value, PackedWeight)``, None when the node is malformed; None for the others.
        coded_weight: for an operator whose stored weight is codes, not floats (block quantization):
            ``fn(node) -> (stored value, decoded float32 weight, storage label)``, None when the node is malformed;
            sparsity statistics count the decoded weight's zeros.
    """

    op_type: str
    inputs: tuple[str, ...]
    attributes: tuple[str, ...]
    count_macs: MacCounter
    reference: Callable[..., np.ndarray]
    packed_weight: PackedReader | None = None
    coded_weight: CodedReader | None = None


_OPS: dict[str, OpSpec] = {}


def register_op(spec: OpSpec) -> OpSpec:
    """Add ``spec`` to the registry (an operator module calls this once, at import).

    Raises:
        ValueError: another spec with the same ``op_type`` is registered.
    """
    if _OPS.get(spec.op_type, spec) is not spec:
        raise ValueError(f"effc operator {spec.op_type!r} is registered twice")
    _OPS[spec.op_type] = spec
    return spec


def get_op(op_type: str) -> OpSpec | None:
    """The spec of ``effc.<op_type>``, or None when no such effc operator exists."""
    return _OPS.get(op_type)


def registered_ops() -> tuple[str, ...]:
    """Names of all registered effc operators, sorted."""
    return tuple(sorted(_OPS))
