"""Tuned CPU mode (``--tune N``): MetaSchedule searches schedules for the heaviest fused kernels.

The default CPU path schedules every fused PrimFunc with effc's templates (:mod:`effc.codegen.schedules`). With a
trial budget ``N > 0``, :func:`tune_module` runs before the templates:

1. picks the kernels worth tuning: float-only kernels (integer inputs such as gather indices would be filled with
   random values by the measuring runner and could read out of bounds), ranked by estimated FLOPs × call count,
   the smallest set covering :data:`FLOP_SHARE` of the module's FLOPs, at most ``N // MIN_TRIALS_PER_TASK`` kernels;
   each picked kernel gets the quota ``N // kernels`` trials;
2. tops each picked kernel up to its quota (MetaSchedule's gradient task scheduler, evolutionary search, XGBoost
   cost model when ``xgboost`` is installed, else a random one): the budget is cumulative, so a kernel that already
   has ``m`` trials in the database runs only ``quota - m`` new ones, and none when ``m >= quota``;
3. for each picked kernel with a tuning record, times the template's schedule and the tuned one in this process
   on the same random inputs (interleaved, min of several repeats) and keeps the faster; kernels without a record,
   or where the template wins, keep the template.

The database (MetaSchedule's JSON database plus ``budgets.json``) lives in
``$EFFC_CACHE_DIR/metaschedule/tvm-<version>/<mcpu>-<cores>c`` (default cache: ``platformdirs.user_cache_dir``).
The trials a kernel already has are the larger of its tuning records in the database (every measured candidate
is one record, failed ones included, so an interrupted run still counts what it measured) and its entry in
``budgets.json`` (the quota last asked for it: a search that ran out of new candidates before its quota is not
asked again). Compiling with ``--tune 8`` then ``--tune 16`` therefore measures 8 + 8 trials per kernel, and
``--tune 8`` again measures none. Keys are structural hashes of the kernels: any change of the graph, fusion or
effc version that changes a kernel makes it a miss.

Progress: a rich progress bar on a terminal; without one, INFO log lines (the plan with a rough time estimate
before tuning, a progress line every :data:`PROGRESS_LOG_S` seconds, and one line per kernel with its choice).

Source: Shao et al., "Tensor Program Optimization with Probabilistic Programs" (MetaSchedule), NeurIPS 2022. The
pitfalls handled here are measured in ``../shared/notes/cpu.md`` (builder timeout, xgboost/psutil, tvm-ffi pin).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
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
# Wall time for the estimate logged before tuning, measured on 2-core machines (docs/BENCHMARKS.md, notes/cpu.md):
# 0.6-0.8 s per trial for 800 trials on MiniLM's GEMMs, 9-13 s per trial for 64 on magika's convolutions.
TRIAL_SECONDS = (0.7, 10.0)
STARTUP_SECONDS = 30.0  # worker pools, design spaces and the first evolutionary search, per tune_tasks call
PROGRESS_LOG_S = 30.0  # without a terminal, log the trials measured so far at most this often
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
        trials: tuning records (measured trials, failed ones included) in the database for this workload.
    """

    names: list[str]
    calls: int
    flops: float
    trials: int = 0
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
    """``budgets.json``: ``{workload key: the per-kernel quota last asked for}``.

    A lower bound of the trials a kernel has had (the database's records are the other one): it keeps a kernel whose
    search ran out of new candidates before its quota from being asked again with the same quota.
    """

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


def _measured_trials(database: Any, funcs: list[tvm.tirx.PrimFunc]) -> list[int]:
    """Tuning records per kernel in ``database``: every measured candidate is one, failed ones included.

    MetaSchedule's ``AddToDatabase`` callback commits a record for each candidate it measured (run time ``1e10`` s
    for a failure); records share the workload entry they were committed with, which ``commit_workload`` returns
    for a workload the database holds (and writes nothing then).
    """
    entries = []
    for func in funcs:
        workload = _workload(func)
        entries.append(database.commit_workload(workload) if database.has_workload(workload) else None)
    if not any(entry is not None for entry in entries):
        return [0] * len(funcs)
    records = [record.workload for record in database.get_all_tuning_records()]
    return [0 if entry is None else sum(1 for w in records if w.same_as(entry)) for entry in entries]


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


