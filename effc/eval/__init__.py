"""effc.eval: fidelity metrics, size and MAC accounting, latency measurement, reports (JSON, Markdown, PNG).

Flat exports of the public functions; matplotlib and onnxruntime are imported only when a plot is drawn or a
session is timed.
"""

from effc.eval.cost import count_macs, param_bytes, param_count, register_mac_counter, sparsity_stats, static_shape
from effc.eval.fidelity import compare
from effc.eval.latency import measure, measure_interleaved, ort_latency, paired_latency
from effc.eval.report import summary_rows, write_report

__all__ = [
    "compare",
    "count_macs",
    "measure",
    "measure_interleaved",
    "ort_latency",
    "paired_latency",
    "param_bytes",
    "param_count",
    "register_mac_counter",
    "sparsity_stats",
    "static_shape",
    "summary_rows",
    "write_report",
]
