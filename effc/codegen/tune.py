"""Tuned CPU mode (``--tune N``): MetaSchedule searches schedules for the heaviest fused kernels.

The default CPU path schedules every fused PrimFunc with effc's templates (:mod:`effc.codegen.schedules`). With a
trial budget ``N > 0``, :func:`tune_module` runs before the templates:

1. picks the kernels worth tuning: float-only kernels (integer inputs such as gather indices would be filled with
   random values by the measuring runner and could read out of bounds), ranked by estimated FLOPs × call count,
   the smallest set covering :data:`FLOP_SHARE` of the module's FLOPs, at most ``N // MIN_TRIALS_PER_TASK`` kernels;
2. tunes those the database has not yet seen with at least their share of ``N`` trials (MetaSchedule's gradient
   task scheduler, evolutionary search, XGBoost cost model when ``xgboost`` is installed, else a random one);
3. for each picked kernel with a tuning record, times the template's schedule and the tuned one in this process
   on the same random inputs (interleaved, min of several repeats) and keeps the faster; kernels without a record,
   or where the template wins, keep the template.

The database (MetaSchedule's JSON database plus ``budgets.json``, the trials already asked per workload) lives in
``$EFFC_CACHE_DIR/metaschedule/tvm-<version>/<mcpu>-<cores>c`` (default cache: ``platformdirs.user_cache_dir``),
so a second compile with the same ``N`` runs no trials and a larger ``N`` tunes further. Keys are structural hashes
of the kernels: any change of the graph, fusion or effc version that changes a kernel makes it a miss.

Source: Shao et al., "Tensor Program Optimization with Probabilistic Programs" (MetaSchedule), NeurIPS 2022. The
pitfalls handled here are measured in ``../shared/notes/cpu.md`` (builder timeout, xgboost/psutil, tvm-ffi pin).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.analysis import estimate_tir_flops

from effc.codegen import prepack
from effc.codegen.build import set_runtime_threads
from effc.codegen.schedules import schedule_kernel, tile_config
from effc.codegen.tune_worker import build_candidate, import_cpu_intrinsics, set_worker_threads
from effc.errors import TargetError
from effc.zoo import cache_dir

logger = logging.getLogger(__name__)

FLOP_SHARE = 0.9  # tune the heaviest kernels that together hold this fraction of the estimated FLOPs
MIN_TRIALS_PER_TASK = 16  # fewer trials than this per kernel rarely beats a template: tune fewer kernels instead
BUILD_TIMEOUT_S = 60.0  # default per-candidate build timeout (option tune_build_timeout)
RUN_TIMEOUT_S = 30.0
_SCHEDULED_ATTR = "tir.is_scheduled"  # what effc's "prescheduled" template looks for
_EXTRA_HINT = "install the tuning extra: pip install 'effc[tune]'"


@dataclasses.dataclass
class KernelChoice:
    """The tuning outcome of one kernel (all kernels with the same workload share it).

    Attributes:
        names: kernel (PrimFunc) names with this workload.
        calls: call sites of these kernels in the Relax functions.
        flops: estimated FLOPs of one call.
        template_ms: time of the template's schedule, ms (None when not measured).
        tuned_ms: time of the best tuning record's schedule, ms (None without a record).
        choice: ``"tuned"``, ``"template"`` (template measured faster) or ``"no record"``.
    """

    names: list[str]
    calls: int
    flops: float
    template_ms: float | None = None
    tuned_ms: float | None = None
    choice: str = "no record"


def check_trials(value: Any) -> int:
    """The trial budget from the ``tune`` option (None/0: off).

    Raises:
        TargetError: not a non-negative integer.
    """
    if value is None or value is False:
        return 0
    try:
        trials = int(value)
    except (TypeError, ValueError):
        trials = -1
    if trials < 0 or str(value).strip() != str(trials):
        raise TargetError(f"tune={value!r} is not a trial count >= 0", "pass --tune 0 (off) or e.g. --tune 64")
    return trials


def check_build_timeout(value: Any) -> float:
    """The per-candidate build timeout in seconds.

    Raises:
        TargetError: not a positive number.
    """
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not seconds > 0:
        raise TargetError(f"tune_build_timeout={value!r} is not a positive number of seconds",
                          "e.g. -O tune_build_timeout=60")
    return seconds


def database_dir(tvm_target: tvm.target.Target) -> Path:
    """The database folder for this TVM version, ``mcpu`` and core count (not created here)."""
    mcpu = str(tvm_target.attrs.get("mcpu", "generic"))
    cores = int(tvm_target.attrs.get("num-cores", 1))
    return cache_dir() / "metaschedule" / f"tvm-{tvm.__version__}" / f"{mcpu}-{cores}c"


def _workload(func: tvm.tirx.PrimFunc) -> tvm.IRModule:
    """One kernel as a module MetaSchedule can build and key: function ``main`` with its ``global_symbol``."""
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _call_counts(mod: tvm.IRModule) -> dict[str, int]:
    """``{PrimFunc name: call sites}`` over the Relax functions of ``mod``."""
    counts: dict[str, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.args[0] if expr.args else None, tvm.ir.GlobalVar):
            name = expr.args[0].name_hint
            counts[name] = counts.get(name, 0) + 1

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def _is_tunable(func: tvm.tirx.PrimFunc) -> bool:
    """Float-only kernels that no effc converter scheduled already."""
    attrs = func.attrs
    if attrs and (bool(attrs.get(_SCHEDULED_ATTR, False)) or bool(attrs.get("tirx.is_scheduled", False))):
        return False
    dtypes = {str(getattr(p.ty, "dtype", "handle")) for p in func.params}
    return bool(dtypes) and all(d.startswith(("float", "bfloat")) for d in dtypes)


def _group_kernels(mod: tvm.IRModule) -> list[tuple[tvm.tirx.PrimFunc, KernelChoice]]:
    """Tunable kernels grouped by workload (structural equality), heaviest (FLOPs × calls) first."""
    calls = _call_counts(mod)
    groups: list[tuple[tvm.tirx.PrimFunc, KernelChoice]] = []
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or not _is_tunable(func):
            continue
        same = next((g for f, g in groups if tvm_ffi.structural_equal(f, func)), None)
        if same is not None:
            same.names.append(gv.name_hint)
            same.calls += calls.get(gv.name_hint, 1)
            continue
        try:
            flops = float(estimate_tir_flops(_workload(func)))
        except Exception:  # noqa: BLE001  (the estimator refuses some loop nests; such kernels are not ranked)
            flops = 0.0
        groups.append((func, KernelChoice([gv.name_hint], calls.get(gv.name_hint, 1), flops)))
    groups.sort(key=lambda fg: fg[1].flops * fg[1].calls, reverse=True)
    return groups


def _pick(groups: list[tuple[tvm.tirx.PrimFunc, KernelChoice]], trials: int) -> list:
    """The heaviest groups covering :data:`FLOP_SHARE` of the FLOPs, at most ``trials // MIN_TRIALS_PER_TASK``."""
    total = sum(g.flops * g.calls for _, g in groups)
    limit = max(1, trials // MIN_TRIALS_PER_TASK)
    picked, covered = [], 0.0
    for func, group in groups:
        if len(picked) >= limit or (picked and total > 0 and covered >= FLOP_SHARE * total):
            break
        picked.append((func, group))
        covered += group.flops * group.calls
    return picked


def _key(func: tvm.tirx.PrimFunc) -> str:
    return f"{tvm_ffi.structural_hash(_workload(func)) & 0xFFFFFFFFFFFFFFFF:016x}"


class _Budgets:
    """``budgets.json``: the trial quota already asked for each workload key (so a rerun asks nothing)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            logger.warning("ignoring unreadable %s", path)
            self.data = {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        tmp.replace(self.path)


def _cost_model(threads: int) -> tuple[Any, str]:
    """The XGBoost cost model when ``xgboost`` imports, else MetaSchedule's random model.

    Without a cost model the evolutionary search still runs; it only ranks candidates at random before measuring.
    """
    if importlib.util.find_spec("xgboost") is not None:
        return ms.cost_model.XGBModel(num_tuning_cores=threads), "xgb"
    logger.warning("xgboost is not installed: tuning without a cost model (random ranking); %s", _EXTRA_HINT)
    return ms.cost_model.RandomModel(), "random (xgboost not installed)"


@tvm.ir.utils.derived_object
class _Progress(ms.measure_callback.PyMeasureCallback):
    """Counts measured candidates (and build/run failures) and advances a progress callback."""

    def __init__(self, advance: Any):
        super().__init__()
        self.advance = advance
        self.measured = 0
        self.errors: list[str] = []

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
        del task_scheduler, task_id, measure_candidates
        for built, ran in zip(builder_results, runner_results, strict=False):
            error = built.error_msg or ran.error_msg
            if error:
                logger.debug("tuning candidate failed: %s", error)
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                self.errors.append(" | ".join([lines[0], *lines[-2:]])[:300] if lines else "unknown error")
        self.measured += len(builder_results)
        self.advance(len(builder_results))


def _with_progress(total: int, description: str, work: Any) -> Any:
    """Run ``work(advance)`` under a rich progress bar on stderr (only when stderr is a terminal)."""
    if not sys.stderr.isatty():
        return work(lambda n: None)
    from rich.console import Console
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=Console(stderr=True), transient=True)
    try:
        bar.start()
    except LiveError:  # rich < 14 allows one live display: the caller's spinner already holds it
        return work(lambda n: None)
    try:
        task = bar.add_task(description, total=total)
        return work(lambda n: bar.advance(task, n))
    finally:
        bar.stop()


def _quiet_metaschedule() -> None:
    """Keep MetaSchedule's scheduler chatter off stdout (library code logs, never prints).

    MetaSchedule prints every scheduler step to stdout unless its logger has a level: this gives it WARNING (DEBUG
    when effc logs at DEBUG) unless the user set one.
    """
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:
        ms_logger.setLevel(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)


def _run_tuning(picked: list, quota: int, tvm_target: tvm.target.Target, database: Any, threads: int,
                build_timeout: float) -> tuple[int, str]:
    """Tune ``picked`` groups with ``quota`` trials each into ``database``; returns (trials measured, cost model).

    Raises:
        TargetError: every candidate failed (builder timeout: raise ``tune_build_timeout``), or MetaSchedule failed.
    """
    if importlib.util.find_spec("psutil") is None:
        raise TargetError("MetaSchedule's local builder/runner need psutil, which is not installed",
                          "reinstall effc (psutil is one of its dependencies) or pip install psutil")
    cost_model, cost_name = _cost_model(threads)
    import_cpu_intrinsics()
    with tempfile.TemporaryDirectory(prefix="effc-tune-") as work_dir:
        names = [group.names[0] for _, group in picked]
        _quiet_metaschedule()
        loggers = ms.logging.get_loggers_from_work_dir(work_dir, names)
        contexts = [
            ms.TuneContext(
                mod=_workload(func), target=tvm_target, space_generator="post-order-apply",
                search_strategy="evolutionary", task_name=name, logger=log, rand_state=seed, num_threads=threads,
            ).clone()
            for (func, _), name, log, seed in zip(picked, names, loggers, ms.utils.fork_seed(0, n=len(picked)),
                                                   strict=True)
        ]
        builder = ms.builder.LocalBuilder(max_workers=threads, timeout_sec=build_timeout, f_build=build_candidate)
        runner = ms.runner.LocalRunner(
            timeout_sec=RUN_TIMEOUT_S,
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40),
            initializer=functools.partial(set_worker_threads, threads),
        )

        def work(advance: Any) -> _Progress:
            progress = _Progress(advance)
            ms.tune_tasks(
                tasks=contexts, task_weights=[float(g.calls) for _, g in picked], work_dir=work_dir,
                max_trials_global=quota * len(picked), max_trials_per_task=quota,
                num_trials_per_iter=min(64, quota), builder=builder, runner=runner, database=database,
                cost_model=cost_model, measure_callbacks=[*ms.MeasureCallback.create("default"), progress],
            )
            return progress

        try:
            progress = _with_progress(quota * len(picked), f"tuning {len(picked)} kernel(s)", work)
        except Exception as exc:  # noqa: BLE001  (MetaSchedule raises TVM errors of many kinds)
            raise TargetError(f"MetaSchedule tuning failed: {type(exc).__name__}: {str(exc)[:400]}",
                              "compile without --tune (templates), or report the model") from exc
    if progress.measured and len(progress.errors) == progress.measured:
        timeouts = sum("Timeout" in e for e in progress.errors)
        if timeouts:
            raise TargetError(
                f"all {progress.measured} tuning candidates failed, {timeouts} by the {build_timeout:g} s build "
                "timeout", f"raise it, e.g. -O tune_build_timeout={2 * build_timeout:g}, or tune on a quieter machine")
        raise TargetError(f"all {progress.measured} tuning candidates failed: {progress.errors[0]}",
                          "compile without --tune (templates), or report the model")
    if progress.errors:
        logger.warning("%d of %d tuning candidates failed (first: %s)", len(progress.errors), progress.measured,
                       progress.errors[0])
    return progress.measured, cost_name


def _random_args(func: tvm.tirx.PrimFunc, rng: np.random.Generator) -> list:
    arrays = []
    for param in func.params:
        shape = [int(d) for d in param.ty.shape]
        arrays.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(param.ty.dtype))))
    return arrays


def compare_ms(funcs: list[tvm.tirx.PrimFunc], tvm_target: tvm.target.Target, threads: int,
               rounds: int = 5) -> list[float]:
    """Time scheduled kernels in this process, interleaved round by round; min over rounds, in ms.

    Args:
        funcs: scheduled PrimFuncs (float buffers only), each built on its own.
        tvm_target: the LLVM target.
        threads: TVM worker threads while timing.
        rounds: alternating rounds; each round is one ``time_evaluator`` call of >= 20 ms per kernel.
    """
    set_runtime_threads(threads)
    rng = np.random.default_rng(0)
    evaluators = []
    for func in funcs:
        lib = tvm.compile(_workload(func), target=tvm_target)
        module = lib.mod if hasattr(lib, "mod") else lib
        args = _random_args(func, rng)
        timer = module.time_evaluator("main", tvm.cpu(), number=1, repeat=3, min_repeat_ms=20)
        evaluators.append((timer, args))
    best = [float("inf")] * len(funcs)
    for _ in range(rounds):
        for i, (timer, args) in enumerate(evaluators):
            best[i] = min(best[i], min(timer(*args).results) * 1e3)
    return best


def tune_module(mod: tvm.IRModule, tvm_target: tvm.target.Target, trials: int, threads: int,
                build_timeout: Any = BUILD_TIMEOUT_S) -> tuple[tvm.IRModule, dict[str, Any]]:
    """Tune the heaviest kernels of a fused module and swap in the tuned schedules that beat the templates.

    Args:
        mod: Relax module after fusion (``FuseTIR``), PrimFuncs not yet scheduled.
        tvm_target: LLVM target with ``mcpu`` and ``num-cores`` (they key the database folder).
        trials: total MetaSchedule trial budget ``N > 0`` for this module.
        threads: threads for measuring candidates (the artifact's thread count).
        build_timeout: seconds allowed to build one candidate (> 0).

    Returns:
        ``(mod, info)``: ``mod`` with each winning tuned PrimFunc in place (attribute ``tir.is_scheduled``, so the
        templates leave it alone), and ``info`` = ``{"trials": N, "trials_run": measured now, "cache": folder,
        "cost_model": str, "seconds": float, "kernels": {name: {"template_ms", "tuned_ms", "choice", "calls"}}}``.

    Raises:
        TargetError: bad budget or timeout, psutil missing, every candidate failed (e.g. build timeout), or
            MetaSchedule failed.
    """
    start = time.perf_counter()
    trials = check_trials(trials)
    build_timeout = check_build_timeout(build_timeout)
    mod = prepack.mark_constant_params(mod.clone() if hasattr(mod, "clone") else mod)
    picked = _pick(_group_kernels(mod), trials)
    folder = database_dir(tvm_target)
    info: dict[str, Any] = {"trials": trials, "trials_run": 0, "cache": str(folder), "cost_model": None,
                            "kernels": {}}
    if not picked:
        info["seconds"] = round(time.perf_counter() - start, 3)
        return mod, info
    folder.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(
        str(folder / "database_workload.json"), str(folder / "database_tuning_record.json"), allow_missing=True
    )
    budgets = _Budgets(folder / "budgets.json")
    quota = max(1, trials // len(picked))
    todo = [(f, g) for f, g in picked if budgets.data.get(_key(f), 0) < quota]
    if todo:
        info["trials_run"], info["cost_model"] = _run_tuning(todo, quota, tvm_target, database, threads, build_timeout)
        budgets.data.update({_key(f): quota for f, _ in todo})
        budgets.save()
    logger.info("tuning: %d kernel(s) picked, %d tuned now (%d trials), database %s", len(picked), len(todo),
                info["trials_run"], folder)
    tiles = tile_config(tvm_target)
    for func, group in picked:
        sch = database.query_schedule(_workload(func), tvm_target, "main")
        if sch is not None:
            template, _ = schedule_kernel(func, tiles)
            try:
                group.template_ms, group.tuned_ms = compare_ms([template, sch.mod["main"]], tvm_target, threads)
            except Exception as exc:  # noqa: BLE001  (a stored record that no longer builds: keep the template)
                logger.warning("tuned schedule of %s failed to build or run, template kept: %s", group.names[0],
                               str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
                group.choice = "template (tuned failed)"
                sch = None
        if sch is not None:
            group.choice = "tuned" if group.tuned_ms < group.template_ms else "template"
            if group.choice == "tuned":
                tuned = sch.mod["main"].without_attr("global_symbol").with_attr(_SCHEDULED_ATTR, True)
                for name in group.names:
                    mod[mod.get_global_var(name)] = tuned
        for name in group.names:
            info["kernels"][name] = {
                "template_ms": None if group.template_ms is None else round(group.template_ms, 4),
                "tuned_ms": None if group.tuned_ms is None else round(group.tuned_ms, 4),
                "choice": group.choice, "calls": group.calls,
            }
    info["seconds"] = round(time.perf_counter() - start, 3)
    return mod, info
