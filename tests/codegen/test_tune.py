"""Tuned CPU mode (--tune N): budget validation, kernel picking, database reuse, tuned compile vs onnxruntime."""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from tvm import te
from tvm.s_tir import meta_schedule as ms

import effc
import effc.runtime
from effc.cli import cli
from effc.codegen import tune
from effc.errors import EffcError, TargetError

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()), "num-cores": 2})


@pytest.fixture
def matmul_add(tmp_path):
    """A single MatMul + Add: one fused GEMM kernel, (32, 64) @ (64, 96) + (96,)."""
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal((64, 96)).astype("float32"), "W"),
               numpy_helper.from_array(rng.standard_normal(96).astype("float32"), "B")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 96])], weights)
    path = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("bad", [-1, "abc", 2.5])
def test_bad_budget_raises_before_any_work(bad, matmul_add, tmp_path):
    with pytest.raises(EffcError, match="trial count"):
        effc.compile(str(matmul_add), out_dir=tmp_path / "out", tune=bad, measure_latency=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_budget_and_timeout_in_options():
    assert tune.check_trials(None) == 0 and tune.check_trials("64") == 64
    with pytest.raises(TargetError, match="tune_build_timeout"):
        tune.check_build_timeout("0")
    assert tune.check_build_timeout("90") == 90.0


def test_cli_rejects_negative_tune(matmul_add, tmp_path):
    result = CliRunner().invoke(cli, ["compile", str(matmul_add), "-o", str(tmp_path / "o"), "--tune", "-3"])
    assert result.exit_code != 0 and "--tune" in result.output


def test_database_dir_is_keyed_by_tvm_cpu_and_cores(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path))
    folder = tune.database_dir(TARGET)
    assert folder.parent.parent == tmp_path / "metaschedule"
    assert folder.parent.name == f"tvm-{tvm.__version__}" and folder.name.endswith("-2c")


def _gemm(m, k, n):
    a, w = te.placeholder((m, k), name="A"), te.placeholder((k, n), name="W")
    r = te.reduce_axis((0, k), name="r")
    return te.create_prim_func([a, w, te.compute((m, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r))])


def test_picks_the_heaviest_float_kernels_within_the_budget():
    ids = te.placeholder((8,), name="ids", dtype="int64")
    table = te.placeholder((100, 16), name="table")
    gather = te.create_prim_func([ids, table, te.compute((8, 16), lambda i, j: table[ids[i], j])])
    mod = tvm.IRModule({"big": _gemm(128, 256, 256), "small": _gemm(8, 16, 16), "gather": gather})
    groups = tune._group_kernels(mod)
    assert [g.names for _, g in groups] == [["big"], ["small"]]  # integer-input kernels are never tuned
    assert groups[0][1].flops == pytest.approx(2 * 128 * 256 * 256, rel=0.01)
    assert [g.names for _, g in tune._pick(groups, 16)] == [["big"]]  # 16 trials: one kernel
    assert [g.names for _, g in tune._pick(groups, 1000)] == [["big"]]  # "big" alone holds > 90 % of the FLOPs


def _commit_records(database, func, count: int) -> None:
    """``count`` measured-trial records of ``func`` (one schedule, run time as MetaSchedule stores a failure)."""
    workload = database.commit_workload(tune._workload(func))
    trace = tvm.s_tir.Schedule(tune._workload(func)).trace
    for _ in range(count):
        database.commit_tuning_record(ms.database.TuningRecord(
            trace, workload, [1e10], TARGET, ms.arg_info.ArgInfo.from_prim_func(func)))


def test_plan_tops_each_kernel_up_to_its_quota(tmp_path):
    database = ms.database.JSONDatabase(str(tmp_path / "w.json"), str(tmp_path / "r.json"), allow_missing=True)
    fresh, measured, exhausted, done = _gemm(8, 16, 16), _gemm(8, 16, 32), _gemm(8, 32, 16), _gemm(16, 16, 16)
    _commit_records(database, measured, 3)  # e.g. an earlier --tune 3, or an interrupted run that measured 3
    _commit_records(database, exhausted, 2)  # its search ran out of candidates after 2 of the 8 trials asked
    _commit_records(database, done, 9)
    budgets = tune._Budgets(tmp_path / "budgets.json")
    budgets.data[tune._key(exhausted)] = 8
    picked = [(f, tune.KernelChoice([name], 1, 1.0)) for f, name in
              [(fresh, "fresh"), (measured, "measured"), (exhausted, "exhausted"), (done, "done")]]

    todo = tune._plan(picked, 8, database, budgets)
    assert [(group.names[0], missing) for _, group, missing in todo] == [("fresh", 8), ("measured", 5)]
    assert [group.trials for _, group in picked] == [0, 3, 2, 9]
    assert [(g.names[0], m) for _, g, m in tune._plan(picked, 12, database, budgets)] == [
        ("fresh", 12), ("measured", 9), ("exhausted", 4), ("done", 3)]
    assert [(g.names[0], m) for _, g, m in tune._plan(picked, 2, database, budgets)] == [("fresh", 2)]


