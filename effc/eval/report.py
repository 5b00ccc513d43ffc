"""Compile reports: ``report.json`` (the exact dict), ``report.md`` (readable) and PNG plots.

The report dict (every section optional except where noted; a missing section is written as "not measured")::

    {
      "model": {"name": str, "source": str},          # required: name; source = path or zoo name
      "target": {"name": str, "options": dict, "info": dict},
                                                      # info["kernels"]: {kernel: template} or
                                                      # [{"kernel": ..., "template": ..., ...}] (a table is drawn)
      "pipeline": str,                                # canonical pass pipeline text ("" = no passes)
      "passes": [{"name": str, "text": str, "seconds": float, "modified": bool, "stats": dict}],
                                                      # a stats value that maps layer -> number or
                                                      # layer -> {metric: number} becomes a per-layer table + plot
      "inputs": {"description": str, "synthetic": bool, "count": int},
      "fidelity": {"vs_original": compare(...), "compiled_vs_rewritten": compare(...)},
                                                      # effc.eval.fidelity.compare dicts; other keys are shown too
      "cost": {"params_bytes_before": int, "params_bytes_after": int,
               "macs_before": int | count_macs dict, "macs_after": int | count_macs dict,
               "macs_by_op_before": dict, "macs_by_op_after": dict,   # op -> MACs (when macs_* are ints)
               "sparsity": sparsity_stats dict of the rewritten model (at least its "total")},
      "latency": {"threads": int, "ort": measure dict, "effc": measure dict,
                  "ratio": float,                     # ratio = effc median / ort median (< 1: effc is faster);
                                                      # computed when absent
                  "baseline": str},                   # which model onnxruntime ran: "original model" (effc
                                                      # compile) or "rewritten model.onnx"; also read from
                                                      # ort["baseline"] (paired_latency); absent: "original
                                                      # model", and report.json gets the field written
      "primary_output": str,                          # the output the headline and the quality gates use
                                                      # (absent: the worst over outputs is shown)
      "quality_gates": effc.eval.gates.check dict,    # when gates were asked for
      "status": "failed",                             # only when the artifact missed a gate (--keep-failed)
      "layer_names": {raw name: readable name},       # torch module path / ONNX scope of nodes and weights
                                                      # (effc.ir.names), used in per-layer tables and plots
      "compile_seconds": float,                       # the whole compile, wall clock
      "build_seconds": float,                         # the target build (TVM lowering) part of it
    }

Ratios shown for sizes and MACs are before / after (how many times smaller). The latency ratio is effc / onnxruntime
(the fraction of onnxruntime's time effc takes), shown with the speed-up it means ("0.50 = 2.00× faster"); the
onnxruntime side is labelled with its baseline ("onnxruntime (original model)"), because timing the original model
credits the passes and the compiler together while timing the rewritten model.onnx credits the compiler alone.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from effc.eval import plots
from effc.eval.cost import SPARSE_TENSOR_MIN
from effc.eval.latency import BASELINE_ORIGINAL, BASELINE_REWRITTEN

logger = logging.getLogger(__name__)

NOT_MEASURED = "not measured"
Table = tuple[str, list[str], list[tuple[str, dict[str, Any]]]]


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, paths, tuples, sets, enums and dataclasses to JSON types.

    Non-finite floats become the strings ``"nan"``, ``"inf"``, ``"-inf"`` so that the file is strict JSON.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((to_jsonable(v) for v in obj), key=str)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else str(value)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, bytes):
        return obj.hex()
    return str(obj)


# ---------------------------------------------------------------- formatting


def human(value: float, unit: str = "") -> str:
    """``1234567 -> '1.23 M'`` (decimal prefixes k, M, G, T)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.4g} {unit}".rstrip()


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    return None


def _macs(value: Any) -> float | None:
    return _num(value.get("total")) if isinstance(value, Mapping) else _num(value)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (int, np.integer)) and abs(value) >= 10_000:
        return f"{value:,}"  # 42,467,328 bytes/elements read at a glance, 42467328 do not
    if value is None:
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines + [""]


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    number = _num(value)
    return format(number * scale, spec) if number is not None else str(value)


