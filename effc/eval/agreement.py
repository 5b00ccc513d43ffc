"""The agreement gate: a compiled artifact must compute what its ``model.onnx`` computes under onnxruntime.

``effc compile`` runs both on its evaluation samples before it writes anything. Per output:

* dtype and shape exact (every sample);
* NaN / inf at the same places (NaN matches NaN, inf the same inf);
* integer and bool values equal;
* float values within :data:`MAX_ABS` (max ``|ort - compiled|``), or a relative L2 error ``||ort - compiled|| /
  ||ort||`` within :data:`REL_L2` with max ``|diff|`` within 0.1% of ``max |ort|`` (both at least 8 ulps of the
  output dtype; for outputs far from 1 in scale, where fp32 summation order and fast-math ``exp``/``erf`` move
  the last bits);
* where ``model.onnx`` quantizes activations at run time (``effc.BlockQDQ``), additionally the quantization-aware
  criterion of ``effc verify`` (:func:`effc.eval.output_check.compare_outputs`): rel. L2 within 1.5x the change that the
  activation quantization itself makes.

On a mismatch :func:`locate` looks for the first disagreeing node by building the model again with every main-graph
value exposed as an output and comparing each against onnxruntime's taps, in graph order.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.errors import EffcError, MismatchError

logger = logging.getLogger(__name__)

#: Largest accepted max ``|onnxruntime - compiled|`` of a float output (same as ``effc verify``'s default).
MAX_ABS = 1e-4
#: Largest accepted relative L2 error of a float output (fp32; 8 ulps of fp16/bf16 outputs when larger).
REL_L2 = 1e-4
#: Locating the first disagreeing node rebuilds the model with its values exposed; skipped past this many values.
MAX_TAPS = 4000

CRITERION = (f"dtype and shape exact, NaN/inf at the same places, integers equal, floats within max abs {MAX_ABS:g} "
             f"or rel. L2 {REL_L2:g} with max abs <= 0.1% of the output's range (8 ulps for 16-bit floats)")


def _structure(expected: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]],
               names: Sequence[str]) -> dict[str, str]:
    """``{output: why}`` for outputs whose dtype or shape differs in some sample."""
    bad: dict[str, str] = {}
    for i, (es, gs) in enumerate(zip(expected, got, strict=True)):
        if len(gs) != len(es):
            return {name: f"sample {i}: {len(gs)} compiled outputs, onnxruntime gives {len(es)}" for name in names}
        for name, e, g in zip(names, es, gs, strict=True):
            e, g = np.asarray(e), np.asarray(g)
            if name not in bad and e.dtype != g.dtype:
                bad[name] = f"dtype {g.dtype}, onnxruntime {e.dtype}"
            elif name not in bad and e.shape != g.shape:
                bad[name] = f"shape {g.shape}, onnxruntime {e.shape}"
    return bad


def check(expected: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]], names: Sequence[str],
          unquantized: Sequence[Sequence[np.ndarray]] | None = None) -> dict[str, Any]:
    """Compare the compiled outputs with onnxruntime's (see the module docstring for the criterion).

    Args:
        expected: per sample, onnxruntime's outputs on ``model.onnx`` in graph output order.
        got: the compiled artifact's outputs, same structure.
        names: one name per output.
        unquantized: onnxruntime's outputs with the activation quantizers bypassed
            (:func:`effc.eval.output_check.without_dynamic_quant`), for models that quantize activations at run time.

    Returns:
        ``{"ok": bool, "criterion": str, "samples": int, "failed": [names], "outputs": {name: {"ok", "why",
        "max_abs", "rel_l2", "nonfinite"}}}``.
    """
    from effc.eval.output_check import compare_outputs

    names = list(names)
    bad = _structure(expected, got, names)
    good = [k for k, n in enumerate(names) if n not in bad]
    rows: dict[str, dict[str, Any]] = {n: {"ok": False, "why": why, "max_abs": None, "rel_l2": None, "nonfinite": 0}
                                       for n, why in bad.items()}
    if good:
        pick = [[s[k] for k in good] for s in expected], [[s[k] for k in good] for s in got]
        plain = None if unquantized is None else [[s[k] for k in good] for s in unquantized]
        for name, r in compare_outputs(*pick, [names[k] for k in good], MAX_ABS, plain, rel_l2=REL_L2).items():
            why = _why(r)
            rows[name] = {"ok": r["ok"], "why": why, "max_abs": r["max_abs"], "rel_l2": r["rel_l2"],
                          "nonfinite": r["nonfinite"]}
    failed = [n for n in names if not rows[n]["ok"]]
    return {"ok": not failed, "criterion": CRITERION + ("; quantization-aware (effc verify)" if unquantized else ""),
            "samples": len(expected), "failed": failed, "outputs": {n: rows[n] for n in names}}


def _why(row: Mapping[str, Any]) -> str:
    if row["ok"]:
        return ""
    parts = []
    if row.get("nonfinite"):
        parts.append(f"{row['nonfinite']} NaN/inf where onnxruntime differs")
    if row["criterion"] == "exact":
        parts.append(f"integer values differ (max abs {row['max_abs']:.3g})")
    elif row["max_abs"] > MAX_ABS:
        rel = row.get("rel_l2")
        parts.append(f"max abs {row['max_abs']:.3g}" + (f", rel. L2 {rel:.3g}" if rel is not None else ""))
    return ", ".join(parts) or "differs"


def message(result: Mapping[str, Any], node: Mapping[str, str] | None = None) -> str:
    """One line naming every failing output and, when found, the first disagreeing node."""
    outs = "; ".join(f"output {n!r}: {result['outputs'][n]['why']}" for n in result["failed"])
    text = f"compiled outputs disagree with onnxruntime on model.onnx ({result['samples']} sample(s)): {outs}"
    if node:
        text += f"; first disagreeing node: {node['node']!r} ({node['op_type']}, value {node['value']!r})"
    return text


def refuse(result: Mapping[str, Any], node: Mapping[str, str] | None) -> MismatchError:
    """The error ``effc compile`` raises for a failed gate (returned, not raised)."""
    return MismatchError(message(result, node),
                         "this is a miscompile in effc/TVM, not your model: report it with the model attached; "
                         "--allow-mismatch (allow_mismatch=True) writes the artifact anyway and records the mismatch")


def _values_in_order(model: ir.Model) -> list[tuple[ir.Node, ir.Value]]:
    return [(node, v) for node in model.graph for v in node.outputs
            if v is not None and v.name and isinstance(v.type, ir.TensorType)]


def locate(model: ir.Model, target: Any, options: Mapping[str, Any], feeds: Mapping[str, np.ndarray]
           ) -> dict[str, str] | None:
    """The first main-graph node whose output disagrees, found by building ``model`` with every value exposed.

    Args:
        model: the rewritten model (unchanged).
        target: the target it was built for (``.build``, ``.load``).
        options: the target options of the build.
        feeds: one evaluation sample.

    Returns:
        ``{"node", "op_type", "value", "why"}`` of the first disagreeing node, or None when it cannot be found
        (too many values, the tapped model fails to build or run, or every tapped value agrees: a fusion that
        the taps break up hides the difference).
    """
    from effc.ir.model import io_signature
    from effc.ir.reference import Reference, with_taps
    from effc.runtime.manifest import sha256_of

    pairs = _values_in_order(model)
    if not pairs or len(pairs) > MAX_TAPS:
        return None
    try:
        tapped = with_taps(model, [v.name for _, v in pairs])
        expected = Reference(tapped).run(feeds)
        with tempfile.TemporaryDirectory(prefix="effc-taps-") as work:
            build = target.build(tapped, Path(work), dict(options))
            files = {rel: sha256_of(Path(work) / rel) for rel in build.files}
            runner = target.load(Path(work), {"target": {"name": target.name, "options": dict(options)},
                                              "files": files, **io_signature(tapped)})
            got = runner.run(dict(feeds))
    except (EffcError, RuntimeError, ValueError) as exc:
        logger.info("could not locate the first disagreeing node: %s", exc)
        return None
    names = [v.name for v in tapped.graph.outputs]
    by_name = dict(zip(names, zip(expected, got, strict=False), strict=False))
    for node, value in pairs:
        if value.name not in by_name:
            continue
        e, g = by_name[value.name]
        row = check([[e]], [[np.asarray(g).reshape(np.shape(g))]], [value.name])["outputs"][value.name]
        if not row["ok"]:
            return {"node": node.name or f"<{node.op_type}>", "op_type": node.op_type, "value": value.name,
                    "why": row["why"]}
    return None


def gate(model: ir.Model, target: Any, options: Mapping[str, Any], feeds: Sequence[Mapping[str, np.ndarray]],
         expected: Sequence[Sequence[np.ndarray]], got: Sequence[Sequence[np.ndarray]], names: Sequence[str],
         allow_mismatch: bool = False) -> dict[str, Any]:
    """The compile-time gate: :func:`check`, then on a mismatch :func:`locate` and refuse (or record).

    Args:
        model: the rewritten model that was built (``model.onnx``).
        target: the target it was built for.
        options: its target options.
        feeds: the evaluation samples.
        expected: onnxruntime's outputs on ``feeds``, per sample in graph output order.
        got: the artifact's outputs, same structure.
        names: the output names.
        allow_mismatch: record the mismatch (``"message"``, ``"first_node"``) instead of raising.

    Returns:
        The :func:`check` result, with ``"message"`` and ``"first_node"`` on a mismatch.

    Raises:
        MismatchError: the outputs disagree and ``allow_mismatch`` is False (names the outputs and the first
            disagreeing node when found).
    """
    from effc.eval.output_check import dynamic_quant_nodes, without_dynamic_quant
    from effc.ir.reference import Reference

    unquantized = None
    if dynamic_quant_nodes(model):
        bypassed = Reference(without_dynamic_quant(model))
        unquantized = [bypassed.run(f) for f in feeds]
    result = check(expected, got, names, unquantized)
    if result["ok"]:
        return result
    result["first_node"] = locate(model, target, options, feeds[0])
    if not allow_mismatch:
        raise refuse(result, result["first_node"])
    result["message"] = message(result, result["first_node"])
    logger.warning("--allow-mismatch: writing the artifact although %s", result["message"])
    return result


def record(result: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's ``agreement`` entry: ``ok``, ``criterion``, ``samples``, and on a mismatch the message."""
    if result is None:
        return None
    keep = ("ok", "criterion", "samples", "failed", "message", "first_node")
    return {k: result[k] for k in keep if k in result}
