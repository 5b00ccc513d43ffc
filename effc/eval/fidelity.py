"""Fidelity metrics: how far a candidate's outputs are from a reference's, output by output.

The reference is normally the unmodified model run by onnxruntime; the candidate the rewritten model (also in
onnxruntime) or the compiled artifact. :func:`compare` returns a JSON-serializable dict::

    {
      "samples": int,                       # number of samples compared
      "outputs": {name: {                   # one entry per output, in graph output order
          "shape": [int, ...], "dtype": str,  # of the reference array (first sample)
          "kind": str,                      # "float", "class_scores", "integer" or "bool"
          "max_abs": float,                 # max |a - b| over all samples and elements
          "mean_abs": float,                # mean |a - b| over all samples and elements
          "rel_l2": float | None,           # ||a - b|| / ||a|| over all samples (float outputs)
          "cosine": float | None,           # mean over samples of cos(flatten(a), flatten(b)) (float outputs)
          "top1_agreement": float | None,   # fraction in [0, 1] of rows (last axis) with equal argmax
          "exact_match": float | None,      # fraction in [0, 1] of equal elements (integer / bool outputs)
          "nonfinite": int,                 # NaN/inf on one side not matched on the other (NaN = NaN, inf = inf)
      }},
      "summary": {                          # the worst value over outputs (None when no output has it)
          "max_abs": float, "mean_abs": float, "rel_l2": float | None, "cosine": float | None,
          "top1_agreement": float | None, "exact_match": float | None, "nonfinite": int,
          "worst_output": str,              # the output with the lowest cosine (else highest max_abs)
      },
    }

Conventions: the metrics are taken over the elements finite on both sides (``nonfinite`` counts the others that do
not match); an output with misplaced non-finite values fails every metric: ``max_abs``, ``mean_abs`` and ``rel_l2``
are ``inf`` and ``cosine`` is NaN (the worst in the summary), never 1.0 from the finite rest. The cosine of two
all-zero vectors is 1.0, of a zero and a non-zero vector 0.0. ``rel_l2`` with an all-zero reference is 0.0 when the
candidate is zero too and ``inf`` otherwise. Top-1 agreement is computed for
``output_kind == "class_scores"``; when ``output_kind`` is None, for outputs that look like class scores (2-D
``(batch, classes)`` floating point with at least 2 classes). An explicit other kind (``"embedding"``,
``"probability"``, ``"feature_map"``) switches the heuristic off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from effc.errors import DataError

logger = logging.getLogger(__name__)

CLASS_SCORES = "class_scores"


def _check_structure(
    reference: Sequence[Sequence[np.ndarray]], candidate: Sequence[Sequence[np.ndarray]], output_names: Sequence[str]
) -> None:
    if len(reference) != len(candidate):
        raise DataError(
            f"reference has {len(reference)} sample(s) but candidate has {len(candidate)}",
            "run both models on the same list of feeds",
        )
    if not reference:
        raise DataError("no samples to compare", "pass at least one feed (see --data or --samples)")
    for i, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        for side, outs in (("reference", ref), ("candidate", cand)):
            if len(outs) != len(output_names):
                raise DataError(
                    f"sample {i}: {side} has {len(outs)} output(s) but {len(output_names)} output name(s) were given "
                    f"({', '.join(output_names)})",
                    "give one name per graph output, in graph output order",
                )
        for name, a, b in zip(output_names, ref, cand, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                raise DataError(
                    f"output {name!r}, sample {i}: reference shape {a.shape} != candidate shape {b.shape}",
                    "compare models with the same static input shapes",
                )
            if i and a.shape != np.asarray(reference[0][output_names.index(name)]).shape:
                raise DataError(
                    f"output {name!r}: sample {i} has shape {a.shape}, sample 0 had "
                    f"{np.asarray(reference[0][output_names.index(name)]).shape}",
                    "use feeds with one static shape per input",
                )


def _is_float(dtype: np.dtype) -> bool:
    """True for numpy floats and the ml_dtypes ones (bfloat16, float8_*, float4_*: numpy kind ``V``)."""
    return np.issubdtype(dtype, np.floating) or (dtype.kind == "V" and dtype.name.startswith(("bfloat", "float")))


def _kind(name: str, array: np.ndarray, output_kind: str | Mapping[str, str] | None) -> str:
    if array.dtype == np.bool_:
        return "bool"
    if not _is_float(array.dtype):
        return "integer"
    kind = output_kind.get(name) if isinstance(output_kind, Mapping) else output_kind
    if kind == CLASS_SCORES:
        return CLASS_SCORES
    if kind is None and array.ndim == 2 and array.shape[-1] >= 2:
        return CLASS_SCORES
    return "float"


def kind_of(dtype: Any, shape: Sequence[int], output_kind: str | None = None) -> str:
    """The kind :func:`compare` gives an output of this dtype and shape (before any sample was run).

    Args:
        dtype: the output's numpy dtype.
        shape: its static shape.
        output_kind: as in :func:`compare` (a single kind or None for the heuristic).

    Returns:
        ``"float"``, ``"class_scores"``, ``"integer"`` or ``"bool"``.
    """
    return _kind("", np.empty((0,) * max(len(shape) - 1, 0) + tuple(shape[-1:]), dtype=dtype), output_kind)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _top1(refs: list[np.ndarray], cands: list[np.ndarray]) -> float | None:
    if refs[0].ndim == 0 or refs[0].shape[-1] == 0:
        return None
    agree = total = 0
    for a, b in zip(refs, cands, strict=True):
        ra = np.argmax(a.reshape(-1, a.shape[-1]), axis=-1)
        rb = np.argmax(b.reshape(-1, b.shape[-1]), axis=-1)
        agree += int(np.count_nonzero(ra == rb))
        total += ra.size
    return agree / total if total else None


def _finite_both(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``a`` and ``b`` (flat float64) at the elements finite on both sides, plus the misplaced non-finite count.

    NaN matches NaN and inf the same inf; any other non-finite value, on either side, is misplaced.
    """
    finite = np.isfinite(a) & np.isfinite(b)
    if finite.all():
        return a, b, 0
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    return a[finite], b[finite], int(np.count_nonzero(~finite & ~same))