def format_fidelity(comparison: Mapping[str, Any] | None, primary: str | None = None) -> str:
    """One line from a :func:`~effc.eval.fidelity.compare` dict: the primary output's metrics, else the summary.

    Args:
        comparison: the compare dict, or None.
        primary: the output to show (named in the line when the model has several); None or an output the dict
            lacks: the summary (worst over outputs).
    """
    if not comparison or "summary" not in comparison:
        return NOT_MEASURED
    outputs = comparison.get("outputs") or {}
    s = outputs.get(primary) if primary is not None else None
    label = f"{primary}: " if s is not None and len(outputs) > 1 else ""
    s = s if s is not None else comparison["summary"]
    parts = [f"MISMATCH: {s['nonfinite']} NaN/inf where the other side differs"] if s.get("nonfinite") else []
    if s.get("cosine") is not None:
        parts.append(f"cosine {_fmt(s['cosine'], '.6f')}")
    if s.get("max_abs") is not None:
        parts.append(f"max |Δ| {_fmt(s['max_abs'], '.3g')}")
    if s.get("top1_agreement") is not None:
        parts.append(f"top-1 {_fmt(s['top1_agreement'], '.1f', 100)}%")
    if s.get("exact_match") is not None:
        parts.append(f"exact {_fmt(s['exact_match'], '.1f', 100)}%")
    samples = comparison.get("samples")
    return label + ", ".join(parts) + (f" ({samples} sample(s))" if samples else "")


def _before_after(before: float | None, after: float | None, unit: str) -> str:
    if before is None and after is None:
        return NOT_MEASURED
    if before is None or after is None:
        known = "after" if before is None else "before"
        return f"{human(after if before is None else before, unit)} ({known} only)"
    if before == after:
        return f"{human(before, unit)} (unchanged)"
    if not after:
        ratio = "all removed"
    else:
        factor = max(before, after) / min(before, after)
        change = abs(after - before) / before if before else 1.0
        if factor < 1.005:  # "×1.00 smaller" says nothing: give the change in percent
            ratio = f"{change:.2%} {'smaller' if after < before else 'larger'}"
        else:
            ratio = f"×{factor:.2f} {'smaller' if after < before else 'larger'}"
    return f"{human(before, unit)} → {human(after, unit)} ({ratio})"


def latency_ratio(latency: Mapping[str, Any] | None) -> float | None:
    """``latency["ratio"]``, else effc median / onnxruntime median (< 1: effc is faster), else None."""
    if not latency:
        return None
    if _num(latency.get("ratio")) is not None:
        return float(latency["ratio"])
    ort, eff = (_num((latency.get(k) or {}).get("median_ms")) for k in ("ort", "effc"))
    return eff / ort if ort and eff is not None else None


def latency_baseline(latency: Mapping[str, Any] | None) -> str:
    """Which model onnxruntime ran in ``latency``: its ``"baseline"``, else ``ort["baseline"]``, else the original.

    ``effc compile`` times onnxruntime on the original model (DESIGN: "measured against the unmodified model"), and
    reports written before the field existed come from it, so a missing label means :data:`BASELINE_ORIGINAL`.
    """
    if not latency:
        return BASELINE_ORIGINAL
    ort = latency.get("ort")
    label = latency.get("baseline") or (ort.get("baseline") if isinstance(ort, Mapping) else None)
    return str(label) if label else BASELINE_ORIGINAL


def _ort_label(latency: Mapping[str, Any] | None) -> str:
    return f"onnxruntime ({latency_baseline(latency)})"


