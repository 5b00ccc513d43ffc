"""Latency measurement: wall-clock time per inference, for any runner and for onnxruntime.

Times come from :func:`time.perf_counter` around one call each, in milliseconds. Warm-up calls (first-run
allocation, lazy compilation, caches) are not timed. Feeds are cycled, so with ``k`` feeds run ``i`` uses
``feeds[i % k]``. The median is the headline number: it ignores the occasional run that a busy machine slows down.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from effc.errors import DataError, EffcError

logger = logging.getLogger(__name__)

BASELINE_ORIGINAL = "original model"
"""``baseline`` label: onnxruntime ran the model as given, before any pass (what ``effc compile`` times)."""
BASELINE_REWRITTEN = "rewritten model.onnx"
"""``baseline`` label: onnxruntime ran the artifact's rewritten ``model.onnx`` (what ``effc eval`` times)."""

Feeds = Mapping[str, np.ndarray]


def _feed_list(feeds: Feeds | Sequence[Feeds]) -> list[Feeds]:
    items = [feeds] if isinstance(feeds, Mapping) else list(feeds)
    if not items:
        raise DataError("no feeds to time", "pass at least one input feed (a dict input name -> array)")
    return items


def measure(
    run_fn: Callable[[Feeds], Any], feeds: Feeds | Sequence[Feeds], warmup: int = 3, repeat: int = 20
) -> dict[str, Any]:
    """Time ``run_fn(feed)``.

    Args:
        run_fn: runs one inference on one feed (its result is ignored).
        feeds: one feed or a list of feeds (dict input name -> array), cycled over the runs.
        warmup: untimed calls before timing, >= 0.
        repeat: timed calls, >= 1.

    Returns:
        ``{"median_ms", "p25_ms", "p75_ms", "min_ms", "mean_ms", "max_ms": float, "runs": int}`` (milliseconds;
        ``p25_ms``/``p75_ms`` are the quartiles; ``runs`` = repeat).

    Raises:
        DataError: ``feeds`` is empty.
        EffcError: ``warmup`` < 0 or ``repeat`` < 1.
    """
    if warmup < 0 or repeat < 1:
        raise EffcError(f"invalid timing counts warmup={warmup}, repeat={repeat}", "use warmup >= 0 and repeat >= 1")
    items = _feed_list(feeds)
    for i in range(warmup):
        run_fn(items[i % len(items)])
    times_ms: list[float] = []
    for i in range(repeat):
        feed = items[i % len(items)]
        start = time.perf_counter()
        run_fn(feed)
        times_ms.append((time.perf_counter() - start) * 1e3)
    result = _stats(times_ms)
    logger.debug("latency: median %.3f ms over %d runs", result["median_ms"], repeat)
    return result


def _stats(times_ms: list[float]) -> dict[str, Any]:
    """Median, min, mean, max and the interquartile range (``p25_ms``, ``p75_ms``) of run times in ms."""
    quartiles = statistics.quantiles(times_ms, n=4, method="inclusive") if len(times_ms) > 1 else times_ms * 3
    return {
        "median_ms": statistics.median(times_ms),
        "p25_ms": quartiles[0],
        "p75_ms": quartiles[2],
        "min_ms": min(times_ms),
        "mean_ms": statistics.fmean(times_ms),
        "max_ms": max(times_ms),
        "runs": len(times_ms),
    }


def measure_interleaved(
    runs: Mapping[str, tuple[Callable[[Feeds], Any], Feeds | Sequence[Feeds]]], warmup: int = 3, repeat: int = 20
) -> dict[str, dict[str, Any]]:
    """Time several runners in alternation (a, b, a, b, ...) so that they see the same machine load.

    Timing one runner after the other lets a change in load (other processes, frequency scaling) between the two
    blocks of runs show up as a speed difference; alternating run by run spreads it over both.

    Args:
        runs: name → (run function, feeds); each side's feeds are cycled as in :func:`measure` (feed ``i`` of every
            side is used in round ``i``, so give each side the same samples in its own input format).
        warmup: untimed rounds, >= 0.
        repeat: timed rounds, >= 1.

    Returns:
        name → :func:`measure`'s dict.

    Raises:
        DataError: a side has no feeds.
        EffcError: ``warmup`` < 0 or ``repeat`` < 1.
    """
    if warmup < 0 or repeat < 1:
        raise EffcError(f"invalid timing counts warmup={warmup}, repeat={repeat}", "use warmup >= 0 and repeat >= 1")
    sides = {name: (fn, _feed_list(feeds)) for name, (fn, feeds) in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(warmup + repeat):
        for name, (fn, items) in sides.items():
            start = time.perf_counter()
            fn(items[i % len(items)])
            if i >= warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _stats(t) for name, t in times.items()}