def _compare_output(name: str, refs: list[np.ndarray], cands: list[np.ndarray], kind: str) -> dict[str, Any]:
    first = refs[0]
    a_all, b_all, nonfinite = _finite_both(np.concatenate([r.astype(np.float64).ravel() for r in refs]),
                                           np.concatenate([c.astype(np.float64).ravel() for c in cands]))
    diff = np.abs(a_all - b_all)
    if nonfinite:
        logger.warning("output %r: %d non-finite value(s) where the other side differs", name, nonfinite)
    result: dict[str, Any] = {
        "shape": list(first.shape),
        "dtype": str(first.dtype),
        "kind": kind,
        "max_abs": float(diff.max()) if diff.size else 0.0,
        "mean_abs": float(diff.mean()) if diff.size else 0.0,
        "rel_l2": None,
        "cosine": None,
        "top1_agreement": None,
        "exact_match": None,
        "nonfinite": nonfinite,
    }
    if kind in ("integer", "bool"):
        equal = sum(int(np.count_nonzero(r == c)) for r, c in zip(refs, cands, strict=True))
        result["exact_match"] = equal / a_all.size if a_all.size else 1.0
        return result
    norm_ref = float(np.linalg.norm(a_all))
    norm_diff = float(np.linalg.norm(a_all - b_all))
    result["rel_l2"] = norm_diff / norm_ref if norm_ref else (0.0 if norm_diff == 0.0 else float("inf"))
    cosines = [_cosine(*_finite_both(r.astype(np.float64).ravel(), c.astype(np.float64).ravel())[:2])
               for r, c in zip(refs, cands, strict=True)]
    result["cosine"] = float(np.mean(cosines))
    if kind == CLASS_SCORES:
        result["top1_agreement"] = _top1(refs, cands)
    if nonfinite:  # NaN/inf where the other side differs: a failure, whatever the finite rest says
        result.update(max_abs=float("inf"), mean_abs=float("inf"), rel_l2=float("inf"), cosine=float("nan"))
    return result


def _worst(values: list[float | None], pick) -> float | None:
    present = [v for v in values if v is not None]
    if any(np.isnan(v) for v in present):  # a failed output (misplaced NaN/inf) is the worst
        return float("nan")
    return pick(present) if present else None


def _summary(outputs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = list(outputs.values())
    summary: dict[str, Any] = {
        "max_abs": _worst([r["max_abs"] for r in rows], max),
        "mean_abs": _worst([r["mean_abs"] for r in rows], max),
        "rel_l2": _worst([r["rel_l2"] for r in rows], max),
        "cosine": _worst([r["cosine"] for r in rows], min),
        "top1_agreement": _worst([r["top1_agreement"] for r in rows], min),
        "exact_match": _worst([r["exact_match"] for r in rows], min),
        "nonfinite": sum(r["nonfinite"] for r in rows),
    }
    with_cosine = {n: r["cosine"] for n, r in outputs.items() if r["cosine"] is not None}
    if with_cosine:
        summary["worst_output"] = min(with_cosine, key=lambda n: -np.inf if np.isnan(with_cosine[n])
                                      else with_cosine[n])
    else:
        summary["worst_output"] = max(outputs, key=lambda n: outputs[n]["max_abs"])
    return summary


def compare(
    reference: Sequence[Sequence[np.ndarray]],
    candidate: Sequence[Sequence[np.ndarray]],
    output_names: Sequence[str],
    output_kind: str | Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Compare two models' outputs over the same samples.

    Args:
        reference: per sample, the list of output arrays in graph output order (e.g. the original model in
            onnxruntime).
        candidate: the same structure from the model under test; each array has the reference's shape.
        output_names: one name per output, in the same order as the arrays.
        output_kind: ``"class_scores"`` to force top-1 agreement, another kind (``"embedding"``, ...) to switch the
            class-score heuristic off, a mapping output name -> kind, or None for the heuristic (2-D float
            ``(batch, classes)`` outputs are treated as class scores).

    Returns:
        The metrics dict described in the module docstring (``samples``, ``outputs``, ``summary``).

    Raises:
        DataError: no samples, sample counts differ, an output count differs from ``output_names``, or an
            output's shapes differ between reference and candidate or between samples (the output is named).

    Example:
        >>> ref = [[np.array([[1.0, 0.0]])]]
        >>> cand = [[np.array([[0.0, 1.0]])]]
        >>> r = compare(ref, cand, ["logits"])
        >>> r["outputs"]["logits"]["cosine"], r["outputs"]["logits"]["top1_agreement"]
        (0.0, 0.0)
    """
    output_names = list(output_names)
    if len(set(output_names)) != len(output_names):
        raise DataError(f"output names repeat: {output_names}", "give each output a distinct name")
    _check_structure(reference, candidate, output_names)
    outputs: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(output_names):
        refs = [np.asarray(sample[k]) for sample in reference]
        cands = [np.asarray(sample[k]) for sample in candidate]
        outputs[name] = _compare_output(name, refs, cands, _kind(name, refs[0], output_kind))
    return {"samples": len(reference), "outputs": outputs, "summary": _summary(outputs)}
