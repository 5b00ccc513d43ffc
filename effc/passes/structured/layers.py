"""Linear layers for weight pruning and the sequential calibration driver (shared by prune and nm-sparsity).

A layer is ``(node, weight value, transposed)``: a MatMul/Gemm whose second input is a constant 2-D weight;
``transposed`` is True when the stored weight is ``(Cout, Cin)`` (Gemm ``transB=1``), else it is the ONNX MatMul
layout ``(Cin, Cout)``. :func:`get_weight` / :func:`set_weight` always speak ``(Cout, Cin)``.
"""

from __future__ import annotations

import logging

import numpy as np

from effc.errors import PassError

logger = logging.getLogger(__name__)


_FFN_WORDS = ("intermediate", "ffn", "mlp", "fc1", "fc2", "output/dense", "output.dense", "feed_forward")
_ATTN_WORDS = ("attention", "attn", "query", "key", "value", "q_proj", "k_proj", "v_proj", "o_proj")


def linear_matmuls(model) -> list:
    """``(node, weight_value, transposed)`` for every MatMul/Gemm whose second input is a constant 2-D weight.

    ``transposed`` is True when the stored weight is ``(Cout, Cin)`` (Gemm ``transB=1``); otherwise it is the
    ONNX ``MatMul`` layout ``(Cin, Cout)``.
    """
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        wv = node.inputs[1]
        if wv is None or wv.const_value is None or len(wv.const_value.shape) != 2 or len(wv.uses()) != 1:
            continue
        if node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
            found.append((node, wv, bool(attrs.get("transB", 0))))
        else:
            found.append((node, wv, False))
    return found


def layer_kind(node, weight_shape: tuple[int, int]) -> str:
    """``"ffn"`` or ``"attention"``: by the node name, else by shape (FFN projections are not square)."""
    name = (node.name or "").lower()
    if any(w in name for w in _ATTN_WORDS):
        return "attention"
    if any(w in name for w in _FFN_WORDS):
        return "ffn"
    return "attention" if weight_shape[0] == weight_shape[1] else "ffn"


def select_layers(model, layers: str) -> list:
    """Linear layers chosen by ``layers``: ``all``, ``ffn``, ``attention`` or ``|``-separated fnmatch patterns.

    Raises:
        PassError: a pattern that matches no layer.
    """
    import fnmatch

    cands = linear_matmuls(model)
    if layers == "all":
        return cands
    if layers in ("ffn", "attention"):
        return [c for c in cands if layer_kind(c[0], tuple(c[1].const_value.shape)) == layers]
    pats = [p.strip() for p in layers.split("|") if p.strip()]
    chosen = [c for c in cands if any(fnmatch.fnmatch(c[0].name or "", p) for p in pats)]
    if not chosen:
        names = ", ".join((c[0].name or "?") for c in cands[:5])
        raise PassError(f"layers={layers!r} matches no linear layer", f"use all, ffn, attention or names like {names}")
    return chosen


def get_weight(layer) -> np.ndarray:
    """``(Cout, Cin)`` float32 copy of a layer's weight."""
    _, wv, transposed = layer
    w = wv.const_value.numpy().astype(np.float32)
    return w if transposed else w.T.copy()


def set_weight(layer, w: np.ndarray) -> None:
    """Store a ``(Cout, Cin)`` weight back into the layer's initializer (in its own layout)."""
    import onnx_ir as ir

    _, wv, transposed = layer
    data = w if transposed else w.T
    wv.const_value = ir.tensor(np.ascontiguousarray(data.astype(np.float32)), name=wv.name)


def _token_rows(arr: np.ndarray, feed: dict) -> np.ndarray:
    """Rows of a ``(..., Cin)`` activation that belong to real tokens.

    When the feed has an ``attention_mask`` whose shape equals the activation's leading axes (a transformer's
    ``(batch, seq)``), padded positions are dropped: they never reach a masked-mean-pooled output, and at length
    128 they outnumber the real tokens of short sentences. Otherwise all rows are kept.
    """
    x = np.asarray(arr, dtype=np.float64)
    mask = feed.get("attention_mask") if isinstance(feed, dict) else None
    if mask is not None and tuple(np.shape(mask)) == x.shape[:-1] and np.any(mask):
        return x[np.asarray(mask) != 0]
    return x.reshape(-1, x.shape[-1])


