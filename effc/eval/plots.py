"""PNG plots for the report, drawn with matplotlib's object API on the Agg canvas (no GUI, no global state).

Each function writes one file and returns True, or returns False (writing nothing) when there is nothing to draw.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_BARS = 60
"""Per-layer plots show at most this many layers per panel (the first ones, in pass order)."""


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def latency_plot(path: Path, latency: dict[str, Any]) -> bool:
    """Bar chart of median latency per runtime, with whiskers from the minimum to the maximum run.

    Args:
        path: the PNG file to write.
        latency: the report's ``latency`` section; uses ``ort`` and ``effc`` (each with ``median_ms``, ``min_ms``,
            optional ``max_ms``), ``threads`` and ``baseline`` (which model onnxruntime ran, shown under its bar).

    Returns:
        True when the file was written, False when no runtime has a ``median_ms``.
    """
    labels, medians, lows, highs = [], [], [], []
    ort_label = f"onnxruntime\n({latency['baseline']})" if latency.get("baseline") else "onnxruntime"
    for key, label in (("ort", ort_label), ("effc", "effc")):
        entry = latency.get(key)
        if not isinstance(entry, dict) or entry.get("median_ms") is None:
            continue
        median = float(entry["median_ms"])
        labels.append(label)
        medians.append(median)
        lows.append(max(0.0, median - float(entry.get("min_ms", median))))
        highs.append(max(0.0, float(entry.get("max_ms", median)) - median))
    if not labels:
        return False
    fig = _figure(4.5, 3.2)
    ax = fig.add_subplot()
    bars = ax.bar(labels, medians, color=["#7f7f7f", "#1f77b4"][: len(labels)], yerr=[lows, highs], capsize=6)
    ax.bar_label(bars, labels=[f"{m:.3g} ms" for m in medians], padding=3)
    ax.set_ylabel("latency per inference (ms)")
    threads = latency.get("threads")
    ax.set_title(f"median latency{f', {threads} thread(s)' if threads else ''} (whiskers: min..max)", fontsize=9)
    ax.set_ylim(0, max(m + h for m, h in zip(medians, highs, strict=True)) * 1.25 or 1.0)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


_TELLING = ("error", "cosine", "loss", "speedup", "sparsity")
"""Column name parts that say most about a layer (preferred for the plot over sizes and counts)."""


def _plot_column(columns: Sequence[str], rows: Sequence[tuple[str, dict[str, Any]]]):
    """``(column, [(layer, value)])`` to draw: a column whose values differ between layers, preferring errors."""
    numeric = []
    for column in columns:
        values = [(n, vals.get(column)) for n, vals in rows]
        values = [(n, float(v)) for n, v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if values:
            numeric.append((column, values))
    varying = [c for c in numeric if len({v for _, v in c[1]}) > 1]
    telling = [c for c in varying if any(part in c[0] for part in _TELLING)]
    return (telling or varying or numeric or [None])[0]


def layers_plot(path: Path, tables: Sequence[tuple[str, list[str], list[tuple[str, dict[str, Any]]]]]) -> bool:
    """One horizontal bar panel per per-layer table, showing one numeric column.

    The column drawn is the first whose values differ between layers, preferring error/cosine/loss/speed-up/
    sparsity columns (a column equal for every layer says nothing as a bar chart); else the first numeric one.

    Args:
        path: the PNG file to write.
        tables: ``(title, columns, rows)`` with rows ``(layer name, {column: value})`` as built by
            :func:`effc.eval.report.per_layer_tables`; at most 4 panels are drawn.

    Returns:
        True when the file was written, False when no table has a numeric column.
    """
    panels = []
    for title, columns, rows in tables:
        chosen = _plot_column(columns, rows)
        if chosen is not None:
            panels.append((f"{title}: {chosen[0]}", chosen[1][:MAX_BARS]))
        if len(panels) == 4:
            break
    if not panels:
        return False
    heights = [max(2.0, 0.22 * len(values) + 1.0) for _, values in panels]
    fig = _figure(7.5, sum(heights))
    grid = fig.add_gridspec(len(panels), 1, height_ratios=heights)
    for k, (title, values) in enumerate(panels):
        ax = fig.add_subplot(grid[k])
        names = [n if len(n) <= 40 else "…" + n[-39:] for n, _ in values]
        ax.barh(range(len(values)), [v for _, v in values], color="#1f77b4")
        ax.set_yticks(range(len(values)), names, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True
