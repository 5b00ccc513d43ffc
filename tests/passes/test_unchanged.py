"""Lossy passes that change nothing warn (an error with strict); errors never measured read None, not 0."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from effc.errors import PassError
from effc.eval.report import render_markdown
from effc.ir.calibration import Calibration
from effc.passes import PassManager, parse_pipeline
from effc.passes.structured.layers import relative_output_error
from tests.passes.test_prune import conv_model, mlp


def test_prune_matching_no_layer_warns_with_the_reasons(caplog):
    with caplog.at_level(logging.WARNING, logger="effc.passes.manager"):
        result = PassManager(parse_pipeline("prune(include=zzz*)")).run(mlp())
    (record,) = result.records
    assert not record.modified
    assert record.warnings == ["pass 'prune(include=[zzz*])' changed nothing: no weight changed "
                               "(3 layer(s) skipped: 3x not matched by include)"]
    assert "changed nothing" in caplog.text and "--strict makes this an error" in caplog.text


def test_strict_makes_a_no_op_pass_an_error():
    with pytest.raises(PassError, match=r"changed nothing: no weight changed.*\(--strict\); fix: check"):
        PassManager(parse_pipeline("prune(include=zzz*)"), strict=True).run(mlp())


def test_exact_passes_and_passes_that_changed_something_do_not_warn():
    result = PassManager(parse_pipeline("cleanup,prune(sparsity=0.5,min_params=0)"), strict=True).run(mlp())
    assert [r.warnings for r in result.records] == [[], []]


def test_block_quant_skipping_every_layer_names_the_block_size_and_the_fix():
    # mlp's reduction axes are 64, 48 and 16: with block_size=128 none is a multiple
    result = PassManager(parse_pipeline("block-quant(block_size=128,min_params=0)")).run(mlp())
    (warning,) = result.records[0].warnings
    assert "3 layer(s) skipped: 3x blocked axis N not a multiple of block_size" in warning
    with pytest.raises(PassError, match=r"round_to=32"):
        PassManager(parse_pipeline("block-quant(block_size=128,min_params=0)"), strict=True).run(mlp())


def test_prune_on_conv_reports_its_error_as_not_measured():
    x = np.random.default_rng(0).standard_normal((2, 8, 5, 5)).astype(np.float32)
    cal = Calibration([{"x": x}], source="test")
    result = PassManager(parse_pipeline("prune(sparsity=0.5,min_params=0)", calibration=cal)).run(conv_model())
    stats = result.records[0].stats
    assert stats["layers"]["w"]["rel_output_error"] is None
    assert stats["max_rel_output_error"] is None  # never measured, so not 0
    text = render_markdown({"passes": [result.records[0].to_dict()]})
    assert "max_rel_output_error: not measured" in text


def test_relative_output_error_from_xtx_matches_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 12))
    w = rng.standard_normal((6, 12))
    new = np.where(np.abs(w) > 0.7, w, 0.0)
    direct = np.linalg.norm(x @ (w - new).T) / np.linalg.norm(x @ w.T)
    assert relative_output_error(w, new, x.T @ x) == pytest.approx(direct, rel=1e-9)
    assert relative_output_error(w, w, x.T @ x) == 0.0


def test_nm_sparsity_records_the_error_it_measured():
    rng = np.random.default_rng(1)
    cal = Calibration([{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(2)], source="test")
    result = PassManager(parse_pipeline("nm-sparsity(n=2,m=4,layers=all)", calibration=cal)).run(mlp())
    errors = [r["rel_output_error"] for r in result.records[0].stats["layers"]]
    assert errors and all(0.05 < e < 1.0 for e in errors), errors


def test_a_pass_asked_to_change_nothing_says_so():
    (record,) = PassManager(parse_pipeline("prune(sparsity=0,min_params=0)")).run(mlp()).records
    assert record.warnings == ["pass 'prune(sparsity=0.0,min_params=0)' changed nothing: no weight changed (no layer "
                               "was skipped either: check the options that set how much changes)"]


def test_block_quant_after_prune_structured_on_ppocr_cls_explains_the_zero_layers():
    """The issue's case: channel counts left by prune-structured (e.g. 140, 73) are no multiple of the block size,
    so block-quant has nothing to quantize; the warning says so and names round_to; with round_to=32 it works."""
    from effc import zoo

    entry = zoo.get("zoo:ppocr-cls")
    cal = Calibration(entry.samples("calibration", 2), source="zoo")
    text = "prune-structured(ratio=0.3),block-quant"
    records = PassManager(parse_pipeline(text, calibration=cal)).run(entry.load()).records
    assert records[0].modified and not records[1].modified
    (warning,) = records[1].warnings
    assert "blocked axis N not a multiple of block_size" in warning
    with pytest.raises(PassError, match=r"prune-structured\(round_to=32\)"):
        PassManager(parse_pipeline(text, calibration=cal), strict=True).run(entry.load())
    rounded = PassManager(parse_pipeline("prune-structured(ratio=0.3,round_to=32),block-quant", calibration=cal),
                          strict=True).run(entry.load()).records
    assert rounded[1].modified and len(rounded[1].stats["layers"]) >= 3