def format_latency(latency: Mapping[str, Any] | None) -> str:
    """One line: both medians (onnxruntime labelled with its baseline), the speed-up, the thread count.

    Returns "not measured" when neither median is known.
    """
    if not latency:
        return NOT_MEASURED
    medians = {k: _num((latency.get(k) or {}).get("median_ms")) for k in ("ort", "effc")}
    if medians["ort"] is None and medians["effc"] is None:
        return NOT_MEASURED
    text = " / ".join(
        f"{label} {f'{medians[k]:.3f} ms' if medians[k] is not None else NOT_MEASURED}"
        for k, label in (("ort", _ort_label(latency)), ("effc", "effc"))
    )
    ratio = latency_ratio(latency)
    if ratio is not None:
        if 0 < ratio <= 1:
            text += f" (ratio {ratio:.2f}: {1 / ratio:.2f}× faster)"
        elif ratio > 1:
            text += f" (ratio {ratio:.2f}: {ratio:.2f}× slower)"
    if latency.get("threads"):
        text += f", {latency['threads']} thread(s)"
    return text


def format_sparsity(total: Mapping[str, Any]) -> str:
    """One line from :func:`effc.eval.cost.sparsity_stats`' ``"total"``: how many weights are zero and where.

    Weights are counted in their dense shape, so N:M-packed layers contribute the zeros their format does not
    store (a saving in bytes and MACs) while literal zeros stay stored (dense kernels multiply them). Keys added
    later (``packed_zeros``, ``sparse_tensors``) are optional, so older totals still read.
    """
    zeros, elements = _num(total.get("zeros")) or 0, _num(total.get("elements")) or 0
    fraction = _num(total.get("sparsity")) or 0.0
    count = f" in {total['tensors']} tensors" if _num(total.get("tensors")) else ""
    parts = [f"{100 * fraction:.1f}% zeros ({human(zeros)} of {human(elements)} weight elements{count})"]
    sparse = total.get("sparse_tensors")
    if isinstance(sparse, Mapping) and sparse.get("tensors") and sparse.get("tensors") != total.get("tensors"):
        parts.append(f"{100 * (_num(sparse.get('sparsity')) or 0):.1f}% in the {sparse['tensors']} sparse tensor(s) "
                     f"(≥ {100 * SPARSE_TENSOR_MIN:.0f}% zeros; the rest stay dense)")
    packed, literal = _num(total.get("packed_zeros")) or 0, _num(total.get("literal_zeros"))
    if packed:
        parts.append(f"{human(packed)} not stored (N:M-packed)")
    if literal is None and not packed:
        literal = zeros  # a total written before literal_zeros existed
    if literal:
        parts.append(f"{human(literal)} stored as literal zeros (no byte or MAC saving)")
    return "; ".join(parts)


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The short table the CLI prints: fidelity, quality gates, parameter bytes, MACs, latency, compile time.

    The fidelity of the passes and of the whole compile is shown for the primary output (``report["primary_output"]``,
    named in the line when the model has several outputs); compiled vs rewritten, the compiler's own error, is the
    worst over all outputs.

    Args:
        report: a report dict (schema in the module docstring); missing sections read "not measured".

    Returns:
        ``(label, value)`` pairs, e.g. ``("Parameters", "4.19 MB → 1.05 MB (×4.00 smaller)")``.
    """
    from effc.eval.decoder_report import decoder_rows

    if report.get("decoder"):  # a decoder: perplexity and per-token figures instead of per-sample fidelity
        cost = report.get("cost") or {}
        params = _before_after(_num(cost.get("params_bytes_before")), _num(cost.get("params_bytes_after")), "B")
        return [*decoder_rows(report["decoder"]), ("Parameters", params), ("Compile time", _format_seconds(report))]
    fidelity = report.get("fidelity") or {}
    cost = report.get("cost") or {}
    primary = report.get("primary_output")
    rows = [
        ("Fidelity vs original (onnxruntime)", format_fidelity(fidelity.get("vs_original"), primary)),
        # the compiler's own error: the worst over all outputs (a wrong kernel may touch a secondary output only)
        ("Fidelity compiled vs rewritten", format_fidelity(fidelity.get("compiled_vs_rewritten"))),
    ]
    if fidelity.get("rewritten_vs_original"):  # the passes' share of the loss, when measured
        rows.insert(1, ("Fidelity rewritten vs original (passes)",
                        format_fidelity(fidelity["rewritten_vs_original"], primary)))
    gates = report.get("quality_gates")
    if isinstance(gates, Mapping) and gates.get("checks"):
        rows.insert(1, ("Quality gates", format_gates(gates)))
    rows += [
        ("Parameters", _before_after(_num(cost.get("params_bytes_before")), _num(cost.get("params_bytes_after")), "B")),
        ("MACs", _before_after(_macs(cost.get("macs_before")), _macs(cost.get("macs_after")), "")),
        ("Latency (median)", format_latency(report.get("latency"))),
    ]
    total = (cost.get("sparsity") or {}).get("total") if isinstance(cost.get("sparsity"), Mapping) else None
    modified = any(isinstance(p, Mapping) and p.get("modified") for p in report.get("passes") or [])
    # What the passes bought in zeros; an unpruned model's natural zeros (a few in 10k) are not listed.
    if modified and isinstance(total, Mapping) and total.get("zeros") and total.get("sparsity", 0) >= 5e-4:
        rows.insert(-2, ("Weight sparsity", format_sparsity(total)))
    tuning = ((report.get("target") or {}).get("info") or {}).get("tuning")
    if isinstance(tuning, Mapping):
        rows.append(("Tuning", format_tuning(tuning)))
    rows.append(("Compile time", _format_seconds(report)))
    return rows


def format_gates(result: Mapping[str, Any]) -> str:
    """One line on the quality gates (:func:`effc.eval.gates.check`): each gate, its measured value, ok / FAILED."""
    from effc.eval.gates import format_check

    text = "; ".join(format_check(c) for c in result.get("checks") or [])
    return f"{'passed' if result.get('passed') else 'FAILED'} ({text})"


def _format_seconds(report: Mapping[str, Any]) -> str:
    seconds, build = _num(report.get("compile_seconds")), _num(report.get("build_seconds"))
    if seconds is None:
        return NOT_MEASURED
    return f"{seconds:.2f} s" + (f" (target build {build:.2f} s)" if build is not None else "")


# ---------------------------------------------------------------- per-layer tables


def _is_shape(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and bool(item) and all(_num(d) is not None for d in item)


def _layer_rows(value: Any) -> tuple[list[str], list[tuple[str, dict[str, Any]]]] | None:
    """Rows of a per-layer stats value, else None.

    Accepted: layer -> number, layer -> {metric: number or text}, and a list of records ``{"name": layer, metric:
    number or text, ...}`` (e.g. nm-sparsity's ``layers`` and any pass's ``skipped`` with its reasons). Shapes
    (lists of ints) are shown as text.
    """
    named = isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(v, Mapping) and "name" in v for v in value)
    if named:
        items = [(str(v["name"]), {k: x for k, x in v.items() if k != "name"}) for v in value]
    elif isinstance(value, Mapping) and value:
        if all(_num(v) is not None for v in value.values()):
            return ["value"], [(str(k), {"value": v}) for k, v in value.items()]
        items = [(str(k), v) for k, v in value.items()]
    else:
        return None
    if not all(isinstance(v, Mapping) for _, v in items):
        return None
    columns: list[str] = []
    for _, v in items:
        for key, item in v.items():
            if key not in columns and (_num(item) is not None or isinstance(item, str) or _is_shape(item)):
                columns.append(key)
    if columns and (named or any(_num(item) is not None for _, v in items for item in v.values())):
        return columns, [(name, {k: _shape_text(x) for k, x in v.items()}) for name, v in items]
    return None


def _shape_text(item: Any) -> Any:
    return "×".join(str(int(d)) for d in item) if _is_shape(item) else item


def per_layer_tables(report: Mapping[str, Any]) -> list[Table]:
    """Per-layer tables found in pass stats, plus per-tensor weight sparsity from ``cost.sparsity``.

    Returns:
        ``(title, columns, rows)``; ``rows`` are ``(layer name, {column: value})`` in the stats' order.
    """
    tables: list[Table] = []
    for record in report.get("passes") or []:
        for key, value in (record.get("stats") or {}).items():
            found = _layer_rows(value)
            if found:
                tables.append((f"{record.get('name', '?')} / {key}", *found))
    sparsity = (report.get("cost") or {}).get("sparsity")
    if isinstance(sparsity, Mapping) and sparsity.get("tensors"):
        rows = [(name, {"sparsity": t["sparsity"], "zeros": t["zeros"], "elements": t["elements"],
                        "storage": _storage_label(t.get("storage", "dense"))})
                for name, t in sparsity["tensors"].items()]
        tables.append(("weight sparsity (rewritten model; zeros / elements of the dense shape)",
                       ["sparsity", "zeros", "elements", "storage"], rows))
    return tables


# ---------------------------------------------------------------- markdown


def _stats_summary(stats: Mapping[str, Any]) -> str:
    parts = []
    for key, value in stats.items():
        if isinstance(value, (Mapping, list, tuple)):
            parts.append(f"{key}: {len(value)} entries")
        elif value is None:
            parts.append(f"{key}: {NOT_MEASURED}")
        else:
            parts.append(f"{key}={_cell(_as_percent(key, value))}")
    return ", ".join(parts) or "–"


_FRACTION_KEYS = ("sparsity", "kept")
"""Stats keys that hold a fraction in [0, 1] (CONVENTIONS: "fraction in [0, 1]"); Markdown shows them in percent
like the summary does, report.json keeps the fraction."""


def _as_percent(key: str, value: Any) -> Any:
    if key in _FRACTION_KEYS and isinstance(value, float) and 0.0 <= value <= 1.0:
        return f"{100 * value:.1f}%"
    return value


_FIDELITY_TITLES = {
    "vs_original": "compiled artifact vs original model (onnxruntime)",
    "rewritten_vs_original": "rewritten model.onnx vs original (what the passes cost)",
    "compiled_vs_rewritten": "compiled artifact vs rewritten model.onnx (what compilation cost)",
}


def _section_fidelity(fidelity: Mapping[str, Any]) -> list[str]:
    lines = ["## Fidelity per output", ""]
    if not fidelity:
        return lines + [f"Fidelity: {NOT_MEASURED}.", ""]
    header = ["output", "kind", "max abs", "mean abs", "rel L2", "cosine", "top-1", "exact"]
    for name, comparison in fidelity.items():
        lines.append(f"### {_FIDELITY_TITLES.get(name, name.replace('_', ' '))}")
        lines.append("")
        if not isinstance(comparison, Mapping) or "outputs" not in comparison:
            lines += [NOT_MEASURED, ""]
            continue
        lines += [f"{comparison.get('samples', '?')} sample(s).", ""]
        rows = [[out, m.get("kind"), m.get("max_abs"), m.get("mean_abs"), m.get("rel_l2"), m.get("cosine"),
                 m.get("top1_agreement"), m.get("exact_match")] for out, m in comparison["outputs"].items()]
        for row in rows:  # show cosine with enough digits to see small losses; agreements as percentages
            row[5] = f"{row[5]:.6f}" if isinstance(row[5], float) else row[5]
            row[6:] = [f"{100 * v:.1f}%" if _num(v) is not None else v for v in row[6:]]
        lines += _table(header, rows)
    return lines


def _section_cost(cost: Mapping[str, Any]) -> list[str]:
    lines = ["## Size and compute", ""]
    if not cost:
        return lines + [f"Cost: {NOT_MEASURED}.", ""]
    rows = []
    for label, key in (("parameter bytes", "params_bytes"), ("MACs", "macs")):
        before, after = cost.get(f"{key}_before"), cost.get(f"{key}_after")
        b, a = (_macs(before), _macs(after)) if key == "macs" else (_num(before), _num(after))
        rows.append([label, f"{int(b):,}" if b is not None else NOT_MEASURED,
                     f"{int(a):,}" if a is not None else NOT_MEASURED, f"{b / a:.2f}" if a and b is not None else "–"])
    lines += _table(["", "before", "after", "before / after"], rows)
    by_op = [cost[k].get("by_op") if isinstance(cost.get(k), Mapping) else cost.get(f"macs_by_op_{k[5:]}")
             for k in ("macs_before", "macs_after")]
    if any(by_op):
        ops = sorted({op for d in by_op if d for op in d})
        rows = [[op, *(f"{int(d.get(op, 0)):,}" if d else "–" for d in by_op)] for op in ops]
        lines += ["MACs per operator type:", ""] + _table(["op", "before", "after"], rows)
    sparsity = cost.get("sparsity")
    if isinstance(sparsity, Mapping) and "total" in sparsity:
        t = sparsity["total"]
        lines += [f"Weight sparsity (rewritten model): {100 * t['sparsity']:.1f}% "
                  f"({t['zeros']:,} zeros of {t['elements']:,} weight elements; weights are the floating-point "
                  "parameters of rank ≥ 2, each counted in its dense shape).", ""]
        groups = t.get("by_storage")
        if isinstance(groups, Mapping) and groups:
            rows = [[_storage_label(k), g.get("tensors"), f"{int(g.get('elements', 0)):,}",
                     f"{int(g.get('zeros', 0)):,}", f"{100 * (_num(g.get('sparsity')) or 0):.1f}%"]
                    for k, g in groups.items() if isinstance(g, Mapping)]
            lines += _table(["storage", "tensors", "elements", "zeros", "sparsity"], rows)
    return lines


def _storage_label(storage: str) -> str:
    """``"dense"`` → ``"dense (zeros stored)"``; a packed format → ``"... (zeros not stored)"``."""
    return f"{storage} (zeros stored)" if storage == "dense" else f"{storage} (zeros not stored)"


_BASELINE_NOTES = {
    BASELINE_ORIGINAL: "onnxruntime ran the original model (before the passes): the ratio is what the passes and "
                       "the compiler bought together.",
    BASELINE_REWRITTEN: "onnxruntime ran the rewritten model.onnx (after the passes): the ratio is what the compiler "
                        "bought alone.",
}


def _section_latency(latency: Mapping[str, Any] | None, has_plot: bool) -> list[str]:
    lines = ["## Latency", ""]
    if not latency:
        return lines + [f"Latency: {NOT_MEASURED}.", ""]
    rows = []
    for key, label in (("ort", _ort_label(latency)), ("effc", "effc")):
        entry = latency.get(key)
        if isinstance(entry, Mapping):
            times = [_fmt(entry.get(k), ".3f") if entry.get(k) is not None else "–"
                     for k in ("median_ms", "p25_ms", "p75_ms", "min_ms", "mean_ms")]
            rows.append([label, *times, entry.get("runs")])
        else:
            rows.append([label, NOT_MEASURED, "–", "–", "–", "–", "–"])
    lines += [f"{format_latency(latency)}.", "", _BASELINE_NOTES.get(latency_baseline(latency), ""), ""]
    lines += _table(["runtime", "median ms", "25th pct ms", "75th pct ms", "min ms", "mean ms", "runs"], rows)
    return lines + (["![latency](latency.png)", ""] if has_plot else [])


def _section_target(target: Mapping[str, Any]) -> list[str]:
    lines = ["## Target", ""]
    if not target:
        return lines + ["Target: not recorded.", ""]
    lines += [f"- name: `{target.get('name', '?')}`"]
    for key, value in (target.get("options") or {}).items():
        lines.append(f"- option `{key}` = `{value}`")
    info = target.get("info") or {}
    for key, value in info.items():
        if key != "kernels" and not isinstance(value, (Mapping, list, tuple)):
            unit = " s" if key.endswith("_seconds") and _num(value) is not None else ""
            lines.append(f"- {key}: {_cell(value)}{unit}")
    lines.append("")
    kernels = info.get("kernels")
    if isinstance(kernels, Mapping) and kernels:
        lines += ["### Kernels", ""]
        lines += _table(["kernel", "template"], [[k, v if not isinstance(v, Mapping) else _stats_summary(v)]
                                                  for k, v in kernels.items()])
    elif isinstance(kernels, (list, tuple)) and kernels:
        columns = list(dict.fromkeys(k for item in kernels if isinstance(item, Mapping) for k in item)) or ["kernel"]
        rows = [[item.get(c) for c in columns] if isinstance(item, Mapping) else [item] for item in kernels]
        lines += ["### Kernels", ""] + _table(columns, rows)
    if isinstance(info.get("tuning"), Mapping):
        lines += _section_tuning(info["tuning"])
    effc_ops = info.get("effc_ops")
    if isinstance(effc_ops, (list, tuple)) and effc_ops:
        columns = list(dict.fromkeys(k for item in effc_ops if isinstance(item, Mapping) for k in item))
        # nodes of one shape get one measurement: one row per distinct entry, with how many nodes it covers
        groups: dict[str, list] = {}
        for item in effc_ops:
            if isinstance(item, Mapping):
                row = [_shape_text(item.get(c)) for c in columns]
                groups.setdefault(json.dumps(to_jsonable(row)), [0, row])[0] += 1
        lines += ["", "### effc operators: form chosen per node", ""]
        lines += _table(["nodes", *columns], [[n, *row] for n, row in groups.values()])
    return lines


def format_tuning(tuning: Mapping[str, Any]) -> str:
    """One line on a ``--tune`` run: budget, trials run now, kernels kept tuned, database folder."""
    kernels = tuning.get("kernels") or {}
    kept = sum(1 for k in kernels.values() if isinstance(k, Mapping) and k.get("choice") == "tuned")
    return (f"{tuning.get('trials')} trials budget, {tuning.get('trials_run')} run now; {kept} of {len(kernels)} "
            f"tuned kernel(s) kept (faster than the template); database {tuning.get('cache')}")


def _section_tuning(tuning: Mapping[str, Any]) -> list[str]:
    lines = ["", "### Tuning (MetaSchedule)", "", f"{format_tuning(tuning)}; cost model "
             f"{tuning.get('cost_model') or 'not used (database hit)'}; {_cell(tuning.get('seconds'))} s.", ""]
    rows = [[name, k.get("calls"), _cell(k.get("template_ms")), _cell(k.get("tuned_ms")), k.get("choice")]
            for name, k in (tuning.get("kernels") or {}).items() if isinstance(k, Mapping)]
    return lines + (_table(["kernel", "calls", "template ms", "tuned ms", "kept"], rows) if rows else [])


def _layer_label(names: Mapping[str, str], raw: str) -> str:
    """``"encoder.layer.0.attention.self.query (val_49)"``: the readable name with the graph's name beside it."""
    readable = names.get(raw)
    return f"{readable} ({raw})" if readable and readable != raw else raw


