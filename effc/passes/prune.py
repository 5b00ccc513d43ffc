"""Unstructured pruning of constant MatMul / Gemm / Conv weights: ``prune(sparsity=0.5,method=wanda)``.

Weights are zeroed in place (same shape, same dtype); the graph keeps its structure, so the saving is realized
by sparse storage or kernels downstream. Which elements go is decided by a score per weight element; the lowest
scores in each comparison group are zeroed:

* ``magnitude``: ``|W|`` ("Learning both Weights and Connections for Efficient Neural Networks", Han et al. 2015).
* ``wanda``: ``|W_ij| * ||X_j||_2``, the weight magnitude times the L2 norm of input channel ``j`` over all
  calibration tokens ("A Simple and Effective Pruning Approach for Large Language Models", Sun et al. 2023).

Layouts and axes (``out`` = output-channel axis, ``in`` = reduction / input-channel axis):

* MatMul ``Y = X @ W``, ``W`` of shape ``(K, N)`` (or ``(..., K, N)``): in = axis -2, out = axis -1, so one
  output row of Wanda's ``(N, K)`` convention is a *column* of ``W``.
* Gemm ``Y = A @ B'``: ``B`` of shape ``(K, N)`` (``transB=0``: out = 1) or ``(N, K)`` (``transB=1``: out = 0).
* Conv ``W`` of shape ``(Cout, Cin/group, kh, kw)``: out = 0, in = 1 (input channel of ``W[o, c]`` is
  ``(o // (Cout/group)) * Cin/group + c``); the Wanda norm of a channel runs over batch and spatial positions.

``granularity=layer`` ranks the whole tensor; ``granularity=row`` ranks the weights of each output channel
separately (Wanda's per-output comparison group). ``scope=global`` ranks all selected layers together (one
threshold for the model; layer granularity only). Scores live in the table :data:`METHODS` (method -> scorer),
so reconstruction methods (SparseGPT) can be added beside them.

Selection: ``include``/``exclude`` are fnmatch patterns matched against node names and the weight's name
(``include`` empty = every layer; ``exclude`` wins). Weights with fewer than ``min_params`` elements (default
1024) stay dense: tiny heads and projections cost little and are sensitive. Biases and other 1-D tensors are
never weights here; graph-input weights (overridable by callers) and non-float weights are skipped with a reason.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.errors import CalibrationError, PipelineError
from effc.ir.queries import constant_tensor, linear_layers
from effc.passes.base import EffcPass, PassOptions, register_pass
from effc.passes.block_recon import RECONSTRUCT, RECONSTRUCT_HELP, normalize_reconstruct

__all__ = ["METHODS", "Method", "PruneOptions", "PrunePass", "WeightLayer", "find_weight_layers"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class WeightLayer:
    """A constant weight and the linear node(s) that read it.

    Attributes:
        nodes: consumers (a shared weight is pruned once for all of them).
        weight: the weight value (an initializer or a ``Constant`` node's output).
        kind: ``"MatMul"``, ``"Gemm"`` or ``"Conv"``.
        out_axis: output-channel axis of the weight.
        in_axis: input-channel (reduction) axis of the weight.
        act_axes: per consumer, the channel axis of its activation input (``node.inputs[0]``).
        groups: Conv ``group`` attribute (1 otherwise).
    """

    nodes: list[ir.Node]
    weight: ir.Value
    kind: str
    out_axis: int
    in_axis: int
    act_axes: list[int]
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class Method:
    """A pruning criterion: ``score(weight, input_norm)`` -> array of ``weight.shape``, lower is pruned first.

    ``input_norm`` is None unless ``needs_activations``; then it is the per-input-channel L2 norm already
    broadcast to ``weight.shape``.
    """

    score: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    needs_activations: bool


METHODS: dict[str, Method] = {
    "magnitude": Method(lambda w, norm: np.abs(w), needs_activations=False),
    "wanda": Method(lambda w, norm: np.abs(w) * norm, needs_activations=True),
}


def _pfail(option: str, value: Any, message: str, hint: str | None = None) -> None:
    raise PipelineError(f"prune({option}={value!r}): {message}", hint)


@dataclasses.dataclass(frozen=True)
class PruneOptions(PassOptions):
    """Options of ``prune``; see the module docstring for axes and groups."""

    sparsity: float = dataclasses.field(default=0.5, metadata={"help": "fraction of weights zeroed, in [0, 1]"})
    method: str = dataclasses.field(default="magnitude", metadata={"help": "scoring: magnitude | wanda"})
    granularity: str = dataclasses.field(
        default="layer", metadata={"help": "comparison group: layer (the whole tensor) | row (each output channel)",
                                 "choices": ("layer", "row")}
    )
    scope: str = dataclasses.field(
        default="layer", metadata={"help": "one threshold per layer | for all layers", "choices": ("layer", "global")}
    )
    include: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "fnmatch patterns on node or weight names to prune (empty: all)"}
    )
    exclude: tuple[str, ...] = dataclasses.field(
        default=(), metadata={"help": "fnmatch patterns on node or weight names to leave dense"}
    )
    min_params: int = dataclasses.field(
        default=1024, metadata={"help": "skip weights with fewer elements than this"}
    )
    reconstruct: str = dataclasses.field(default="false", metadata={
        "help": RECONSTRUCT_HELP + " (SparseGPT and the block fit handle 2-D MatMul/Gemm weights)",
        "choices": RECONSTRUCT})

    def __post_init__(self) -> None:
        normalize_reconstruct(self)  # Python API: reconstruct=True/False mean "true"/"false"
        super().__post_init__()

    def validate(self) -> None:
        """Raises: PipelineError: a value out of range or an unknown method/granularity/scope."""
        if not 0.0 <= self.sparsity <= 1.0:
            _pfail("sparsity", self.sparsity, "sparsity must be a fraction in [0, 1]", "e.g. sparsity=0.5")
        if self.method not in METHODS:
            _pfail("method", self.method, f"unknown method, expected one of {', '.join(METHODS)}")
        if self.granularity not in ("layer", "row"):
            _pfail("granularity", self.granularity, "granularity must be layer or row")
        if self.scope not in ("layer", "global"):
            _pfail("scope", self.scope, "scope must be layer or global")
        if self.scope == "global" and self.granularity == "row":
            _pfail("scope", self.scope, "scope=global ranks whole tensors", "use granularity=layer with scope=global")
        if self.min_params < 0:
            _pfail("min_params", self.min_params, "min_params must be a non-negative element count")


def find_weight_layers(model: ir.Model) -> tuple[list[WeightLayer], list[dict[str, str]]]:
    """Linear layers (:func:`effc.ir.queries.linear_layers`) grouped by weight, with their pruning axes.

    Returns:
        ``(layers, skipped)``: ``skipped`` lists ``{"node", "weight", "reason"}`` for linear nodes whose weight
        cannot be pruned (a graph input that callers may override, a non-float dtype, a weight read with two
        different layouts).
    """
    by_weight: dict[int, WeightLayer] = {}
    skipped: list[dict[str, str]] = []
    for found in linear_layers(model):
        node, w = found.node, found.weight
        tensor = constant_tensor(w)
        entry = {"node": node.name or "", "weight": w.name or ""}
        if w.is_graph_input() or tensor is None:
            skipped.append({**entry, "reason": "weight is a graph input"})
            continue
        if not tensor.dtype.is_floating_point():
            skipped.append({**entry, "reason": f"{tensor.dtype} weight"})
            continue
        ndim, act_axis, groups = len(tensor.shape), -1, 1
        if found.kind == "matmul":
            out_axis = ndim - 1
        elif found.kind == "gemm":
            out_axis, act_axis = 1 - found.reduction_axis, 0 if node.attributes.get_int("transA", 0) else 1
        else:
            out_axis, act_axis, groups = 0, 1, node.attributes.get_int("group", 1)
        kind = {"matmul": "MatMul", "gemm": "Gemm", "conv": "Conv"}[found.kind]
        layer = by_weight.get(id(w))
        if layer is None:
            by_weight[id(w)] = WeightLayer([node], w, kind, out_axis, found.reduction_axis, [act_axis], groups)
        elif (layer.kind, layer.out_axis) == (kind, out_axis):
            layer.nodes.append(node)
            layer.act_axes.append(act_axis)
        else:
            skipped.append({**entry, "reason": "weight shared across layouts"})
    return list(by_weight.values()), skipped


def _write_weight(value: ir.Value, array: np.ndarray, dtype: ir.DataType) -> None:
    """Replace the tensor behind ``value`` (initializer or ``Constant`` node), keeping name and dtype."""
    tensor = ir.Tensor(array, dtype=dtype, name=value.name)
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", tensor)
        if value.const_value is not None:
            value.const_value = tensor
    else:
        value.const_value = tensor


def _input_norm(layer: WeightLayer, taps: dict[str, list[np.ndarray]]) -> np.ndarray:
    """Per-input-channel L2 norm of the layer's activations (all consumers pooled), broadcast to the weight shape."""
    shape = tuple(constant_tensor(layer.weight).shape)
    sq = None
    for node, axis in zip(layer.nodes, layer.act_axes, strict=True):
        for x in taps[node.inputs[0].name]:
            x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
            part = np.square(x).reshape(-1, x.shape[-1]).sum(axis=0)
            sq = part if sq is None else sq + part
    norm = np.sqrt(sq)
    if layer.kind == "Conv":
        cout, cin_g = shape[0], shape[1]
        group_of_out = np.arange(cout) // (cout // layer.groups)
        norm = norm[group_of_out[:, None] * cin_g + np.arange(cin_g)[None, :]]  # (Cout, Cin/g)
        return np.broadcast_to(norm.reshape(cout, cin_g, *([1] * (len(shape) - 2))), shape)
    view = [1] * len(shape)
    view[layer.in_axis] = shape[layer.in_axis]
    return np.broadcast_to(norm.reshape(view), shape)


class _ErrorMeter:
    """Measures ``||X (W - W')|| / ||X W||`` over all calibration tokens (Frobenius) for MatMul/Gemm layers.

    The activations of each tapped input are stacked once, ``X`` of shape (tokens T, K). With ``G = XᵀX`` (K, K)
    the squared norm is ``||X D||² = sum((G D) ∘ D)``; the Gram matrix is used (and shared by the layers that
    read the same input, e.g. Q/K/V) when ``T·K + 2·K·N < 2·T·N``, i.e. when it costs fewer multiply-adds than
    the two direct products ``X D`` and ``X W``. Both ways are exact in float64.
    """

    def __init__(self, taps: dict[str, list[np.ndarray]]) -> None:
        self._taps = taps
        self._stacked: dict[tuple[str, int], np.ndarray] = {}
        self._grams: dict[tuple[str, int], np.ndarray] = {}

    def _x(self, name: str, axis: int, k: int) -> np.ndarray:
        key = (name, axis)
        if key not in self._stacked:
            parts = [np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1).reshape(-1, k) for x in self._taps[name]]
            self._stacked[key] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return self._stacked[key]

    def _sq_norms(self, name: str, axis: int, w: np.ndarray, diff: np.ndarray) -> tuple[float, float]:
        x = self._x(name, axis, w.shape[0])
        t, (k, n) = x.shape[0], w.shape
        if t * k + 2 * k * n < 2 * t * n:
            key = (name, axis)
            if key not in self._grams:
                self._grams[key] = x.T @ x
            g = self._grams[key]
            return max(float(np.sum((g @ diff) * diff)), 0.0), max(float(np.sum((g @ w) * w)), 0.0)
        return float(np.square(x @ diff).sum()), float(np.square(x @ w).sum())

    def error(self, layer: WeightLayer, old: np.ndarray, new: np.ndarray) -> float | None:
        """The relative output error of ``layer`` with ``new`` in place of ``old``; None for Conv / batched weights."""
        if layer.kind == "Conv" or old.ndim != 2:
            return None
        w, diff = old.astype(np.float64), old.astype(np.float64) - new.astype(np.float64)
        if layer.out_axis == 0:  # Gemm transB=1: (N, K) -> (K, N)
            w, diff = w.T, diff.T
        num = den = 0.0
        for node, axis in zip(layer.nodes, layer.act_axes, strict=True):
            n, d = self._sq_norms(node.inputs[0].name, axis, w, diff)
            num, den = num + n, den + d
        return float(np.sqrt(num / den)) if den > 0 else 0.0


