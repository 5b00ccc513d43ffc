"""Python API behind ``effc run``, ``effc eval`` and ``effc verify``: work on an existing artifact folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def _feeds(artifact: Path, data: str | os.PathLike | None, n_synthetic: int = 4) -> tuple[Any, list[dict], bool]:
    from effc.ir.data import conform_feeds, input_ranks, load_data, synthetic_feeds
    from effc.ir.model import load

    model = load(artifact / "model.onnx")
    names = [v.name for v in model.graph.inputs if not v.is_initializer()]
    if data is not None:
        feeds = load_data(data, names, input_ranks(model))
        return model, conform_feeds(model, feeds, where=f"--data {data}"), False
    return model, synthetic_feeds(model, n_synthetic, seed=3), True


def run_artifact(artifact: str | os.PathLike, data: str | os.PathLike | None = None) -> list[dict[str, np.ndarray]]:
    """Run a compiled artifact on every sample of ``data`` (synthetic inputs when None).

    Returns:
        One dict per sample: output name → array.

    Raises:
        ArtifactError: missing/tampered files. DataError: data does not match the inputs.
    """
    from effc import runtime

    compiled = runtime.load(artifact)
    _, feeds, _ = _feeds(Path(artifact), data)
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
    from effc.eval.latency import paired_latency
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
        ort, mine = paired_latency(ir.to_proto(model).SerializeToString(), feeds, compiled.run, feeds, threads, repeat)
        summary.update(
            threads=threads,
            ort_median_ms=ort["median_ms"],
            effc_median_ms=mine["median_ms"],
            ratio=round(mine["median_ms"] / ort["median_ms"], 3),
        )
    return summary


def _target_of(compiled: Any) -> Any:
    from effc.targets import get_target

    return get_target(compiled.manifest["target"]["name"])


def verify_artifact(
    artifact: str | os.PathLike, data: str | os.PathLike | None = None, atol: float = 1e-4
) -> dict[str, Any]:
    """Run the artifact where it is meant to run and compare every output with onnxruntime.

    Targets that run elsewhere (Cortex-M under qemu) provide ``verify(artifact_dir, feeds, atol)``; for host
    targets the artifact is loaded in this process.

    Returns:
        ``{"ok": bool, "samples": n, "max_abs_diff": float, ...}`` plus target-specific facts (instructions).
    """
    from effc import runtime
    from effc.ir.reference import Reference
    from effc.runtime.manifest import read_manifest, verify_files
    from effc.targets import get_target

    art = Path(artifact)
    manifest = read_manifest(art)
    verify_files(art, manifest)
    model, feeds, synthetic = _feeds(art, data)
    target = get_target(manifest["target"]["name"])
    if hasattr(target, "verify"):
        result = dict(target.verify(art, feeds, atol=atol))
    else:
        compiled = runtime.load(art)
        ref = Reference(model)
        worst = 0.0
        for f in feeds:
            for a, b in zip(ref.run(f), compiled.run(f), strict=True):
                if a.dtype.kind == "f":
                    worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
                elif not np.array_equal(a, b):
                    worst = float("inf")
        result = {"ok": worst <= atol, "max_abs_diff": worst}
    result.setdefault("samples", len(feeds))
    result["inputs"] = "synthetic" if synthetic else str(data)
    return result
