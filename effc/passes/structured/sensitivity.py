"""Per-layer sensitivity and a fidelity floor for lossy weight passes (``min_cosine=0.95``).

Each candidate layer is pruned alone (with the caller's ``prune_fn``: mask only, or SparseGPT on Hessians tapped once
from the unpruned model) on a copy of the model and the cosine between
the copy's outputs and the original's is measured with onnxruntime on calibration feeds. Layers are then taken
from the least to the most sensitive while the predicted cosine (1 minus the summed per-layer losses) stays at the
floor; the chosen set is checked by measurement and shrunk until it meets the floor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from effc.passes import sparsegpt as sg

logger = logging.getLogger(__name__)


def _outputs(model: ir.Model, feeds: Sequence[dict]) -> list[np.ndarray]:
    from effc.ir.reference import Reference

    ref = Reference(model)
    return [np.concatenate([np.asarray(o, np.float64).ravel() for o in ref.run(f)]) for f in feeds]


def output_cosine(model: ir.Model, feeds: Sequence[dict], reference: list[np.ndarray]) -> float:
    """Mean over feeds of the cosine between all outputs (flattened, concatenated) of ``model`` and ``reference``."""
    outs = _outputs(model, feeds)
    cos = [float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)) for a, b in zip(outs, reference, strict=True)]
    return float(np.mean(cos))


def _pruned_copy(model: ir.Model, names: set[str], hess: dict, prune_fn: Callable) -> ir.Model:
    copy = ir.from_proto(ir.to_proto(model))
    for lay in sg.linear_matmuls(copy):
        if lay[0].name in names:
            sg.set_weight(lay, prune_fn(lay, sg.get_weight(lay), hess.get(lay[0].inputs[0].name)))
    return copy


def choose_layers(model: ir.Model, layers: list, calibration, min_cosine: float, prune_fn: Callable,
                  max_feeds: int = 8):
    """Pick the largest set of ``layers`` whose joint pruning keeps the output cosine ≥ ``min_cosine``.

    Args:
        model: the model (unchanged).
        layers: candidate ``(node, weight, transposed)`` tuples (see :func:`effc.passes.sparsegpt.linear_matmuls`).
        calibration: an iterable of feeds with ``.tap(model, names)``.
        min_cosine: fidelity floor in (0, 1].
        prune_fn: ``(layer, (Cout, Cin) weight, hessian) -> pruned weight`` (``hessian`` from the unpruned model).
        max_feeds: calibration feeds used for the measurements.

    Returns:
        ``(chosen layers, info, reference outputs)``; ``info`` has ``per_layer`` (name -> cosine when pruned alone),
        ``chosen`` and ``dropped`` names, ``cosine_without_reconstruction`` and ``feeds`` (popped by the caller).
    """
    feeds = list(calibration)[:max_feeds]
    ref = _outputs(model, feeds)
    hess = sg.input_statistics(model, layers, calibration)
    per_layer = {}
    for lay in layers:
        per_layer[lay[0].name] = output_cosine(_pruned_copy(model, {lay[0].name}, hess, prune_fn), feeds, ref)
    order = sorted(layers, key=lambda lay: -per_layer[lay[0].name])
    loss, k = 0.0, 0
    for lay in order:
        loss += 1.0 - per_layer[lay[0].name]
        if 1.0 - loss < min_cosine:
            break
        k += 1
    measured = 1.0
    while k > 0:
        measured = output_cosine(_pruned_copy(model, {lay[0].name for lay in order[:k]}, hess, prune_fn), feeds, ref)
        if measured >= min_cosine:
            break
        k -= max(1, k // 8)
    chosen = order[:k]
    logger.info("min_cosine=%.3f: %d of %d layers chosen (cosine %.4f)", min_cosine, k, len(layers), measured)
    info = {"per_layer": per_layer, "chosen": [lay[0].name for lay in chosen],
            "dropped": [lay[0].name for lay in order[k:]], "cosine_without_reconstruction": measured, "feeds": feeds}
    return chosen, info, ref