def _max_measured(errors: Any) -> float | None:
    """The largest measured error; None when none was measured (Conv weights, no calibration), never 0."""
    measured = [e for e in errors if e is not None]
    return max(measured) if measured else None


def _lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` lowest entries along the last axis of a 2-D array (exactly ``k`` per row)."""
    mask = np.zeros(scores.shape, dtype=bool)
    if k > 0:
        idx = np.argpartition(scores, k - 1, axis=-1)[:, :k]
        np.put_along_axis(mask, idx, True, axis=-1)
    return mask


@register_pass
class PrunePass(EffcPass):
    """Zero the lowest-scoring fraction of constant MatMul / Gemm / Conv weights (unstructured sparsity).

    Stats: ``layers`` (weight name -> node, shared_by, params, zeroed, sparsity reached, rel_output_error),
    ``params_zeroed``, ``params_considered``, ``sparsity`` (over considered weights, fraction), ``skipped``
    (node, weight, reason), ``max_rel_output_error`` (None: not measured). The output error
    ``||X(W - W')||_F / ||XW||_F`` of each MatMul/Gemm is measured on the calibration activations when calibration
    is given (None otherwise: not measured, as for Conv weights).
    ``reconstruct=block`` adds ``block_reconstruction``, ``reconstruct=model`` adds ``model_reconstruction`` (the
    whole-model fit of the kept weights, :mod:`effc.passes.model_recon`; the rel. output errors are those before it).

    Raises:
        CalibrationError: ``method=wanda`` or ``reconstruct=true|block|model`` without calibration data.
        PassError: ``reconstruct=model`` on a graph with an op the torch evaluator lacks (e.g. Conv; named).
    """

    name = "prune"
    summary = "unstructured pruning of MatMul/Gemm/Conv weights (magnitude or Wanda)"
    Options = PruneOptions
    exact = False
    uses_calibration = True

    def _selected(self, layers: list[WeightLayer], skipped: list[dict[str, str]]) -> list[WeightLayer]:
        opts, chosen = self.options, []
        for layer in layers:
            names = [n.name or "" for n in layer.nodes] + [layer.weight.name or ""]
            entry = {"node": names[0], "weight": layer.weight.name or ""}
            hit = [p for p in opts.exclude if any(fnmatch.fnmatchcase(n, p) for n in names)]
            if opts.include and not any(fnmatch.fnmatchcase(n, p) for p in opts.include for n in names):
                skipped.append({**entry, "reason": "not matched by include"})
            elif hit:
                skipped.append({**entry, "reason": f"excluded by {hit[0]!r}"})
            elif constant_tensor(layer.weight).size < opts.min_params:
                reason = f"{constant_tensor(layer.weight).size} elements < min_params={opts.min_params}"
                skipped.append({**entry, "reason": reason})
            else:
                chosen.append(layer)
        return chosen

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Score and zero weights; see the class docstring for the stats."""
        opts, method = self.options, METHODS[self.options.method]
        layers, skipped = find_weight_layers(model)
        layers = self._selected(layers, skipped)
        rebuilt: dict[str, dict] = {}
        block_info: dict = {}
        targets = None
        if opts.reconstruct == "model" and layers:  # the dense model's outputs, before any weight changes
            from effc.passes.model_recon import check_model_fit, dense_outputs

            check_model_fit(model, self.calibration)
            targets = dense_outputs(model, self.calibration)
        pruned = [layer.weight for layer in layers]
        if opts.reconstruct != "false":  # SparseGPT (+ block fit) on 2-D MatMul/Gemm; the rest goes on below
            from effc.passes.sparsegpt import reconstruct_weight_layers

            rebuilt, layers = reconstruct_weight_layers(model, layers, self.calibration, opts.sparsity,
                                                        block=opts.reconstruct == "block", stats=block_info)
        taps: dict[str, list[np.ndarray]] = {}
        if method.needs_activations and layers and self.calibration is None:
            raise CalibrationError(
                f"prune(method={opts.method}) scores weights by input activations but got no calibration data",
                "give calibration inputs (--data FILE.npz, or a zoo: model with samples), or use method=magnitude",
            )
        if self.calibration is not None and layers:  # activations for Wanda and for the measured error
            taps = self.calibration.tap(model, sorted({n.inputs[0].name for layer in layers for n in layer.nodes}))
        tensors = [constant_tensor(layer.weight) for layer in layers]
        weights = [t.numpy() for t in tensors]
        scores = [
            method.score(w.astype(np.float64), _input_norm(layer, taps) if method.needs_activations else None)
            for layer, w in zip(layers, weights, strict=True)
        ]
        if opts.scope == "global" and layers:
            flat = np.concatenate([s.ravel() for s in scores])[None, :]
            mask_all = _lowest(flat, int(round(opts.sparsity * flat.size)))[0]
            splits = np.cumsum([s.size for s in scores])[:-1]
            masks = [m.reshape(s.shape) for m, s in zip(np.split(mask_all, splits), scores, strict=True)]
        else:
            masks = [self._layer_mask(layer, s) for layer, s in zip(layers, scores, strict=True)]
        report, zeroed_total, changed = dict(rebuilt), sum(r["zeroed"] for r in rebuilt.values()), len(rebuilt)
        meter = _ErrorMeter(taps)
        for layer, tensor, w, mask in zip(layers, tensors, weights, masks, strict=True):
            new = w.copy()
            new[mask] = 0
            if np.count_nonzero(w[mask]):
                changed += 1
                _write_weight(layer.weight, new, tensor.dtype)
            zeroed = int(np.count_nonzero(new == 0))
            report[layer.weight.name] = {
                "node": layer.nodes[0].name,
                "shared_by": len(layer.nodes),
                "params": int(new.size),
                "zeroed": zeroed,
                "sparsity": zeroed / new.size if new.size else 0.0,
                "rel_output_error": meter.error(layer, w, new) if taps else None,
            }
            zeroed_total += zeroed
        considered = sum(int(w.size) for w in weights) + sum(r["params"] for r in rebuilt.values())
        if targets is not None:  # masks fixed: the zeros counted above stay zeros
            from effc.passes.model_recon import fit_model

            block_info["model_reconstruction"] = fit_model(model, pruned, self.calibration, targets)
        self.stats = {
            "method": opts.method,
            "layers": report,
            "params_zeroed": zeroed_total,
            "params_considered": considered,
            "sparsity": zeroed_total / considered if considered else 0.0,
            "skipped": skipped,
            "max_rel_output_error": _max_measured(r["rel_output_error"] for r in report.values()),
            **block_info,
        }
        logger.info("prune: %d/%d weights zero in %d layer(s), %d skipped", zeroed_total, considered, len(layers),
                    len(skipped))
        return ir.passes.PassResult(model, modified=changed > 0)

    def _layer_mask(self, layer: WeightLayer, scores: np.ndarray) -> np.ndarray:
        """Mask of the weights to zero in one layer, per tensor or per output channel."""
        if self.options.granularity == "row":
            rows = np.moveaxis(scores, layer.out_axis, 0)
            grid = rows.reshape(rows.shape[0], -1)
            mask = _lowest(grid, int(round(self.options.sparsity * grid.shape[1])))
            return np.moveaxis(mask.reshape(rows.shape), 0, layer.out_axis)
        flat = scores.reshape(1, -1)
        return _lowest(flat, int(round(self.options.sparsity * flat.size))).reshape(scores.shape)