def _log_progress(total: int) -> Any:
    """An ``advance(n)`` that logs the trials measured so far at INFO, at most every :data:`PROGRESS_LOG_S` s."""
    start = last = time.perf_counter()
    done = 0

    def advance(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter()
        if now - last >= PROGRESS_LOG_S or done >= total:
            last = now
            logger.info("tuning: %d of %d trials measured (%.0f s)", done, total, now - start)

    return advance


def _with_progress(total: int, description: str, work: Any) -> Any:
    """Run ``work(advance)`` under a rich progress bar on stderr, or with progress log lines without a terminal."""
    if not sys.stderr.isatty():
        return work(_log_progress(total))
    from rich.console import Console
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=Console(stderr=True), transient=True)
    try:
        bar.start()
    except LiveError:  # rich < 14 allows one live display: the caller's spinner already holds it
        return work(_log_progress(total))
    try:
        task = bar.add_task(description, total=total)
        return work(lambda n: bar.advance(task, n))
    finally:
        bar.stop()


@contextlib.contextmanager
def _quiet_metaschedule() -> Iterator[None]:
    """Keep MetaSchedule's scheduler chatter off stdout while tuning (library code logs, never prints).

    MetaSchedule's ``create_loggers`` gives its logger a stdout handler at that logger's level (DEBUG when unset),
    then sets the logger itself to DEBUG. Unless the user set a level, this sets WARNING (DEBUG when effc logs at
    DEBUG) for the tuning and puts the level back to unset afterwards: otherwise a second tuning in the same process
    would find DEBUG and print every scheduler step.
    """
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level != logging.NOTSET:
        yield
        return
    ms_logger.setLevel(logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.WARNING)
    try:
        yield
    finally:
        ms_logger.setLevel(logging.NOTSET)


def _run_tuning(todo: list, tvm_target: tvm.target.Target, database: Any, threads: int,
                build_timeout: float) -> tuple[int, str]:
    """Tune each ``(func, group, missing)`` of ``todo`` with ``missing`` new trials into ``database``.

    MetaSchedule takes one per-task trial limit per ``tune_tasks`` call, so kernels that miss the same number of
    trials are tuned together (one call per distinct count; usually one in all).

    Returns:
        ``(trials measured, cost model name)``.

    Raises:
        TargetError: every candidate failed (builder timeout: raise ``tune_build_timeout``), or MetaSchedule failed.
    """
    if importlib.util.find_spec("psutil") is None:
        raise TargetError("MetaSchedule's local builder/runner need psutil, which is not installed",
                          "reinstall effc (psutil is one of its dependencies) or pip install psutil")
    cost_model, cost_name = _cost_model(threads)
    import_cpu_intrinsics()
    with tempfile.TemporaryDirectory(prefix="effc-tune-") as work_dir, _quiet_metaschedule():
        names = [group.names[0] for _, group, _ in todo]
        loggers = ms.logging.get_loggers_from_work_dir(work_dir, names)
        contexts = [
            ms.TuneContext(
                mod=_workload(func), target=tvm_target, space_generator="post-order-apply",
                search_strategy="evolutionary", task_name=name, logger=log, rand_state=seed, num_threads=threads,
            ).clone()
            for (func, _, _), name, log, seed in zip(todo, names, loggers, ms.utils.fork_seed(0, n=len(todo)),
                                                      strict=True)
        ]
        batches: dict[int, list[int]] = {}
        for i, (_, _, missing) in enumerate(todo):
            batches.setdefault(missing, []).append(i)
        builder = ms.builder.LocalBuilder(max_workers=threads, timeout_sec=build_timeout, f_build=build_candidate)
        runner = ms.runner.LocalRunner(
            timeout_sec=RUN_TIMEOUT_S,
            evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40),
            initializer=functools.partial(set_worker_threads, threads),
        )

        def work(advance: Any) -> _Progress:
            progress = _Progress(advance)
            for missing, batch in batches.items():
                ms.tune_tasks(
                    tasks=[contexts[i] for i in batch], task_weights=[float(todo[i][1].calls) for i in batch],
                    work_dir=work_dir, max_trials_global=missing * len(batch), max_trials_per_task=missing,
                    num_trials_per_iter=min(64, missing), builder=builder, runner=runner, database=database,
                    cost_model=cost_model, measure_callbacks=[*ms.MeasureCallback.create("default"), progress],
                )
            return progress

        try:
            progress = _with_progress(sum(m for _, _, m in todo), f"tuning {len(todo)} kernel(s)", work)
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