def readable_tables(report: Mapping[str, Any]) -> list[Table]:
    """:func:`per_layer_tables` with each layer named by ``report["layer_names"]`` (module path / scope) alone."""
    names = report.get("layer_names") or {}
    return [(title, columns, [(names.get(n, n), v) for n, v in rows])
            for title, columns, rows in per_layer_tables(report)]


def render_markdown(report: Mapping[str, Any], plots_written: set[str] | None = None) -> str:
    """The ``report.md`` text (schema in the module docstring); ``plots_written`` names PNGs to embed."""
    plots_written = plots_written or set()
    model, target = report.get("model") or {}, report.get("target") or {}
    lines = [f"# effc report: {model.get('name', 'model')} → {target.get('name', '?')}", ""]
    agreement = report.get("agreement")
    if isinstance(agreement, Mapping) and agreement.get("ok") is False:  # --allow-mismatch wrote it anyway
        lines.insert(0, f"**MISMATCH (written with --allow-mismatch): {agreement.get('message', '')}**\n")
    gates = report.get("quality_gates")
    if report.get("status") == "failed" and isinstance(gates, Mapping):
        lines += [f"**FAILED its quality gates** (written with --keep-failed): {format_gates(gates)}.", ""]
    if model.get("source"):
        lines += [f"Source: `{model['source']}`", ""]
    lines += [f"Pipeline: `{report.get('pipeline') or '(no passes)'}`", "", "## Summary", ""]
    lines += _table(["metric", "value"], [list(row) for row in summary_rows(report)])
    inputs = report.get("inputs") or {}
    lines += ["## Inputs", ""]
    if inputs:
        note = "**synthetic** inputs (generated, not real data): " if inputs.get("synthetic") else ""
        lines += [f"{note}{inputs.get('description', '(no description)')} — {inputs.get('count', '?')} sample(s).", ""]
    else:
        lines += [f"Inputs: {NOT_MEASURED}.", ""]
    lines += ["## Passes", ""]
    records = report.get("passes") or []
    if records:
        rows = [[i + 1, r.get("name"), f"`{r.get('text', r.get('name'))}`", r.get("seconds"), r.get("modified"),
                 _stats_summary(r.get("stats") or {})] for i, r in enumerate(records)]
        lines += _table(["#", "pass", "text", "seconds", "modified", "stats"], rows)
        warnings = [w for r in records for w in r.get("warnings") or []]
        lines += [*(f"- **warning**: {w}" for w in warnings), ""] if warnings else []
    else:
        lines += ["No passes ran.", ""]
    if isinstance(gates, Mapping) and gates.get("checks"):
        lines += ["## Quality gates", "", f"On output `{gates.get('primary_output')}`, compiled artifact vs original "
                  "model over the evaluation samples.", ""]
        lines += _table(["gate", "measured", "limit", "result"],
                        [[c["gate"], c.get("measured"), c.get("limit"), "ok" if c.get("passed") else "FAILED"]
                         for c in gates["checks"]])
    tables = per_layer_tables(report)
    names = report.get("layer_names") or {}
    if tables:
        lines += ["## Per layer", ""]
        for title, columns, rows in tables:
            cells = [[_layer_label(names, n), *(_as_percent(c, v.get(c)) for c in columns)] for n, v in rows]
            lines += [f"### {title}", ""] + _table(["layer", *columns], cells)
        if "layers.png" in plots_written:
            lines += ["![per-layer](layers.png)", ""]
    lines += _section_fidelity(report.get("fidelity") or {})
    lines += _section_cost(report.get("cost") or {})
    lines += _section_latency(report.get("latency"), "latency.png" in plots_written)
    lines += _section_target(target)
    lines += ["## Compile time", "", _format_seconds(report), ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, report: Mapping[str, Any]) -> list[str]:
    """Write ``report.json``, ``report.md`` and the PNG plots that have data into ``out_dir``.

    Args:
        out_dir: the artifact folder (created if missing).
        report: the report dict (schema in the module docstring); not modified.

    Returns:
        The file names written, relative to ``out_dir`` (``report.json``, ``report.md``, then ``latency.png``
        and/or ``layers.png`` when drawn).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(report)
    if isinstance(data.get("latency"), Mapping):  # say which model onnxruntime ran (absent in older callers)
        data["latency"].setdefault("baseline", latency_baseline(data["latency"]))
    (out / "report.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    written = ["report.json", "report.md"]
    pngs: set[str] = set()
    if isinstance(data.get("latency"), Mapping) and plots.latency_plot(out / "latency.png", data["latency"]):
        pngs.add("latency.png")
    if plots.layers_plot(out / "layers.png", readable_tables(data)):
        pngs.add("layers.png")
    missing = [k for k in ("fidelity", "cost", "latency", "inputs") if not data.get(k)]
    if missing:
        logger.info("report for %s: sections not measured: %s", (data.get("model") or {}).get("name"), missing)
    (out / "report.md").write_text(render_markdown(data, pngs), encoding="utf-8")
    return written + sorted(pngs)
