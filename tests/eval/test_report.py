import json

import numpy as np
import pytest

from effc.eval.fidelity import compare
from effc.eval.latency import BASELINE_ORIGINAL, BASELINE_REWRITTEN
from effc.eval.report import (
    NOT_MEASURED,
    latency_baseline,
    render_markdown,
    summary_rows,
    to_jsonable,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def full_report():
    ref = [[np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)]]
    cand = [[np.array([[0.2, 0.8], [0.1, 0.9]], np.float32)]]
    fid = compare(ref, cand, ["logits"])
    return {
        "model": {"name": "tiny-mlp", "source": "/models/tiny.onnx"},
        "target": {"name": "cpu", "options": {"threads": 1},
                   "info": {"tvm_target": "llvm -mcpu=znver3", "kernels": {"fused_matmul_add": "dense_avx2"}}},
        "pipeline": "prune(sparsity=0.5)",
        "passes": [{"name": "prune", "text": "prune(sparsity=0.5)", "seconds": np.float64(0.125), "modified": True,
                    "stats": {"sparsity": 0.5, "per_layer": {"fc1": 0.4, "fc2": 0.6},
                              "errors": {"fc1": {"rel_l2": 0.01, "cosine": 0.99}}}}],
        "inputs": {"description": "random normal x", "synthetic": True, "count": np.int64(1)},
        "fidelity": {"vs_original": fid, "compiled_vs_rewritten": fid},
        "cost": {"params_bytes_before": 4_194_304, "params_bytes_after": 1_048_576,
                 "macs_before": {"total": 2_000_000, "by_op": {"MatMul": 2_000_000}}, "macs_after": 1_000_000},
        "latency": {"threads": 1, "ort": {"median_ms": 4.0, "min_ms": 3.5, "mean_ms": 4.2, "max_ms": 5.0, "runs": 20},
                    "effc": {"median_ms": 2.0, "min_ms": 1.9, "mean_ms": 2.1, "max_ms": 2.5, "runs": 20}},
        "compile_seconds": 12.5,
        "build_seconds": 10.25,
    }


