"""Python API behind ``effc run``, ``effc eval`` and ``effc verify``: work on an existing artifact folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from effc.errors import ArtifactError
from effc.eval.output_check import (  # noqa: F401 - part of the effc.api surface (effc verify, benchmarks)
    DYNAMIC_QUANT_OPS,
    LOCAL_ERROR_FRACTION,
    QUANT_ERROR_FACTOR,
    compare_outputs,
    dynamic_quant_nodes,
    without_dynamic_quant,
)


def _is_decoder(artifact: Path) -> bool:
    """True when ``artifact``'s manifest describes a decoder (False when it cannot be read: load says why)."""
    try:
        return bool(json.loads((artifact / "manifest.json").read_text()).get("decoder"))
    except (OSError, ValueError, AttributeError):
        return False


def _feeds(
    artifact: Path, data: str | os.PathLike | None, n_synthetic: int = 4, check_indices: bool = True
) -> tuple[Any, list[dict], bool]:
    from effc.ir.data import conform_feeds, input_ranks, load_data, synthetic_feeds
    from effc.ir.model import io_signature, load
    from effc.runtime.index_check import check_feeds

    if data is None and _is_decoder(artifact):  # synthetic inputs need static shapes; a decoder's vary per call
        raise ArtifactError(f"the artifact in {artifact} is a decoder language model (prefill/decode entry points "
                            "over a KV cache): there are no synthetic inputs for it",
                            f"generate text with effc generate {artifact} --prompt \"...\", or compare it with "
                            f"the original model (perplexity) with effc eval {artifact}")
    model = load(artifact / "model.onnx")
    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    if data is not None:
        feeds = conform_feeds(model, load_data(data, names, input_ranks(model)), where=f"--data {data}")
        if check_indices:
            check_feeds(feeds, io_signature(model)["inputs"], where=f"--data {data}")
        return model, feeds, False
    return model, synthetic_feeds(model, n_synthetic, seed=3), True


def run_artifact(
    artifact: str | os.PathLike, data: str | os.PathLike | None = None, check_indices: bool = True
) -> list[dict[str, np.ndarray]]:
    """Run a compiled artifact on every sample of ``data`` (synthetic inputs when None).

    Args:
        artifact: the artifact folder.
        data: ``.npz`` file or folder keyed by input name; None: synthetic inputs.
        check_indices: check index inputs against the ranges in the manifest before each run; False trusts them.

    Returns:
        One dict per sample: output name → array.

    Raises:
        ArtifactError: missing/tampered files. DataError: data does not match the inputs, or (with
            ``check_indices``) an index input holds a value out of range.
    """
    from effc import runtime

    compiled = runtime.load(artifact, check_indices=check_indices)
    _, feeds, _ = _feeds(Path(artifact), data, check_indices=check_indices)
    names = [o["name"] for o in compiled.outputs]
    return [dict(zip(names, compiled.run(f), strict=True)) for f in feeds]


def evaluate_artifact(
    artifact: str | os.PathLike, data: str | os.PathLike | None = None, threads: int = 1, repeat: int = 20
) -> dict[str, Any]:
    """Fidelity and latency of a compiled artifact against its ``model.onnx`` under onnxruntime.

    Returns:
        A flat dict: inputs (real or synthetic), worst max abs diff and cosine, latency medians and ratio.
    """
    import onnx_ir as ir

    from effc import runtime
    from effc.eval.fidelity import compare
    from effc.eval.latency import BASELINE_REWRITTEN, paired_latency
    from effc.ir.reference import Reference

    art = Path(artifact)
    compiled = runtime.load(art)
    model, feeds, synthetic = _feeds(art, data)
    ref = Reference(model, threads=threads)
    expected = [ref.run(f) for f in feeds]
    got = [compiled.run(f) for f in feeds]
    names = [o["name"] for o in compiled.outputs]
    fid = compare(expected, got, names)
    summary: dict[str, Any] = {
        "inputs": f"{len(feeds)} {'synthetic' if synthetic else 'user'} sample(s)",
        "max_abs_diff": fid["summary"]["max_abs"],
        "min_cosine": fid["summary"]["cosine"],
    }
    if getattr(_target_of(compiled), "host_latency", True):
        ort, mine = paired_latency(ir.to_proto(model).SerializeToString(), feeds, compiled.run, feeds, threads, repeat,
                                   baseline=BASELINE_REWRITTEN)
        summary.update(
            baseline=BASELINE_REWRITTEN,
            threads=threads,
            ort_median_ms=ort["median_ms"],
            effc_median_ms=mine["median_ms"],
            ratio=round(mine["median_ms"] / ort["median_ms"], 3),
        )
    return summary


def _target_of(compiled: Any) -> Any:
    from effc.targets import get_target

    return get_target(compiled.manifest["target"]["name"])