def relative_output_error(old: np.ndarray, new: np.ndarray, xtx: np.ndarray) -> float:
    """``||X (old - new)ᵀ||_F / ||X oldᵀ||_F`` from ``XᵀX`` alone: ``sqrt(tr(D XᵀX Dᵀ) / tr(W XᵀX Wᵀ))``.

    Args:
        old: the layer's weight before, ``(Cout, Cin)``.
        new: after, same shape.
        xtx: ``XᵀX`` ``(Cin, Cin)`` of the layer's input over the calibration tokens (:func:`input_statistics`).

    Returns:
        The relative error of the layer's output (0 when both outputs are 0, inf when only the new one is not).
    """
    w = old.astype(np.float64)
    d = w - new.astype(np.float64)
    num = max(float(np.sum((d @ xtx) * d)), 0.0)
    den = max(float(np.sum((w @ xtx) * w)), 0.0)
    if den > 0:
        return float(np.sqrt(num / den))
    return 0.0 if num == 0 else float("inf")


def input_statistics(model, layer_group: list, calibration) -> dict[str, np.ndarray]:
    """``XᵀX`` ``(Cin, Cin)`` per input value name of the given layers, from onnxruntime taps of ``model``.

    Padded token positions are left out (see :func:`_token_rows`).
    """
    names = sorted({layer[0].inputs[0].name for layer in layer_group})
    taps = calibration.tap(model, names, progress=False)
    feeds = list(calibration)
    stats = {}
    for name in names:
        acc = None
        for arr, feed in zip(taps[name], feeds, strict=True):
            x = _token_rows(arr, feed).astype(np.float32)
            xtx = (x.T @ x).astype(np.float64)
            acc = xtx if acc is None else acc + xtx
        stats[name] = acc
    return stats


def prune_sequential(model, layers: list, calibration, prune_fn, sequential: bool = True) -> list[dict]:
    """Prune ``layers`` in graph order, tapping each layer's input from the model pruned so far.

    Layers sharing one input value (Q, K, V) are pruned together from one tap. ``prune_fn(layer, weight, hessian)``
    returns the new ``(Cout, Cin)`` weight; ``hessian`` is None when ``calibration`` is None. With
    ``sequential=False`` all inputs are tapped once from the unpruned model (one onnxruntime session; Wanda's
    one-shot setting).

    Returns:
        One record per layer: ``{"name", "shape", "kept", "rel_output_error"}`` (``kept`` = fraction of non-zero
        weights; ``rel_output_error`` = ``||X (W - W')ᵀ||_F / ||X Wᵀ||_F`` over the calibration tokens the layer's
        input statistics hold, :func:`relative_output_error`; None without calibration: not measured).
    """
    order = {id(node): i for i, node in enumerate(model.graph)}
    layers = sorted(layers, key=lambda lay: order[id(lay[0])])
    by_input: dict[int, list] = {}
    for layer in layers:  # first occurrence order is a topological order of the groups
        by_input.setdefault(id(layer[0].inputs[0]), []).append(layer)
    groups = list(by_input.values())
    records = []
    if not sequential and calibration is not None:
        groups, once = [layers], input_statistics(model, layers, calibration)
    for group in groups:
        if calibration is None:
            stats = {}
        else:
            stats = input_statistics(model, group, calibration) if sequential else once
        for layer in group:
            w = get_weight(layer)
            hessian = stats.get(layer[0].inputs[0].name)
            new = prune_fn(layer, w, hessian)
            set_weight(layer, new)
            records.append({"name": layer[0].name, "shape": list(w.shape), "kept": float(np.mean(new != 0)),
                            "rel_output_error": None if hessian is None else relative_output_error(w, new, hessian)})
            logger.debug("pruned %s %s: kept %.3f", layer[0].name, w.shape, records[-1]["kept"])
    return records