def test_write_report_full(tmp_path, full_report):
    files = write_report(tmp_path / "out", full_report)
    assert files == ["report.json", "report.md", "latency.png", "layers.png"]
    for png in ("latency.png", "layers.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == PNG_MAGIC
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["passes"][0]["seconds"] == 0.125 and data["inputs"]["count"] == 1
    assert data["fidelity"]["vs_original"]["outputs"]["logits"]["top1_agreement"] == 0.5
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# effc report: tiny-mlp → cpu")
    assert "**synthetic**" in md and "random normal x" in md
    assert "4.19 MB → 1.05 MB (×4.00 smaller)" in md
    assert "2 M → 1 M (×2.00 smaller)" in md and "4,194,304" in md
    assert "onnxruntime (original model) 4.000 ms / effc 2.000 ms (ratio 0.50: 2.00× faster), 1 thread(s)" in md
    assert "onnxruntime ran the original model (before the passes)" in md
    assert data["latency"]["baseline"] == "original model"  # written into report.json when the caller gave none
    assert "top-1 50.0%" in md and "12.50 s (target build 10.25 s)" in md
    assert "### compiled artifact vs original model (onnxruntime)" in md
    assert "| 50.0% | – |" in md  # top-1 as a percentage (was "0.5")
    assert "| fused_matmul_add | dense_avx2 |" in md
    assert "| fc2 | 0.6 |" in md and "| fc1 | 0.01 | 0.99 |" in md  # per-layer tables from pass stats
    assert "![latency](latency.png)" in md and NOT_MEASURED not in md


def test_missing_sections_say_not_measured(tmp_path):
    report = {"model": {"name": "m"}, "target": {"name": "cortex-m4"},
              "inputs": {"description": "3 real samples", "synthetic": False, "count": 3}}
    files = write_report(tmp_path, report)
    assert files == ["report.json", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert md.count(NOT_MEASURED) >= 5 and "**synthetic**" not in md
    assert dict(summary_rows(report))["Latency (median)"] == NOT_MEASURED


def test_summary_rows(full_report):
    rows = dict(summary_rows(full_report))
    assert list(rows)[:2] == ["Fidelity vs original (onnxruntime)", "Fidelity compiled vs rewritten"]
    # cosine of the flattened (2, 2) scores: 1.0 / 1.5
    assert rows["Fidelity vs original (onnxruntime)"] == "cosine 0.666667, max |Δ| 0.7, top-1 50.0% (1 sample(s))"
    assert rows["Parameters"] == "4.19 MB → 1.05 MB (×4.00 smaller)"
    assert "Fidelity rewritten vs original (passes)" not in rows
    full_report["latency"]["ratio"] = 1.5  # an explicit ratio (effc / onnxruntime) wins
    full_report["fidelity"]["rewritten_vs_original"] = full_report["fidelity"]["vs_original"]
    rows = summary_rows(full_report)
    assert "(ratio 1.50: 1.50× slower)" in dict(rows)["Latency (median)"]
    assert rows[1][0] == "Fidelity rewritten vs original (passes)"


def test_jsonable_handles_numpy_and_nonfinite():
    data = to_jsonable({"a": np.float32(1.5), "b": np.arange(3), "c": (1, {2}), "d": float("nan"), 3: np.bool_(True)})
    assert data == {"a": 1.5, "b": [0, 1, 2], "c": [1, [2]], "d": "nan", "3": True}
    json.dumps(data, allow_nan=False)
    assert "nan" in render_markdown({"model": {"name": "m"}, "fidelity": {"vs_original": {
        "samples": 1, "outputs": {}, "summary": {"max_abs": "nan", "cosine": "nan"}}}})


def test_weight_sparsity_row_only_after_a_modifying_pass():
    # an unpruned model's natural zeros (ppocr-det: 0.1%) read as if a pass had bought them
    total = {"elements": 1000, "zeros": 1, "sparsity": 0.001}
    report = {"model": {"name": "m"}, "cost": {"sparsity": {"total": total}}, "passes": []}
    assert "Weight sparsity" not in dict(summary_rows(report))
    report["passes"] = [{"name": "prune", "text": "prune", "seconds": 0.1, "modified": True, "stats": {}}]
    assert dict(summary_rows(report))["Weight sparsity"].startswith("0.1% zeros")


def test_weight_sparsity_row_hidden_for_packed_nm():
    # nm-sparsity packs the kept values: 3 stray zeros in 17 M stored weights are not "what the pass bought"
    total = {"elements": 17_100_000, "zeros": 3, "sparsity": 3 / 17_100_000}
    report = {"model": {"name": "m"}, "cost": {"sparsity": {"total": total}},
              "passes": [{"name": "nm-sparsity", "text": "nm-sparsity", "seconds": 0.1, "modified": True, "stats": {}}]}
    assert "Weight sparsity" not in dict(summary_rows(report))


@pytest.mark.parametrize(("where", "baseline"), [("top", BASELINE_REWRITTEN), ("ort", BASELINE_REWRITTEN),
                                                 ("ort", BASELINE_ORIGINAL), (None, BASELINE_ORIGINAL)])
def test_latency_label_names_the_baseline(tmp_path, full_report, where, baseline):
    # effc compile times onnxruntime on the original model, effc eval on the rewritten model.onnx
    latency = full_report["latency"]
    if where == "top":
        latency["baseline"] = baseline
    elif where == "ort":
        latency["ort"]["baseline"] = baseline  # as paired_latency(..., baseline=...) records it
    label = f"onnxruntime ({baseline}) 4.000 ms / effc 2.000 ms"
    assert latency_baseline(latency) == baseline
    assert dict(summary_rows(full_report))["Latency (median)"].startswith(label)
    write_report(tmp_path, full_report)
    md = (tmp_path / "report.md").read_text()
    assert label in md and f"| onnxruntime ({baseline}) | 4.000 | – | – | 3.500 | 4.200 | 20 |" in md
    assert ("the ratio is what the compiler bought alone" in md) == (baseline == BASELINE_REWRITTEN)
    assert json.loads((tmp_path / "report.json").read_text())["latency"]["baseline"] == baseline
    assert "baseline" not in latency or where == "top"  # the caller's dict is not modified


def test_sparsity_row_separates_sparse_tensors_and_sizes_say_unchanged():
    # prune(sparsity=0.5) on MiniLM: 50% in the 36 linear weights, 23.7% over all weights (embedding tables dense)
    sparse = {"tensors": 36, "elements": 10_616_832, "zeros": 5_308_416, "sparsity": 0.5}
    total = {"elements": 22_387_200, "zeros": 5_308_419, "sparsity": 5_308_419 / 22_387_200, "tensors": 39,
             "literal_zeros": 5_308_419, "packed_zeros": 0, "sparse_tensors": sparse}
    report = {"model": {"name": "m"}, "passes": [{"name": "prune", "modified": True, "stats": {}}],
              "cost": {"sparsity": {"total": total}, "params_bytes_before": 1000, "params_bytes_after": 1000,
                       "macs_before": 10, "macs_after": 20}}
    rows = dict(summary_rows(report))
    assert rows["Weight sparsity"] == ("23.7% zeros (5.31 M of 22.4 M weight elements in 39 tensors); 50.0% in the 36 "
                                       "sparse tensor(s) (≥ 1% zeros; the rest stay dense); 5.31 M stored as literal "
                                       "zeros (no byte or MAC saving)")
    assert rows["Parameters"] == "1 kB (unchanged)" and rows["MACs"] == "10 → 20 (×2.00 larger)"
    report["cost"].update(params_bytes_before=539_000_000, params_bytes_after=538_000_000)
    assert dict(summary_rows(report))["Parameters"] == "539 MB → 538 MB (0.19% smaller)"  # not "×1.00 smaller"


def test_named_records_become_tables_and_fractions_read_as_percent():
    # nm-sparsity's layers/skipped are lists of records; they were shown only as "layers: 2 entries"
    layers = [{"name": "mm1", "shape": [8, 16], "kept": 0.5, "kind": "ffn", "dense_bytes": 512_000},
              {"name": "mm2", "shape": [16, 8], "kept": 0.25, "kind": "ffn", "dense_bytes": 512}]
    op = {"shape": [4, 16, 8], "n": 2, "m": 4, "form": "packed"}
    report = {"model": {"name": "m"}, "target": {"name": "cpu", "info": {"effc_ops": [op, dict(op), {**op, "n": 1}]}},
              "passes": [{"name": "nm-sparsity", "modified": True,
                          "stats": {"layers": layers, "skipped": [{"name": "mm3", "reason": "Gemm is not packed"}],
                                    "sparsity": 0.5, "weight_bytes_after": 21_897_216}}]}
    md = render_markdown(report)
    assert "| mm1 | 8×16 | 50.0% | ffn | 512,000 |" in md and "| mm2 | 16×8 | 25.0% | ffn | 512 |" in md
    assert "### nm-sparsity / skipped" in md and "| mm3 | Gemm is not packed |" in md
    assert "sparsity=50.0%, weight_bytes_after=21,897,216" in md
    # effc operators: identical entries collapse into one row with their node count
    assert "| 2 | 4×16×8 | 2 | 4 | packed |" in md and "| 1 | 4×16×8 | 1 | 4 | packed |" in md


def test_layers_plot_draws_a_column_that_differs_between_layers():
    from effc.eval.plots import _plot_column

    # prune's layers: shared_by is 1 for every layer (a useless bar chart); the output error is what differs
    rows = [("a", {"shared_by": 1, "params": 100, "sparsity": 0.5, "rel_output_error": 0.08}),
            ("b", {"shared_by": 1, "params": 400, "sparsity": 0.5, "rel_output_error": 0.19})]
    assert _plot_column(["shared_by", "params", "sparsity", "rel_output_error"], rows)[0] == "rel_output_error"
    assert _plot_column(["shared_by", "params"], rows) == ("params", [("a", 100.0), ("b", 400.0)])
    assert _plot_column(["shared_by"], rows)[0] == "shared_by" and _plot_column(["x"], rows) is None


def test_layers_plot_shows_error_measures_against_readable_names(tmp_path, monkeypatch):
    from effc.eval import plots
    from effc.eval.report import readable_tables

    report = {
        "layer_names": {"val_1": "encoder.layer.0.attention.self.query", "val_2": "encoder.layer.0.output.dense"},
        "passes": [
            {"name": "prune", "stats": {"layers": {
                "val_1": {"params": 10_000_000, "sparsity": 0.3, "rel_output_error": 0.05},
                "val_2": {"params": 20_000_000, "sparsity": 0.3, "rel_output_error": None}}}},
            {"name": "block-quant", "stats": {"layers": {
                "val_1": {"params": 10_000_000, "sqnr_db": 31.5}, "val_2": {"params": 20_000_000, "sqnr_db": 28.0}}}},
        ],
        "cost": {"sparsity": {"tensors": {"val_1": {"sparsity": 0.3, "zeros": 3, "elements": 10}}}},
    }
    monkeypatch.setattr(plots, "_figure", _real_figure)  # keeps the figure for the checks below
    tables = readable_tables(report)
    assert tables[0][2][0][0] == "encoder.layer.0.attention.self.query"
    assert plots.layers_plot(tmp_path / "layers.png", tables)
    fig = _LAST[0]
    titles = [ax.get_title() for ax in fig.axes]
    # only the error measures: the constant sparsity and the weight-sparsity table are not drawn
    assert titles == ["prune / layers; 1 layer(s) not measured", "block-quant / layers"]
    assert [ax.get_xlabel() for ax in fig.axes] == [plots.ERROR_MEASURES["rel_output_error"],
                                                     plots.ERROR_MEASURES["sqnr_db"]]
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    assert labels == ["attention.self.query", "output.dense"]  # the shared "encoder.layer.0." is dropped
    assert _short_names_of(["encoder.layer.0.output", "encoder.layer.1.output"]) == ["layer.0.output",
                                                                                     "layer.1.output"]


_LAST: list = []


def _short_names_of(names):
    from effc.eval.plots import _short_names

    return _short_names(names)


def _real_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    _LAST[:] = [fig]
    return fig


def test_plot_ticks_are_readable_numbers():
    from effc.eval.plots import _short_names, _tick

    assert [_tick(v) for v in (1e7, 2.5e9, 1500, 0.0312, 0)] == ["10 M", "2.5 G", "1.5 k", "0.0312", "0"]
    assert _short_names(["a.b.c", "a.b.d"]) == ["c", "d"] and _short_names(["only.one"]) == ["only.one"]
    assert _short_names(["x" * 60])[0].startswith("…") and len(_short_names(["x" * 60])[0]) == 44


def test_latency_quartiles_are_recorded():
    from effc.eval.latency import _stats

    stats = _stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (stats["p25_ms"], stats["median_ms"], stats["p75_ms"], stats["max_ms"]) == (2.0, 3.0, 4.0, 100.0)
    assert _stats([5.0])["p25_ms"] == _stats([5.0])["p75_ms"] == 5.0