#: Plain check: largest accepted ``|compiled - onnxruntime|`` for float outputs (``effc verify`` without --atol).
DEFAULT_ATOL = 1e-4


def verify_artifact(
    artifact: str | os.PathLike, data: str | os.PathLike | None = None, atol: float | None = None
) -> dict[str, Any]:
    """Run the artifact where it is meant to run and compare every output with onnxruntime on its ``model.onnx``.

    Criterion per float output (integer and bool outputs must be equal; NaN/inf must sit at the same places):

    * ``atol`` given: plain ``max |compiled - onnxruntime| <= atol``.
    * ``atol`` None and ``model.onnx`` quantizes activations at run time (``effc.BlockQDQ`` nodes, from
      ``block-quant(mode=weight_act)`` or ``mode=kv``): quantization-aware. The output passes when
      ``max |diff| <=`` :data:`DEFAULT_ATOL`, or when its relative L2 error ``||ort - compiled|| / ||ort||`` (over
      all samples) is at most :data:`QUANT_ERROR_FACTOR` (1.5) times the relative L2 change that the activation
      quantization itself makes (onnxruntime on ``model.onnx`` with the quantizers bypassed vs with them). A
      plain atol cannot hold there: fp32 summation-order differences that land on a rounding boundary flip one
      code of a block, and the flips cascade (MiniLM MXINT8 W+A: max |diff| 0.15, rel. L2 0.03 for a correct
      artifact). What it catches: wrong kernels, scales, layouts (errors beyond 1.5x the quantization's own). What
      no output comparison can catch here: an artifact that skipped the activation quantization differs by about
      as much as a correct one (see docs/BENCHMARKS.md, "effc verify"); the compile report's fidelity shows that.
    * otherwise (float models, weight-only quantization): ``max |diff| <=`` :data:`DEFAULT_ATOL` (1e-4).

    Targets that run elsewhere (Cortex-M under qemu) provide ``verify(artifact_dir, feeds, atol)`` and keep the
    plain check (``atol`` default :data:`DEFAULT_ATOL`); host targets load the artifact in this process.

    Args:
        artifact: the artifact folder written by ``effc compile``.
        data: ``.npz`` file or folder of samples; None: 4 synthetic samples.
        atol: explicit plain tolerance in output units, or None for the automatic choice above.

    Returns:
        ``{"ok": bool, "criterion": str, "outputs": {name: row of :func:`compare_outputs`}, "max_abs_diff": float,
        "samples": n, "inputs": str}``; targets with their own ``verify`` return their facts (instructions,
        bit-exact fraction) instead of ``outputs``.

    Raises:
        ArtifactError: missing or tampered files. DataError: the data does not match the inputs.
        EffcError: ``atol`` is negative or not a number.
    """
    from effc import runtime
    from effc.errors import EffcError
    from effc.ir.reference import Reference
    from effc.runtime.manifest import read_manifest, verify_files
    from effc.targets import get_target

    if atol is not None and not (isinstance(atol, (int, float)) and atol >= 0):  # NaN fails >= too
        raise EffcError(f"atol={atol!r} is not a non-negative number", "give --atol 1e-4 or omit it")
    art = Path(artifact)
    manifest = read_manifest(art)
    verify_files(art, manifest)
    model, feeds, synthetic = _feeds(art, data)
    target = get_target(manifest["target"]["name"])
    bound = DEFAULT_ATOL if atol is None else float(atol)
    if hasattr(target, "verify"):
        result = dict(target.verify(art, feeds, atol=bound))
        result.setdefault("criterion", describe_criterion(bound))
    else:
        quantizers = len(dynamic_quant_nodes(model)) if atol is None else 0
        compiled = runtime.load(art)
        reference = Reference(model)
        expected = [reference.run(f) for f in feeds]
        unquantized = None
        if quantizers:
            bypassed = Reference(without_dynamic_quant(model))
            unquantized = [bypassed.run(f) for f in feeds]
        got = [compiled.run(f) for f in feeds]
        rows = compare_outputs(expected, got, [o["name"] for o in compiled.outputs], bound, unquantized)
        result = {
            "ok": all(r["ok"] for r in rows.values()),
            "criterion": describe_criterion(bound, quantizers),
            "outputs": rows,
            "max_abs_diff": max((r["max_abs"] for r in rows.values()), default=0.0),
        }
    result.setdefault("samples", len(feeds))
    result["inputs"] = "synthetic" if synthetic else str(data)
    return result


def describe_criterion(atol: float, quantizers: int = 0) -> str:
    """One line saying which check ``effc verify`` applied to float outputs, and why."""
    if quantizers:
        return (f"quantization-aware (model.onnx quantizes activations at run time in {quantizers} node(s)): "
                f"max abs diff <= {atol:g}, or rel L2 error <= {QUANT_ERROR_FACTOR:g} x the rel L2 change the "
                "activation quantization itself makes; pass --atol for a plain check")
    return f"max abs diff <= {atol:g}"
