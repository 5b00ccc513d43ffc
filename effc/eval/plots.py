"""PNG plots for the report, drawn with matplotlib's object API on the Agg canvas (no GUI, no global state).

Each function writes one file and returns True, or returns False (writing nothing) when there is nothing to draw.
"""

from __future__ import annotations

import logging
import re
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
    """Bar chart of median latency per runtime, with whiskers over the interquartile range (25th..75th percentile).

    The interquartile range shows the spread of typical runs; a single slow run (a page fault, another process)
    moves the maximum tenfold and would swamp the difference between the runtimes. Entries measured before the
    quartiles were recorded fall back to min..median.

    Args:
        path: the PNG file to write.
        latency: the report's ``latency`` section; uses ``ort`` and ``effc`` (each with ``median_ms`` and
            ``p25_ms``/``p75_ms``, else ``min_ms``), ``threads`` and ``baseline`` (which model onnxruntime ran,
            shown under its bar).

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
        lows.append(max(0.0, median - float(entry.get("p25_ms", entry.get("min_ms", median)))))
        highs.append(max(0.0, float(entry.get("p75_ms", median)) - median))
    if not labels:
        return False
    fig = _figure(4.5, 3.2)
    ax = fig.add_subplot()
    bars = ax.bar(labels, medians, color=["#7f7f7f", "#1f77b4"][: len(labels)], yerr=[lows, highs], capsize=6)
    # the value inside the bar, clear of the whiskers
    ax.bar_label(bars, labels=[f"{m:.3g} ms" for m in medians], label_type="center", color="white")
    ax.set_ylabel("latency per inference (ms)")
    threads = latency.get("threads")
    ax.set_title(f"median latency{f', {threads} thread(s)' if threads else ''} (whiskers: 25th..75th percentile)",
                 fontsize=9)
    ax.set_ylim(0, max(m + h for m, h in zip(medians, highs, strict=True)) * 1.25 or 1.0)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


ERROR_MEASURES: dict[str, str] = {
    "rel_output_error": "relative output error ||X(W - W')|| / ||XW|| (lower is better)",
    "sqnr_db": "weight SQNR, dB (higher is better)",
}
"""Per-layer error columns that passes record (prune, nm-sparsity: relative output error on the calibration
activations; block-quant: signal-to-quantization-noise ratio of the weight), with their axis labels. When any table
has one, ``layers.png`` plots those error columns only."""

_TELLING = ("error", "cosine", "loss", "speedup", "sparsity")
"""Column name parts that say most about a layer (preferred for the plot over sizes and counts)."""


def _numeric(rows: Sequence[tuple[str, dict[str, Any]]], column: str) -> list[tuple[str, float]]:
    values = [(n, vals.get(column)) for n, vals in rows]
    return [(n, float(v)) for n, v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _plot_column(columns: Sequence[str], rows: Sequence[tuple[str, dict[str, Any]]]):
    """``(column, [(layer, value)])`` to draw: a column whose values differ between layers, preferring errors."""
    numeric = [(c, v) for c in columns if (v := _numeric(rows, c))]
    errors = [c for c in numeric if c[0] in ERROR_MEASURES]
    varying = [c for c in numeric if len({v for _, v in c[1]}) > 1]
    telling = [c for c in varying if any(part in c[0] for part in _TELLING)]
    return (errors or telling or varying or numeric or [None])[0]


def _short_names(names: Sequence[str], width: int = 44) -> list[str]:
    """Names without the leading path they all share, at most ``width`` characters.

    ``encoder.encoder.layer.0.attention.self.query`` among its siblings becomes ``layer.0.attention.self.query``
    (the container of numbered layers stays); what
    stays too long is cut from the left (the end of a module path is what differs).
    """
    split = [re.split(r"(?<=[./])", n) for n in names]
    common = 0
    if len(split) > 1:
        while all(len(p) > common + 1 and p[common] == split[0][common] for p in split):
            common += 1
    if common and any(p[common][:1].isdigit() for p in split):
        common -= 1  # keep the container of numbered layers: "layer.0.attention", not "0.attention"
    out = ["".join(p[common:]) for p in split]
    return [n if len(n) <= width else "…" + n[-(width - 1):] for n in out]


def _tick(value: float, _pos: Any = None) -> str:
    """Axis numbers people read: ``12 M`` rather than a bare ``1e7`` offset, ``0.031`` for small errors."""
    for factor, prefix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{prefix}"
    return f"{value:.3g}"


def layers_plot(path: Path, tables: Sequence[tuple[str, list[str], list[tuple[str, dict[str, Any]]]]]) -> bool:
    """One horizontal bar panel per per-layer table, showing one numeric column against readable layer names.

    When a table records a per-layer error (:data:`ERROR_MEASURES`), the plot shows the error columns only, one
    panel per pass that recorded one, with the axis saying what the number is and which way is better; layers
    whose error was not measured are left out and counted in the title. Otherwise the column drawn is the first
    whose values differ between layers, preferring error/cosine/loss/speed-up/sparsity columns (a column equal for
    every layer says nothing as a bar chart); else the first numeric one. Axis numbers carry k/M/G, never a bare
    exponent offset.

    Args:
        path: the PNG file to write.
        tables: ``(title, columns, rows)`` with rows ``(layer name, {column: value})`` as built by
            :func:`effc.eval.report.readable_tables`; at most 4 panels are drawn.

    Returns:
        True when the file was written, False when no table has a numeric column.
    """
    chosen = [(title, rows, _plot_column(columns, rows)) for title, columns, rows in tables]
    chosen = [c for c in chosen if c[2] is not None]
    if any(column in ERROR_MEASURES for _, _, (column, _) in chosen):
        chosen = [c for c in chosen if c[2][0] in ERROR_MEASURES]
    panels = []
    for title, rows, (column, values) in chosen[:4]:
        missing = len(rows) - len(values)
        note = f"; {missing} layer(s) not measured" if missing and column in ERROR_MEASURES else ""
        panels.append((f"{title}{note}", ERROR_MEASURES.get(column, column), values[:MAX_BARS]))
    if not panels:
        return False
    heights = [max(2.2, 0.2 * len(values) + 1.3) for _, _, values in panels]
    fig = _figure(8.0, sum(heights))
    grid = fig.add_gridspec(len(panels), 1, height_ratios=heights)
    from matplotlib.ticker import FuncFormatter

    for k, (title, xlabel, values) in enumerate(panels):
        ax = fig.add_subplot(grid[k])
        ax.barh(range(len(values)), [v for _, v in values], color="#1f77b4")
        ax.set_yticks(range(len(values)), _short_names([n for n, _ in values]), fontsize=6)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.xaxis.set_major_formatter(FuncFormatter(_tick))
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True