def _model_bytes(model: Any) -> bytes | str:
    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise DataError(f"model file {str(path)!r} does not exist", "pass the path of an ONNX file")
        return str(path)
    if hasattr(model, "SerializeToString"):  # onnx.ModelProto
        return model.SerializeToString()
    import onnx_ir as ir

    if isinstance(model, ir.Model):
        return ir.to_proto(model).SerializeToString()
    raise DataError(f"cannot time a model of type {type(model).__name__}", "pass ONNX bytes, a path or a model")


def ort_session(model: Any, threads: int = 1):
    """An onnxruntime CPU session with ``threads`` intra-op threads, one inter-op thread, sequential execution.

    Args:
        model: ONNX bytes, a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
        threads: intra-op threads, >= 1.

    Raises:
        EffcError: ``threads`` < 1.
        DataError: the model cannot be read.
    """
    import onnxruntime as ort

    if threads < 1:
        raise EffcError(f"invalid thread count {threads}", "use threads >= 1")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(_model_bytes(model), options, providers=["CPUExecutionProvider"])


def ort_latency(
    model: Any, feeds: Feeds | Sequence[Feeds], threads: int = 1, warmup: int = 3, repeat: int = 20
) -> dict[str, Any]:
    """Time the model in onnxruntime (CPU) with a fixed thread count.

    Args:
        model: ONNX bytes, a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
        feeds: one feed or a list of feeds (input name -> array); keys that are not model inputs are ignored.
        threads: intra-op threads (inter-op is 1, execution sequential).
        warmup: untimed runs.
        repeat: timed runs.

    Returns:
        :func:`measure`'s dict plus ``"threads"`` and ``"runtime": "onnxruntime <version>"``.

    Raises:
        DataError: no feeds, a feed lacks one of the model's inputs, or the model cannot be read.
        EffcError: invalid ``threads``/``warmup``/``repeat``.
    """
    import onnxruntime as ort

    session = ort_session(model, threads)
    names = [i.name for i in session.get_inputs()]
    items = _feed_list(feeds)
    prepared = []
    for k, feed in enumerate(items):
        missing = [n for n in names if n not in feed]
        if missing:
            raise DataError(f"feed {k} lacks model input(s) {missing}", f"give every input: {', '.join(names)}")
        prepared.append({n: feed[n] for n in names})
    result = measure(lambda feed: session.run(None, feed), prepared, warmup=warmup, repeat=repeat)
    result["threads"] = threads
    result["runtime"] = f"onnxruntime {ort.__version__}"
    return result


def paired_latency(
    model: Any,
    ort_feeds: Feeds | Sequence[Feeds],
    run_fn: Callable[[Feeds], Any],
    feeds: Feeds | Sequence[Feeds],
    threads: int = 1,
    repeat: int = 20,
    warmup: int = 3,
    baseline: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time onnxruntime on ``model`` and ``run_fn`` (a compiled artifact) in alternation (:func:`measure_interleaved`).

    Args:
        model: the ONNX model onnxruntime runs (bytes, path, ``onnx.ModelProto`` or ``onnx_ir.Model``).
        ort_feeds: its feeds (keys that are not model inputs are ignored).
        run_fn: the other runner, e.g. ``CompiledModel.run``.
        feeds: its feeds, sample ``i`` matching ``ort_feeds[i]``.
        threads: onnxruntime intra-op threads (the artifact's own count is set when it is built/loaded).
        repeat: timed rounds.
        warmup: untimed rounds.
        baseline: which model ``model`` is, recorded as ``ort["baseline"]`` so that reports can say what
            onnxruntime ran: :data:`BASELINE_ORIGINAL` or :data:`BASELINE_REWRITTEN` (None: not recorded).

    Returns:
        ``(ort, other)``: :func:`measure`'s dicts; ``ort`` also has ``"threads"``, ``"runtime"`` and, when given,
        ``"baseline"``.

    Raises:
        DataError: no feeds, or a feed lacks one of the model's inputs.
        EffcError: invalid ``threads``/``warmup``/``repeat``.
    """
    import onnxruntime as ort

    session = ort_session(model, threads)
    names = [i.name for i in session.get_inputs()]
    prepared = []
    for k, feed in enumerate(_feed_list(ort_feeds)):
        missing = [n for n in names if n not in feed]
        if missing:
            raise DataError(f"feed {k} lacks model input(s) {missing}", f"give every input: {', '.join(names)}")
        prepared.append({n: feed[n] for n in names})
    timed = measure_interleaved(
        {"ort": (lambda f: session.run(None, f), prepared), "other": (run_fn, feeds)}, warmup=warmup, repeat=repeat
    )
    timed["ort"].update(threads=threads, runtime=f"onnxruntime {ort.__version__}")
    if baseline is not None:
        timed["ort"]["baseline"] = baseline
    return timed["ort"], timed["other"]
