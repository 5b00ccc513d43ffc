"""Output agreement of a compiled artifact with onnxruntime, aware of run-time activation quantization.

Used by ``effc verify`` (:func:`effc.api.verify_artifact`) and the compile-time agreement gate
(:mod:`effc.eval.agreement`); lives in ``effc.eval`` so that both read it without an upward import.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "DYNAMIC_QUANT_OPS",
    "LOCAL_ERROR_FRACTION",
    "QUANT_ERROR_FACTOR",
    "compare_outputs",
    "dynamic_quant_nodes",
    "without_dynamic_quant",
]

#: Quantization-aware check (models with dynamic activation quantization, ``effc.BlockQDQ``): a float output passes
#: when ``rel_l2(compiled, onnxruntime) <= QUANT_ERROR_FACTOR * rel_l2(onnxruntime without activation quantization,
#: onnxruntime)`` over all samples (or when it passes the plain atol). Why a bound relative to the quantization's own
#: effect: round-to-nearest per block turns fp32 summation-order differences that land on a rounding boundary into
#: one-code flips; each flip moves the next layers' inputs, more codes flip, and after enough layers the two
#: executions carry independent rounding noise of the same size, whose difference is sqrt(2) times the noise: 1.5
#: is that ceiling plus a margin. Measured on MiniLM-L6 (benchmarks/verify_criterion.py, docs/BENCHMARKS.md
#: "effc verify"): correct artifacts reach 0.07-0.55 of it (MXINT8, MXFP8, MXFP4 activations, KV mode) at max |diff|
#: up to 1.0 and rel. L2 up to 0.17, so no fixed bound fits every format.
QUANT_ERROR_FACTOR = 1.5
#: With a relative-L2 bound (the compile-time agreement gate), a float output's max ``|diff|`` may reach this
#: fraction of ``max |reference|``: a local error that a small relative L2 would average away still fails.
LOCAL_ERROR_FRACTION = 1e-3
#: Ops whose output is an activation quantized at run time (a rounding boundary reached from computed values).
DYNAMIC_QUANT_OPS = frozenset({("effc", "BlockQDQ")})


def dynamic_quant_nodes(model: Any) -> list[Any]:
    """The nodes of the main graph (and its subgraphs) that quantize activations at run time (``effc.BlockQDQ``).

    Args:
        model: an ``onnx_ir.Model`` (e.g. an artifact's ``model.onnx``).

    Returns:
        The ``onnx_ir.Node`` objects in graph order; empty for weight-only or float models.
    """
    import onnx_ir as ir

    return [n for n in ir.traversal.RecursiveGraphIterator(model.graph) if (n.domain, n.op_type) in DYNAMIC_QUANT_OPS]


def without_dynamic_quant(model: Any) -> Any:
    """A copy of ``model`` whose run-time activation quantizers (``effc.BlockQDQ``) are identities.

    The reference for how much the activation quantization itself changes the outputs (weights stay quantized).
    """
    import onnx_ir as ir

    copy = ir.from_proto(ir.to_proto(model))
    for node in dynamic_quant_nodes(copy):
        identity = ir.Node("", "Identity", [node.inputs[0]], name=f"{node.name}/bypass")
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [identity], node.outputs, identity.outputs)
    return copy


def compare_outputs(
    expected: list[list[np.ndarray]],
    got: list[list[np.ndarray]],
    names: list[str],
    atol: float,
    unquantized: list[list[np.ndarray]] | None = None,
    rel_l2: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-output agreement of a compiled artifact with onnxruntime (metrics from :func:`effc.eval.fidelity.compare`).

    Args:
        expected: per sample, the reference outputs (onnxruntime on ``model.onnx``) in graph output order.
        got: the artifact's outputs, same structure (reshaped to the reference's shapes).
        names: one name per output.
        atol: largest accepted max ``|expected - got|`` (criterion ``"atol"``).
        unquantized: onnxruntime's outputs of the model without its activation quantizers
            (:func:`without_dynamic_quant`), same structure; given, float outputs use criterion ``"quantized"``:
            they pass within ``atol`` or when ``rel_l2 <= QUANT_ERROR_FACTOR * quant_rel_l2``.
        rel_l2: given, a float output also passes when its relative L2 error is at most
            ``max(rel_l2, 8 * eps(dtype))`` and its max ``|expected - got|`` at most
            ``max(LOCAL_ERROR_FRACTION, 8 * eps(dtype)) * max |expected|`` (outputs far from 1 in scale; one
            grossly wrong element still fails). Criterion ``"atol+rel_l2"``.

    Returns:
        ``{name: {"max_abs", "cosine" (mean over samples), "rel_l2" (||expected - got|| / ||expected|| over all
        samples), "quant_rel_l2" (the same for ``unquantized``, None without it), "nonfinite" (misplaced NaN/inf),
        "criterion", "ok"}}``. Integer
        and bool outputs must be equal (criterion ``"exact"``, cosine and rel_l2 None); non-finite float values
        must sit at the same places (NaN matches NaN).
    """
    from effc.eval.fidelity import compare

    got = [[np.asarray(g).reshape(np.shape(e)) for e, g in zip(es, gs, strict=True)]
           for es, gs in zip(expected, got, strict=True)]
    fid = compare(expected, got, names, output_kind="float")["outputs"]
    quant = compare(expected, unquantized, names, output_kind="float")["outputs"] if unquantized is not None else None
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        r = fid[name]
        if r["kind"] in ("integer", "bool"):
            rows[name] = {"max_abs": r["max_abs"], "cosine": None, "rel_l2": None, "quant_rel_l2": None,
                          "nonfinite": r["nonfinite"], "criterion": "exact", "ok": r["exact_match"] == 1.0}
            continue
        row = {"max_abs": r["max_abs"], "cosine": r["cosine"], "rel_l2": r["rel_l2"], "quant_rel_l2": None,
               "nonfinite": r["nonfinite"], "criterion": "atol"}
        ok = r["max_abs"] <= atol
        if rel_l2 is not None:
            k = names.index(name)
            row["criterion"] = "atol+rel_l2"
            ulps = 8 * _eps(expected[0][k].dtype)
            ok = ok or (r["rel_l2"] <= max(rel_l2, ulps)
                        and r["max_abs"] <= max(LOCAL_ERROR_FRACTION, ulps) * _max_finite(e[k] for e in expected))
        if quant is not None:
            row["criterion"], row["quant_rel_l2"] = "quantized", quant[name]["rel_l2"]
            ok = ok or r["rel_l2"] <= QUANT_ERROR_FACTOR * row["quant_rel_l2"]
        row["ok"] = ok and not r["nonfinite"]
        rows[name] = row
    return rows


def _eps(dtype: np.dtype) -> float:
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        return 0.0


def _max_finite(arrays: Any) -> float:
    """Largest finite ``|value|`` over ``arrays`` (0.0 when none is finite)."""
    peaks = [float(np.abs(a[np.isfinite(a)]).max(initial=0.0)) for a in (np.asarray(x, np.float64) for x in arrays)]
    return max(peaks, default=0.0)