def test_plan_and_progress_are_logged_at_info(caplog):
    todo = [(None, tune.KernelChoice(["fused_matmul"], 1, 1.0), 48), (None, tune.KernelChoice(["conv"], 1, 1.0), 16)]
    with caplog.at_level(logging.INFO, logger="effc.codegen.tune"):
        tune._log_plan(todo, todo, 48, tune.database_dir(TARGET))
        advance = tune._log_progress(64)
        advance(32)  # not yet PROGRESS_LOG_S seconds: no line
        advance(32)  # the last trial: one line
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    low, high = (2 * tune.STARTUP_SECONDS + 64 * s for s in tune.TRIAL_SECONDS)
    assert lines[0].startswith("tuning 2 of 2 kernel(s) up to 48 MetaSchedule trials each: 64 new trial(s), about "
                               f"{low / 60:.0f} min to {high / 60:.0f} min")
    assert len(lines) == 2 and lines[1].startswith("tuning: 64 of 64 trials measured")


@pytest.mark.slow
def test_tuned_compile_caches_database_and_tops_it_up(matmul_add, tmp_path, monkeypatch, capsys, caplog):
    """--tune 2, then --tune 4: exactly 2 more trials (not 4); --tune 2 again: none, the best record is reused."""
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path / "cache"))
    x = np.random.default_rng(1).standard_normal((32, 64)).astype("float32")
    (expected,) = ort.InferenceSession(str(matmul_add)).run(None, {"x": x})

    with caplog.at_level(logging.INFO, logger="effc.codegen.tune"):
        first = effc.compile(str(matmul_add), out_dir=tmp_path / "a", tune=2, threads=2, measure_latency=False)
    assert "TaskScheduler" not in capsys.readouterr().out  # MetaSchedule's scheduler log stays off stdout
    assert "up to 2 MetaSchedule trials each: 2 new trial(s), about" in caplog.text  # the plan line, no TTY here
    tuning = first.manifest["target"]["info"]["tuning"]
    folder = tune.database_dir(TARGET)
    records = folder / "database_tuning_record.json"
    assert tuning["cache"] == str(folder) and tuning["trials_run"] == 2
    assert len(records.read_text().splitlines()) == 2
    assert list(json.loads((folder / "budgets.json").read_text()).values()) == [2]
    ((name, kernel),) = tuning["kernels"].items()
    assert kernel["trials"] == 2 and f"kernel {name}: tuned" in caplog.text
    assert kernel["choice"] in ("tuned", "template") and kernel["template_ms"] > 0 and kernel["tuned_ms"] > 0
    assert "Tuning (MetaSchedule)" in (first.out_dir / "report.md").read_text()

    # Second compile, from the CLI, with --tune 4: the 2 missing trials only. Pretend the tuned schedule measured
    # faster so it is compiled.
    monkeypatch.setattr(tune, "compare_ms", lambda funcs, *a, **k: [1.0, 0.5])
    args = ["compile", str(matmul_add), "-o", str(tmp_path / "b"), "--tune", "4", "--threads", "2", "--no-latency"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "TaskScheduler" not in result.output  # a second tuning in the same process stays off stdout too
    assert "Tuning" in result.output  # the summary row (the table wraps its text at the terminal width)
    assert "4 trials budget, 2 run now; 1 of 1 tuned kernel(s) kept" in (tmp_path / "b" / "report.md").read_text()
    info = effc.runtime.load(tmp_path / "b").manifest["target"]["info"]
    assert info["tuning"]["trials_run"] == 2 and info["tuning"]["kernels"][name]["trials"] == 4
    assert len(records.read_text().splitlines()) == 4
    assert list(json.loads((folder / "budgets.json").read_text()).values()) == [4]
    assert list(info["kernels"].values()) == ["tuned"]
    (got,) = effc.runtime.load(tmp_path / "b").run({"x": x})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)

    # --tune 2 again: no trials. A stored record that fails to build or run now: the template is kept and the
    # compile goes on.
    def broken(*args, **kwargs):
        raise RuntimeError("does not build")

    monkeypatch.setattr(tune, "compare_ms", broken)
    database = records.read_text()
    third = effc.compile(str(matmul_add), out_dir=tmp_path / "c", tune=2, threads=2, measure_latency=False)
    info = third.manifest["target"]["info"]
    assert info["tuning"]["trials_run"] == 0 and records.read_text() == database
    assert [k["choice"] for k in info["tuning"]["kernels"].values()] == ["template (tuned failed)"]
    assert "tuned" not in info["kernels"].values()
