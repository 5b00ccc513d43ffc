"""The compile driver: load → canonicalize → passes → lower → artifact → evaluate → report.

This is the one Python entry point behind ``effc compile`` and :func:`effc.compile`. It owns no graph or
codegen logic of its own: it calls the layers in the order of DESIGN.md and writes the artifact atomically (a
temporary folder beside the output, renamed into place only when everything succeeded), so a failed compile
never leaves a half-written artifact.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from effc import artifact_dir
from effc.errors import ArtifactError, DataError, EffcError

logger = logging.getLogger(__name__)

#: Number of evaluation samples used for fidelity when the caller does not say.
DEFAULT_EVAL_SAMPLES = 8
#: Number of calibration samples handed to data-driven passes when the caller does not say.
DEFAULT_CALIBRATION_SAMPLES = 32


@dataclasses.dataclass
class LoadedModel:
    """A model as the user gave it, before canonicalization.

    Attributes:
        model: the loaded graph.
        source: ``{"name": ..., "path": ..., "sha256": ...}`` for the manifest.
        input_shapes: deployment shapes known for this model (zoo entries), overridable by the user.
        constant_inputs: inputs to bake in as constants (e.g. Silero's sample rate).
        zoo: the zoo entry when the model came from ``zoo:NAME``, else None.
    """

    model: ir.Model
    source: dict[str, Any]
    input_shapes: dict[str, tuple[int, ...]]
    constant_inputs: dict[str, np.ndarray]
    zoo: Any = None


@dataclasses.dataclass
class CompileResult:
    """What :func:`compile_model` produced.

    Attributes:
        out_dir: the artifact folder (``manifest.json``, ``model.onnx``, target files, ``report.*``).
        manifest: the manifest as written.
        report: the report dict as written to ``report.json``.
    """

    out_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]


def load_any(model: Any, example_inputs: Any = None) -> LoadedModel:
    """Load a model given as a path, ``zoo:NAME``, ``onnx.ModelProto``, ``onnx_ir.Model`` or ``torch.nn.Module``.

    Args:
        model: the model or where to find it.
        example_inputs: for a torch module, a tuple of example tensors (or a dict of keyword tensors) that fix the
            input shapes of the export.

    Returns:
        The loaded model and what is known about it.

    Raises:
        LoadError: the file is missing or not a valid ONNX model; a torch module cannot be exported.
        EffcError: unknown zoo name, or a torch module without ``example_inputs``.
    """
    from effc.ir import model as ir_model

    if isinstance(model, str) and model.startswith("zoo:"):
        from effc import zoo

        entry = zoo.get(model)
        path = Path(entry.path())
        return LoadedModel(
            model=ir_model.load(path),
            source={"name": f"zoo:{entry.name}", "path": str(path), "sha256": ir_model.sha256_file(path)},
            input_shapes={k: tuple(v) for k, v in dict(entry.input_shapes).items()},
            constant_inputs=dict(entry.constant_inputs),
            zoo=entry,
        )
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        loaded = ir_model.load(path)
        return LoadedModel(
            loaded, {"name": path.name, "path": str(path.resolve()), "sha256": ir_model.sha256_file(path)}, {}, {}
        )
    if isinstance(model, onnx.ModelProto):
        return LoadedModel(ir.from_proto(model), _memory_source(model, "onnx.ModelProto"), {}, {})
    if isinstance(model, ir.Model):
        proto = ir.to_proto(model)
        return LoadedModel(ir.from_proto(proto), _memory_source(proto, "onnx_ir.Model"), {}, {})
    if _is_torch_module(model):
        if example_inputs is None:
            raise EffcError(
                f"cannot capture {type(model).__name__} without example inputs",
                "call effc.compile(module, example_inputs=(tensor, ...), ...) with tensors of the deployment shape",
            )
        from effc.ir.capture import capture_torch

        captured = capture_torch(model, example_inputs)
        return LoadedModel(captured, _memory_source(ir.to_proto(captured), f"torch:{type(model).__name__}"), {}, {})
    raise EffcError(
        f"cannot compile an object of type {type(model).__name__}",
        "pass a path to an .onnx file, 'zoo:NAME', an onnx.ModelProto, an onnx_ir.Model or a torch.nn.Module",
    )


def _memory_source(proto: onnx.ModelProto, name: str) -> dict[str, Any]:
    import hashlib

    return {"name": name, "path": None, "sha256": hashlib.sha256(proto.SerializeToString()).hexdigest()}


def _is_torch_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.nn.Module)


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def prepare_output_dir(
    out_dir: str | os.PathLike, force: bool, keep: Sequence[str | os.PathLike | None] = ()
) -> Path:
    """Check that ``out_dir`` can receive an artifact; returns it as an absolute path.

    Args:
        out_dir: the artifact folder to (re)place.
        force: allow replacing a non-empty folder that is an effc artifact
            (:func:`effc.artifact_dir.check_replaceable`).
        keep: paths that must survive (the model file, the data, a dump folder); a folder holding one of them,
            the current folder or the home folder is never replaced, even with ``force``.

    Raises:
        ArtifactError: the folder exists, is not empty, and ``force`` is False; it is a file; its nearest existing
            parent is a file or not writable; replacing it would delete one of ``keep``, the current folder or
            the home folder; or it is not an effc artifact, or holds files its manifest does not list (named).
    """
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {out} exists and is not a folder", "choose another -o/--output path")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArtifactError(f"output path {out} lies under {parent}, which is a file", "choose another -o path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot create {out}: folder {parent} is not writable", "choose a writable -o folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ArtifactError(
                f"output folder {out} already exists and is not empty",
                "choose another -o/--output folder, or pass --force (force=True) to replace it",
            )
        for path in [Path.cwd(), Path.home(), *(Path(k) for k in keep if k is not None)]:
            path = path.resolve()
            if path == out or out in path.parents:
                raise ArtifactError(
                    f"refusing to replace output folder {out}: it holds {path}, which --force would delete",
                    "write the artifact to a new or empty folder, e.g. -o out",
                )
        artifact_dir.check_replaceable(out)
    return out


def gather_feeds(
    loaded: LoadedModel,
    model: ir.Model,
    data: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None,
    n_eval: int,
    n_calib: int | None = None,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], dict[str, Any]]:
    """Calibration feeds, held-out evaluation feeds, and a description of where they came from.

    ``data`` (a ``.npz`` path, a folder, or a list of feed dicts) wins: its first ``n_calib`` samples calibrate
    (``n_calib`` None: the first half) and up to ``n_eval`` of the samples after them evaluate; a single sample
    serves both when ``n_calib`` is None or 1 (stated in the description). Then a zoo entry's real samples (disjoint
    calibration and eval splits); else generated inputs, labelled synthetic. ``n_calib`` None means
    :data:`DEFAULT_CALIBRATION_SAMPLES` for zoo and generated inputs. Fewer evaluation samples than ``n_eval`` are
    used (with a logged warning) when the data holds no more.

    Returns:
        ``(calibration feeds, evaluation feeds, info)``; info holds ``description``, ``synthetic``, ``count``
        (evaluation samples used), ``calibration_samples`` (calibration samples used) and ``calibration_source``.

    Raises:
        DataError: the data does not match the model's inputs; it holds too few samples for ``n_calib`` plus at
            least one held-out sample; a zoo split holds fewer samples than asked. The message names the option.
        ShapeError: one sample of an input would not fit this machine's memory.
    """
    from effc.ir.data import check_input_sizes, conform_feeds, input_ranks, load_data, synthetic_feeds
    from effc.ir.model import io_signature
    from effc.runtime.index_check import check_feeds

    check_input_sizes(model)  # before any sample is allocated
    if data is not None:
        if isinstance(data, (str, os.PathLike)):
            names = [v.name for v in model.graph.inputs if not v.is_initializer()]
            feeds = load_data(data, names, input_ranks(model))
            where = f"--data {data}"
        else:
            feeds = [dict(f) for f in data]
            where = "data"
        if not feeds:
            raise DataError("the data holds no samples", "give at least one array per model input")
        # shapes, dtypes and index ranges are checked here, before the build, not by onnxruntime after it
        feeds = conform_feeds(model, feeds, where=where)
        check_feeds(feeds, io_signature(model)["inputs"], where=where)
        return _split_user_feeds(feeds, data, n_eval, n_calib)
    n_calib = DEFAULT_CALIBRATION_SAMPLES if n_calib is None else n_calib
    if loaded.zoo is not None:
        calib = _zoo_samples(loaded.zoo, "calibration", n_calib, _CALIB_OPTION)
        evals = _zoo_samples(loaded.zoo, "eval", n_eval, _EVAL_OPTION)
        desc = loaded.zoo.samples_description("eval")
        info = {"description": desc, "synthetic": "synthetic" in desc.lower(), "count": len(evals)}
        return calib, evals, {**info, **_calib_info(calib, loaded.zoo.samples_description("calibration"))}
    calib = synthetic_feeds(model, n_calib, seed=1)
    evals = synthetic_feeds(model, n_eval, seed=2)
    desc = "generated inputs (synthetic: no --data given); fidelity on real data may differ"
    info = {"description": desc, "synthetic": True, "count": len(evals)}
    return calib, evals, {**info, **_calib_info(calib, "generated inputs (synthetic)")}


_CALIB_OPTION = "--calibration-samples (calibration_samples=)"
_EVAL_OPTION = "--eval-samples (eval_samples=)"


def _calib_info(calib: list[dict[str, np.ndarray]], source: str) -> dict[str, Any]:
    return {"calibration_samples": len(calib), "calibration_source": source}


def _zoo_samples(entry: Any, split: str, n: int, option: str) -> list[dict[str, np.ndarray]]:
    """``n`` samples of a zoo split; a split that is too small raises a DataError naming ``option``."""
    try:
        return entry.samples(split, n)
    except DataError as exc:
        raise DataError(
            f"{option} asks for {n} {split} sample(s) of zoo:{entry.name}: {exc.message}",
            f"give {option.split()[0]} with a smaller count, or your own samples with --data",
        ) from exc


def _split_user_feeds(
    feeds: list[dict[str, np.ndarray]], data: Any, n_eval: int, n_calib: int | None
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], dict[str, Any]]:
    """Split user samples: the first ``n_calib`` (None: half) calibrate, up to ``n_eval`` of the rest evaluate.

    Raises:
        DataError: ``n_calib`` leaves no held-out sample (a single sample with ``n_calib`` 1 serves both).
    """
    where = str(data) if isinstance(data, (str, os.PathLike)) else "in memory"
    total = len(feeds)
    if total == 1 and n_calib in (None, 1):
        desc = f"user data ({where}), 1 sample used for calibration and evaluation"
        return feeds, feeds, {"description": desc, "synthetic": False, "count": 1, **_calib_info(feeds, desc)}
    if n_calib is not None and n_calib >= total:
        raise DataError(
            f"{_CALIB_OPTION} asks for {n_calib} calibration sample(s) but the data ({where}) holds {total}; the "
            "samples after the calibration ones are held out for evaluation, so at least one must remain",
            f"give --calibration-samples {total - 1} or fewer, or more samples in --data",
        )
    split = max(1, total // 2) if n_calib is None else n_calib
    calib, evals = feeds[:split], feeds[split:split + n_eval]
    if len(evals) < n_eval:
        logger.warning("the data (%s) holds %d sample(s): %d calibrate, so only %d of the %d asked evaluate",
                       where, total, len(calib), len(evals), n_eval)
    desc = f"user data: {len(calib)} calibration sample(s), {len(evals)} held-out evaluation sample(s)"
    return calib, evals, {"description": desc, "synthetic": False, "count": len(evals), **_calib_info(calib, desc)}


def _reference_feeds(model: ir.Model, feed: Mapping[str, np.ndarray], constants: Mapping[str, np.ndarray]) -> dict:
    names = [v.name for v in model.graph.inputs]
    merged = {**{k: np.asarray(v) for k, v in constants.items()}, **feed}
    return {n: merged[n] for n in names if n in merged}


def _one_compile_per_output(compile_fn: Any) -> Any:
    """Decorator: run ``compile_fn`` holding the :class:`~effc.artifact_dir.OutputLock` of its ``out_dir``.

    A second compile into the same folder, while the first runs, fails at once with an ArtifactError naming the
    process that holds it (before, both finished and the first artifact was silently replaced).
    """
    signature = inspect.signature(compile_fn)

    @functools.wraps(compile_fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with artifact_dir.OutputLock(Path(bound.arguments["out_dir"]).resolve()):
            return compile_fn(*args, **kwargs)

    return locked


@_one_compile_per_output
def compile_model(
    model: Any,
    example_inputs: Any = None,
    *,
    passes: str = "",
    target: str = "cpu",
    out_dir: str | os.PathLike = "out",
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    data: Any = None,
    force: bool = False,
    verify_each: bool = False,
    dump_ir: str | os.PathLike | None = None,
    threads: int | None = None,
    eval_samples: int = DEFAULT_EVAL_SAMPLES,
    calibration_samples: int | None = None,
    measure_latency: bool = True,
    latency_repeat: int = 20,
    tune: int = 0,
    target_options: Mapping[str, Any] | None = None,
    max_cache: int | None = None,
    chunk: int | None = None,
    allow_mismatch: bool = False,
    primary_output: str | None = None,
    min_cosine: float | None = None,
    max_top1_drop: float | None = None,
    max_ppl_increase: float | None = None,
    keep_failed: bool = False,
    strict: bool = False,
) -> CompileResult:
    """Compile a model into a deployable artifact folder and report what the passes cost and bought.

    Args:
        model: path to an ``.onnx`` file, ``"zoo:NAME"``, ``onnx.ModelProto``, ``onnx_ir.Model`` or
            ``torch.nn.Module``.
        example_inputs: example tensors for a torch module (tuple, or dict of keyword inputs).
        passes: pipeline text, e.g. ``"prune(sparsity=0.3),cleanup"``; empty for none.
        target: a registered target name (``effc.targets.target_names()``).
        out_dir: artifact folder; must be absent or empty unless ``force``. One compile into it at a time (a second
            one is refused); leftovers of a killed compile into it are removed first.
        input_shapes: deployment shape per input name, for dynamic dimensions.
        data: ``.npz`` file / folder / list of feed dicts: the first ``calibration_samples`` (default: half)
            calibrate, up to ``eval_samples`` of the rest evaluate (:func:`gather_feeds`).
        force: replace an existing ``out_dir`` that is an effc artifact (anything else is refused).
        verify_each: run the ONNX checker and shape inference after every pass.
        dump_ir: folder receiving the numbered ONNX model after each pass.
        threads: threads for the compiled artifact and for onnxruntime in the latency comparison (default 1).
        eval_samples: held-out samples used for fidelity.
        calibration_samples: samples handed to data-driven passes (None: half of ``data``, else
            :data:`DEFAULT_CALIBRATION_SAMPLES` zoo or generated samples). The count used is recorded in the
            manifest (``calibration``) and the report (``inputs.calibration_samples``).
        measure_latency: time onnxruntime vs the artifact (host-runnable targets only).
        latency_repeat: timed runs per side (median and min reported).
        tune: MetaSchedule trial budget for the ``cpu`` target (0: off, templates only); the tuning database is
            cached per CPU and reused (:mod:`effc.codegen.tune`).
        target_options: extra target options (``mcpu``, ``fast_math``, ``flash``, ``ram``, ...).
        max_cache: decoders only: KV-cache length in tokens (default: the model's, 2048 for zoo:smollm2-135m).
        chunk: decoders only: tokens per prefill call (default 128).
        allow_mismatch: write the artifact even when its outputs disagree with onnxruntime on ``model.onnx``
            (the agreement gate, :mod:`effc.eval.agreement`); the mismatch is recorded in the manifest
            (``agreement``) and the report's first line.
        primary_output: the output the headline and the quality gates use (default: the zoo entry's, else the
            first output); the report's per-output table keeps every output.
        min_cosine: quality gate: the primary output's cosine against the original (mean over the evaluation
            samples) must be at least this, in [-1, 1] (:mod:`effc.eval.gates`).
        max_top1_drop: quality gate: at most this many percentage points of evaluation rows may change their
            argmax (class-score outputs).
        max_ppl_increase: quality gate for decoders: perplexity may rise by at most this many percent.
        keep_failed: write the artifact even when it misses a gate, marked ``"status": "failed"`` in the manifest
            and the report (the error is raised all the same, with ``.result`` set).
        strict: a pass that changes nothing it was asked to change is an error instead of a warning.

    Returns:
        The artifact folder, its manifest and report.

    Raises:
        LoadError, ShapeError, UnsupportedOpError, PipelineError, PassError, CalibrationError, DataError,
        TargetError, BudgetError, ArtifactError: see :mod:`effc.errors`; nothing is left in ``out_dir``.
        QualityGateError: a gate failed (exit code 4); nothing is written unless ``keep_failed``.
        EffcError: a gate limit out of range, a gate that does not apply to the primary output, or an unknown
            ``primary_output`` (the outputs are listed).
        MismatchError: the compiled outputs disagree with onnxruntime on the evaluation samples (the outputs and
            the first disagreeing node are named); ``allow_mismatch`` writes the artifact anyway.
    """
    from effc.codegen.frontend import check_importable, check_io_types
    from effc.eval import agreement, cost, gates
    from effc.ir.calibration import Calibration
    from effc.ir.canonicalize import canonicalize
    from effc.ir.model import io_signature, save
    from effc.ir.names import layer_names
    from effc.passes.manager import PassManager
    from effc.passes.pipeline import parse_pipeline
    from effc.targets import get_target

    started = time.perf_counter()
    keep = [model if isinstance(model, (str, os.PathLike)) and not str(model).startswith("zoo:") else None, dump_ir]
    keep.append(data if isinstance(data, (str, os.PathLike)) else None)
    artifact_dir.remove_stale(Path(out_dir).resolve())  # what a killed compile into this folder left (we hold its lock)
    out = prepare_output_dir(out_dir, force, keep=keep)
    if dump_ir is not None and (Path(dump_ir).resolve() == out or out in Path(dump_ir).resolve().parents):
        raise ArtifactError(
            f"--dump-ir folder {dump_ir} lies inside the output folder {out}, which is replaced at the end",
            "dump the IR to a folder outside -o, e.g. --dump-ir ir/",
        )
    tgt = get_target(target)  # unknown target fails before any work
    threads = _check_threads(threads)
    for name, count in (("eval_samples", eval_samples), ("calibration_samples", calibration_samples),
                        ("latency_repeat", latency_repeat)):
        if name == "calibration_samples" and count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise EffcError(f"{name}={count!r} is not a positive integer", f"give {name} >= 1")
    options = {"threads": threads, **dict(target_options or {})}
    if tune:
        from effc.codegen.tune import check_trials

        options["tune"] = check_trials(tune)  # a bad budget fails before any work
    unknown = sorted(set(options) - set(tgt.option_names()) - {"threads"})
    if unknown:
        raise EffcError(
            f"target {target!r} has no option(s) {unknown}",
            f"options of {target!r}: {', '.join(sorted(set(tgt.option_names()) | {'threads'}))}",
        )
    tgt.check_options(options)  # bad values (e.g. an unknown --arch) before any work
    parse_pipeline(passes)  # syntax/option errors before loading anything heavy
    limits = gates.parse_limits(min_cosine=min_cosine, max_top1_drop=max_top1_drop, max_ppl_increase=max_ppl_increase)

    loaded = load_any(model, example_inputs)
    from effc.ir.decoder import is_decoder

    if is_decoder(loaded.model) or max_cache is not None or chunk is not None:
        from effc.decoder.compile import compile_decoder

        if any(v is not None for v in (min_cosine, max_top1_drop, max_ppl_increase, primary_output)):
            raise EffcError("quality gates and --primary-output are not wired to decoder compiles yet",
                            "compile the decoder without them and read the perplexity in report.md")

        return compile_decoder(loaded, out=out, tgt=tgt, passes=passes, options=options, threads=threads,
                               calibration_samples=calibration_samples, measure_latency=measure_latency,
                               latency_repeat=latency_repeat, verify_each=verify_each, dump_ir=dump_ir,
                               started=started, chunk=chunk, max_cache=max_cache)
    shapes = {**loaded.input_shapes, **{k: tuple(v) for k, v in dict(input_shapes or {}).items()}}
    original = _copy(loaded.model)
    check_io_types(loaded.model)  # a sequence input has no shape: say so before canonicalize asks for one
    canonical = canonicalize(loaded.model, input_shapes=shapes or None, constant_inputs=loaded.constant_inputs or None)
    check_importable(canonical)  # fail before the passes; target.build checks the rewritten model again
    primary = _primary_output(loaded, canonical, primary_output, limits)

    calib_feeds, eval_feeds, inputs_info = gather_feeds(loaded, canonical, data, eval_samples, calibration_samples)
    calibration = Calibration(calib_feeds, source=inputs_info["calibration_source"])
    logger.info("calibration: %d sample(s) from %s", len(calibration), calibration.source)
    pipeline = parse_pipeline(passes, calibration=calibration)
    before = _copy(canonical)
    result = PassManager(pipeline, verify_each=verify_each, dump_ir=dump_ir, strict=strict).run(canonical)
    rewritten = result.model

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = artifact_dir.make_staging_dir(out)
    try:
        save(rewritten, tmp / "model.onnx")
        build_started = time.perf_counter()
        build = tgt.build(rewritten, tmp, options)
        build_seconds = time.perf_counter() - build_started
        manifest = {
            "effc_version": _version(),
            "source": loaded.source,
            "pipeline": str(pipeline),
            "passes": [_record_dict(r) for r in result.records],
            "calibration": {
                "samples": len(calibration),
                "source": calibration.source,
                "used_by": [str(p) for p in pipeline if getattr(p, "uses_calibration", False)],
            },
            "target": {"name": tgt.name, "options": options, "info": build.info},
            **io_signature(rewritten),
            "primary_output": primary,
        }
        from effc.runtime.manifest import sha256_of

        built = {rel: sha256_of(tmp / rel) for rel in build.files}  # the target checks its files are listed
        runner = tgt.load(tmp, {**manifest, "files": built}) if tgt.can_run_here() else None
        report = _evaluate(
            loaded,
            original,
            before,
            rewritten,
            runner,
            tgt,
            eval_feeds,
            inputs_info,
            threads,
            measure_latency,
            latency_repeat,
            gate=functools.partial(agreement.gate, rewritten, tgt, options, allow_mismatch=allow_mismatch),
        )
        manifest["agreement"] = agreement.record(report["agreement"])
        report.update(
            model={"name": loaded.source["name"], "source": loaded.source.get("path")},
            target={"name": tgt.name, "options": options, "info": build.info},
            pipeline=str(pipeline),
            passes=manifest["passes"],
            inputs=inputs_info,
            primary_output=primary,
            layer_names=layer_names(before),
            compile_seconds=round(time.perf_counter() - started, 3),
            build_seconds=round(build_seconds, 3),
        )
        macs_before, macs_after = cost.count_macs(before), cost.count_macs(rewritten)
        report["cost"] = {
            "params_bytes_before": cost.param_bytes(before),
            "params_bytes_after": cost.param_bytes(rewritten),
            "macs_before": macs_before["total"],
            "macs_after": macs_after["total"],
            "macs_by_op_before": macs_before["by_op"],
            "macs_by_op_after": macs_after["by_op"],
            "sparsity": {"total": cost.sparsity_stats(rewritten)["total"]},  # the key effc.eval.report reads
        }
        failed = _check_gates(report, manifest, limits, primary, keep_failed)
        from effc.eval.report import write_report
        from effc.runtime.manifest import write_manifest

        report_files = write_report(tmp, report)
        manifest["metrics"] = {
            "fidelity_vs_original": (report["fidelity"]["vs_original"] or {}).get("summary"),
            "fidelity_primary_output": ((report["fidelity"]["vs_original"] or {}).get("outputs") or {}).get(primary),
            "cost": report["cost"],
            "latency": report.get("latency"),
        }
        write_manifest(tmp, manifest, files=["model.onnx", *build.files, *report_files])
        artifact_dir.user_mode(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from effc.runtime.manifest import read_manifest

    compiled = CompileResult(out, read_manifest(out), report)
    if failed:  # --keep-failed: the artifact is written (marked failed), the compile still fails
        error = gates.failure(report["quality_gates"], loaded.source["name"], kept=str(out))
        error.result = compiled
        raise error
    return compiled


def _primary_output(loaded: LoadedModel, model: ir.Model, requested: str | None, limits: Mapping[str, float]) -> str:
    """The primary output (:func:`effc.eval.gates.primary_output`), checked against the gates before any work.

    Raises:
        EffcError: ``requested`` is not an output; a gate measures something this output does not have.
    """
    from effc.eval import gates
    from effc.eval.fidelity import kind_of

    names = [v.name for v in model.graph.outputs]
    primary = gates.primary_output(names, requested, getattr(loaded.zoo, "primary_output", None))
    value = model.graph.outputs[names.index(primary)]
    shape = tuple(d if isinstance(d, int) else 0 for d in value.shape or ())
    kind = kind_of(value.dtype.numpy() if value.dtype is not None else np.float32, shape,
                   getattr(loaded.zoo, "output_kind", None))
    gates.check_applicable(limits, gates.metrics_for_kind(kind), primary, loaded.source["name"])
    return primary


def _check_gates(report: dict[str, Any], manifest: dict[str, Any], limits: Mapping[str, float], primary: str,
                 keep_failed: bool) -> bool:
    """Check the quality gates into ``report`` and ``manifest``; True when one failed and ``keep_failed``.

    Raises:
        QualityGateError: a gate failed and ``keep_failed`` is False (the caller removes the temporary folder).
    """
    from effc.eval import gates

    if not limits:
        return False
    result = gates.check(report, limits, primary)
    report["quality_gates"] = manifest["quality_gates"] = result
    if result["passed"]:
        return False
    if not keep_failed:
        raise gates.failure(result, report["model"]["name"])
    report["status"] = manifest["status"] = "failed"
    return True


def _check_threads(threads: Any) -> int:
    """The thread count (default 1) as a positive int.

    Raises:
        EffcError: ``threads`` is not a positive integer (0 used to become 1 silently).
    """
    if threads is None:
        return 1
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise EffcError(f"threads={threads!r} is not a positive integer", "give --threads 1 or more (default 1)")
    return int(threads)


def _record_dict(record: Any) -> dict[str, Any]:
    return record.to_dict()


def _version() -> str:
    from effc import __version__

    return __version__


def _evaluate(
    loaded: LoadedModel,
    original: ir.Model,
    before: ir.Model,
    rewritten: ir.Model,
    runner: Any,
    tgt: Any,
    feeds: list[dict[str, np.ndarray]],
    inputs_info: dict[str, Any],
    threads: int,
    measure_latency: bool,
    repeat: int,
    gate: Any = None,
) -> dict[str, Any]:
    """Fidelity (three comparisons), the agreement gate (``gate(feeds, expected, got, names)``), then latency."""
    from effc.eval.fidelity import compare
    from effc.eval.latency import BASELINE_ORIGINAL, paired_latency
    from effc.ir.reference import Reference

    kind = getattr(loaded.zoo, "output_kind", None)
    names = [v.name for v in rewritten.graph.outputs]
    ref_original = Reference(original, threads=threads)
    ref_rewritten = Reference(rewritten, threads=threads)
    orig_out = [ref_original.run(_reference_feeds(original, f, loaded.constant_inputs)) for f in feeds]
    rew_out = [ref_rewritten.run(f) for f in feeds]
    compiled_out = [runner.run(f) for f in feeds] if runner is not None else None  # None: cannot run here
    # the agreement gate, before any other work (targets that cannot run here are not checked)
    agreed = gate(feeds, rew_out, compiled_out, names) if gate is not None and compiled_out is not None else None
    shaped = compiled_out is not None and (agreed is None or not any("shape" in r["why"]
                                                                      for r in agreed["outputs"].values()))
    report: dict[str, Any] = {
        "agreement": agreed,
        "fidelity": {
            "vs_original": compare(orig_out, compiled_out, names, output_kind=kind) if shaped else None,
            "rewritten_vs_original": compare(orig_out, rew_out, names, output_kind=kind),
            "compiled_vs_rewritten": compare(rew_out, compiled_out, names, output_kind=kind) if shaped else None,
        }
    }
    if measure_latency and runner is not None and getattr(tgt, "host_latency", True):
        ort, mine = paired_latency(
            ir.to_proto(original).SerializeToString(),
            [_reference_feeds(original, f, loaded.constant_inputs) for f in feeds],
            runner.run,
            feeds,
            threads=threads,
            repeat=repeat,
            baseline=BASELINE_ORIGINAL,
        )
        report["latency"] = {
            "baseline": BASELINE_ORIGINAL,
            "threads": threads,
            "ort": ort,
            "effc": mine,
            "ratio": round(mine["median_ms"] / ort["median_ms"], 3) if ort["median_ms"] else None,
        }
    else:
        report["latency"] = None
    return report


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is replaced, or restored if the rename is interrupted."""
    if out.exists():
        trash = artifact_dir.old_artifact_path(out)
        out.rename(trash)
        try:
            tmp.rename(out)
        except BaseException:
            if not out.exists():
                trash.rename(out)  # put the previous artifact back
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