def _plan(picked: list, quota: int, database: Any, budgets: _Budgets) -> list:
    """``[(func, group, missing trials)]`` for the picked kernels below ``quota``; sets each ``group.trials``."""
    todo = []
    for (func, group), measured in zip(picked, _measured_trials(database, [f for f, _ in picked]), strict=True):
        group.trials = measured
        missing = quota - max(measured, budgets.data.get(_key(func), 0))
        if missing > 0:
            todo.append((func, group, missing))
    return todo


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _log_plan(todo: list, picked: list, quota: int, folder: Path) -> None:
    """One INFO line before tuning: kernels × trials and a rough time range (:data:`TRIAL_SECONDS`)."""
    new = sum(m for _, _, m in todo)
    startup = STARTUP_SECONDS * len({m for _, _, m in todo})
    low, high = (startup + new * seconds for seconds in TRIAL_SECONDS)
    logger.info("tuning %d of %d kernel(s) up to %d MetaSchedule trials each: %d new trial(s), about %s to %s on "
                "2 cores; kept in %s for later compiles", len(todo), len(picked), quota, new, _minutes(low),
                _minutes(high), folder)


def _choose(func: tvm.tirx.PrimFunc, group: KernelChoice, database: Any, tvm_target: tvm.target.Target,
            threads: int) -> tvm.tirx.PrimFunc | None:
    """Time the template against the database's best schedule of ``func``; the tuned PrimFunc when it wins.

    Sets ``group.template_ms``, ``group.tuned_ms`` and ``group.choice``, and logs the outcome at INFO.
    """
    sch = database.query_schedule(_workload(func), tvm_target, "main")
    if sch is None:
        logger.info("kernel %s: no valid tuning record in %d trial(s), template kept", group.names[0], group.trials)
        return None
    template, _ = schedule_kernel(func, tile_config(tvm_target))
    try:
        group.template_ms, group.tuned_ms = compare_ms([template, sch.mod["main"]], tvm_target, threads)
    except Exception as exc:  # noqa: BLE001  (a stored record that no longer builds: keep the template)
        logger.warning("tuned schedule of %s failed to build or run, template kept: %s", group.names[0],
                       str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
        group.choice = "template (tuned failed)"
        return None
    group.choice = "tuned" if group.tuned_ms < group.template_ms else "template"
    logger.info("kernel %s: tuned %.4f ms (best of %d trial(s)) vs template %.4f ms: %s kept", group.names[0],
                group.tuned_ms, group.trials, group.template_ms, group.choice)
    if group.choice != "tuned":
        return None
    return sch.mod["main"].without_attr("global_symbol").with_attr(_SCHEDULED_ATTR, True)


def tune_module(mod: tvm.IRModule, tvm_target: tvm.target.Target, trials: int, threads: int,
                build_timeout: Any = BUILD_TIMEOUT_S) -> tuple[tvm.IRModule, dict[str, Any]]:
    """Tune the heaviest kernels of a fused module and swap in the tuned schedules that beat the templates.

    Args:
        mod: Relax module after fusion (``FuseTIR``), PrimFuncs not yet scheduled.
        tvm_target: LLVM target with ``mcpu`` and ``num-cores`` (they key the database folder).
        trials: total MetaSchedule trial budget ``N > 0`` for this module; each picked kernel is topped up to
            ``N // kernels`` trials in the database (cumulative over compiles).
        threads: threads for measuring candidates (the artifact's thread count).
        build_timeout: seconds allowed to build one candidate (> 0).

    Returns:
        ``(mod, info)``: ``mod`` with each winning tuned PrimFunc in place (attribute ``tir.is_scheduled``, so the
        templates leave it alone), and ``info`` = ``{"trials": N, "trials_run": measured now, "cache": folder,
        "cost_model": str, "seconds": float, "kernels": {name: {"template_ms", "tuned_ms", "choice", "calls",
        "trials"}}}`` where a kernel's ``trials`` counts its records in the database after this run.

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
    todo = _plan(picked, quota, database, budgets)
    if todo:
        _log_plan(todo, picked, quota, folder)
        info["trials_run"], info["cost_model"] = _run_tuning(todo, tvm_target, database, threads, build_timeout)
        for func, _, _ in todo:
            budgets.data[_key(func)] = max(quota, budgets.data.get(_key(func), 0))
        budgets.save()
        for (_, group), measured in zip(picked, _measured_trials(database, [f for f, _ in picked]), strict=True):
            group.trials = measured
    else:
        logger.info("tuning: the %d kernel(s) picked already had their %d trial(s) each in %s: none run",
                    len(picked), quota, folder)
    for func, group in picked:
        tuned = _choose(func, group, database, tvm_target, threads)
        for name in group.names:
            if tuned is not None:
                mod[mod.get_global_var(name)] = tuned
            info["kernels"][name] = {
                "template_ms": None if group.template_ms is None else round(group.template_ms, 4),
                "tuned_ms": None if group.tuned_ms is None else round(group.tuned_ms, 4),
                "choice": group.choice, "calls": group.calls, "trials": group.trials,
            }
    info["seconds"] = round(time.perf_counter() - start, 3)
    return mod, info
