"""Quality gates: a compile fails when its fidelity on the model's primary output misses a limit the user set.

The gates are the options Olive, NNCF and Neural Compressor users reach for first (an accuracy criterion on the
compressed model): ``--min-cosine X``, ``--max-top1-drop P`` and, for decoders, ``--max-ppl-increase P``. Each is
checked on the evaluation samples of one output, the *primary output* (:func:`primary_output`): the one users
consume (MiniLM: ``sentence_embedding``, not the padded token states of ``last_hidden_state``). The other outputs
stay in the report's per-output table.

A gate is data in :data:`GATES` (option name -> :class:`Gate`): how to read its measured value from the report and
which way it must lie. A compile fills its report, then calls :func:`check`; the compile driver raises
:class:`QualityGateError` (its own exit code) when :func:`check` says a gate failed. Decoder compiles plug
perplexity in by writing the report section ``"perplexity": {"original": float, "compiled": float}`` (perplexity
of the original model and of the compiled artifact on the same evaluation tokens) and by naming
``"perplexity"`` among the metrics they measure (:func:`check_applicable`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from effc.errors import EffcError, QualityGateError

__all__ = ["GATES", "Gate", "check", "check_applicable", "failure", "format_check", "metrics_for_kind",
           "parse_limits", "primary_output", "QualityGateError"]

#: What each gate is measured on: the compiled artifact against the original model, both on the eval samples.
COMPARISON = "vs_original"


def _primary_metrics(report: Mapping[str, Any], primary: str) -> Mapping[str, Any]:
    comparison = ((report.get("fidelity") or {}).get(COMPARISON) or {}).get("outputs") or {}
    return comparison.get(primary) or {}


def _cosine(report: Mapping[str, Any], primary: str) -> float | None:
    value = _primary_metrics(report, primary).get("cosine")
    return None if value is None else float(value)


def _top1_drop(report: Mapping[str, Any], primary: str) -> float | None:
    agreement = _primary_metrics(report, primary).get("top1_agreement")
    return None if agreement is None else 100.0 * (1.0 - float(agreement))


def _ppl_increase(report: Mapping[str, Any], primary: str) -> float | None:
    ppl = report.get("perplexity") or {}
    before, after = ppl.get("original"), ppl.get("compiled")
    if before is None or after is None or not before:
        return None
    return 100.0 * (float(after) / float(before) - 1.0)


@dataclasses.dataclass(frozen=True)
class Gate:
    """One quality gate.

    Attributes:
        flag: the CLI option, e.g. ``"--min-cosine"``.
        metric: what is measured, as the report names it (``"cosine"``, ``"top-1 drop"``, ``"perplexity increase"``).
        unit: text after the number (``""`` or ``" %"``, ``" pp"``).
        lower_bound: True when the measured value must be at least the limit, False when at most.
        needs: the metric a compile must measure for the gate to apply (see :func:`check_applicable`).
        applies_to: who the gate is for, used in the error when it does not apply.
        valid: ``(low, high)`` range a limit must lie in.
        measure: ``(report, primary output) -> value`` or None when the report lacks it.
    """

    flag: str
    metric: str
    unit: str
    lower_bound: bool
    needs: str
    applies_to: str
    valid: tuple[float, float]
    measure: Callable[[Mapping[str, Any], str], float | None]


GATES: dict[str, Gate] = {
    "min_cosine": Gate("--min-cosine", "cosine", "", True, "cosine",
                       "float outputs (cosine between the compiled and the original output, mean over samples)",
                       (-1.0, 1.0), _cosine),
    "max_top1_drop": Gate("--max-top1-drop", "top-1 drop", " pp", False, "top1",
                          "class-score outputs (percentage points of evaluation rows whose argmax differs from "
                          "the original model's)", (0.0, 100.0), _top1_drop),
    "max_ppl_increase": Gate("--max-ppl-increase", "perplexity increase", " %", False, "perplexity",
                             "decoders (language models whose compile measures perplexity)",
                             (0.0, math.inf), _ppl_increase),
}


def parse_limits(**limits: float | None) -> dict[str, float]:
    """The gates asked for, validated: option name -> limit (options given as None are dropped).

    Args:
        **limits: ``min_cosine`` (in [-1, 1]), ``max_top1_drop`` (percentage points in [0, 100]) and
            ``max_ppl_increase`` (percent, >= 0), each None when not asked for.

    Returns:
        ``{"min_cosine": 0.95, ...}`` in :data:`GATES` order.

    Raises:
        EffcError: an unknown gate name, or a limit that is not a number in its range.
    """
    unknown = sorted(set(limits) - set(GATES))
    if unknown:
        raise EffcError(f"unknown quality gate(s) {unknown}", f"gates are: {', '.join(GATES)}")
    out: dict[str, float] = {}
    for name, gate in GATES.items():
        value = limits.get(name)
        if value is None:
            continue
        low, high = gate.valid
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
            span = f">= {low:g}" if math.isinf(high) else f"in [{low:g}, {high:g}]"
            raise EffcError(f"{gate.flag} {value!r} is not a number {span}", f"give {gate.flag} a value {span}")
        out[name] = float(value)
    return out


def primary_output(names: Sequence[str], requested: str | None = None, declared: str | None = None) -> str:
    """The output that the headline and the quality gates use.

    Args:
        names: the model's output names, in graph order.
        requested: the name the user gave (``--primary-output``), or None.
        declared: the name the zoo entry declares, or None.

    Returns:
        ``requested`` if given, else ``declared`` if the model has it, else the first output.

    Raises:
        EffcError: ``requested`` is not an output of the model (the message lists the outputs); the model has no
            output.
    """
    if not names:
        raise EffcError("the model has no output", "compile a model with at least one graph output")
    if requested is not None:
        if requested not in names:
            raise EffcError(f"--primary-output {requested!r} is not an output of the model",
                            f"give one of: {', '.join(names)}")
        return requested
    return declared if declared in names else names[0]


def metrics_for_kind(kind: str) -> set[str]:
    """The gate metrics a compile measures on an output of this fidelity kind (:mod:`effc.eval.fidelity`)."""
    from effc.eval.fidelity import CLASS_SCORES

    if kind == CLASS_SCORES:
        return {"cosine", "top1"}
    return {"cosine"} if kind == "float" else set()


def check_applicable(limits: Mapping[str, float], measured: Collection[str], primary: str, what: str) -> None:
    """Fail before any work when a gate asks for a metric this compile does not measure.

    Args:
        limits: the gates asked for (:func:`parse_limits`).
        measured: the metrics this compile measures on its primary output (:func:`metrics_for_kind`; decoder
            compiles add ``"perplexity"``).
        primary: the primary output's name (for the message).
        what: the model's name (for the message).

    Raises:
        EffcError: a gate that does not apply; the message says whom it applies to.
    """
    for name in limits:
        gate = GATES[name]
        if gate.needs not in measured:
            raise EffcError(
                f"{gate.flag} applies to {gate.applies_to}; {what} (primary output {primary!r}) has no {gate.metric}",
                f"drop {gate.flag}, or name another output with --primary-output"
                if gate.needs != "perplexity" else f"drop {gate.flag}; use --min-cosine for this model",
            )


def check(report: Mapping[str, Any], limits: Mapping[str, float], primary: str) -> dict[str, Any]:
    """Check every gate against the report.

    Args:
        report: the compile report (``fidelity.vs_original`` per output; ``perplexity`` for decoders).
        limits: the gates asked for (:func:`parse_limits`).
        primary: the output the gates read.

    Returns:
        ``{"primary_output": str, "passed": bool, "checks": [{"gate": flag, "metric": str, "limit": float,
        "measured": float | None, "passed": bool}]}``; a gate whose value is not in the report fails (measured
        None), never passes silently.
    """
    checks = []
    for name, limit in limits.items():
        gate = GATES[name]
        value = gate.measure(report, primary)
        ok = value is not None and math.isfinite(value) and (value >= limit if gate.lower_bound else value <= limit)
        checks.append({"gate": gate.flag, "metric": gate.metric, "limit": limit, "measured": value, "passed": ok})
    return {"primary_output": primary, "passed": all(c["passed"] for c in checks), "checks": checks}


def format_check(entry: Mapping[str, Any]) -> str:
    """One line per gate, e.g. ``--min-cosine 0.95: cosine 0.774512 FAILED``."""
    gate = next((g for g in GATES.values() if g.flag == entry["gate"]), None)
    unit = gate.unit if gate else ""
    measured = entry.get("measured")
    digits = ".6f" if entry.get("metric") == "cosine" else ".2f"
    value = "not measured" if measured is None else f"{format(measured, digits)}{unit}"
    return f"{entry['gate']} {entry['limit']:g}: {entry['metric']} {value} {'ok' if entry['passed'] else 'FAILED'}"


def failure(result: Mapping[str, Any], what: str, kept: str | None = None) -> QualityGateError:
    """The error for a compile that missed its gates: the measured values, and where (if anywhere) it was kept.

    Args:
        result: :func:`check`'s result with ``passed`` False.
        what: the model's name.
        kept: the artifact folder when ``--keep-failed`` wrote it (marked failed), else None.
    """
    failed = "; ".join(format_check(c) for c in result["checks"] if not c["passed"])
    where = (f"artifact kept in {kept}, marked failed in manifest.json and report.md" if kept
             else "nothing was written")
    return QualityGateError(
        f"{what} missed its quality gate on output {result['primary_output']!r} ({failed}); {where}",
        "compress less (e.g. fewer layers, reconstruct=block, more calibration samples) or relax the gate; "
        "--keep-failed writes the artifact anyway",
    )
