"""GPU check of the cuda target: pack artifacts here, run and time them on an NVIDIA GPU machine without TVM.

``pack`` (this machine: effc, TVM, nvcc, onnxruntime) compiles zoo models for ``--arch`` with ``--target cuda``,
saves onnxruntime CPU reference outputs for real eval samples, and gathers the runtime bundle:

    benchmarks/gpu_bundle_<plan>/    (plans: ocr = PP-OCR det/cls/rec, Magika, Silero VAD; minilm = MiniLM-L6 fp16)
      runtime/lib/      libtvm_runtime.so, libtvm_runtime_cuda.so, libcudart.so.13   (no libtvm_compiler.so)
      runtime/python/   tvm_ffi built for the GPU machine's Python (cp312 wheel, unpacked; tvm_ffi is not abi3)
      artifacts/<tag>/  model.so + manifest.json          refs/<tag>.npz  inputs in_*, reference outputs ref_*
      bundle.json       what was packed, sizes, what was left out and why

Models are added in plan order while the bundle stays under ``--budget-mib`` (64: what one device call carries);
MiniLM-L6's fp32 weights alone are 90 MB, so it travels in fp16 (``--gpu-precision fp16``: 45 MB ``model.so``, word
embedding table in fp16 too) in a bundle of its own.

``run`` (GPU machine: Python 3.12, torch with CUDA, numpy; no TVM, no network) loads each ``model.so`` with
:class:`effc.runtime.vm.VmRunner` (tvm_ffi + TVM's runtime libraries), checks its sha256 against the manifest,
compares the outputs with the references (fp32: max |diff| <= 1e-3; fp16: cosine >= 0.999 and max |diff| <= 2e-2 x
max |ref|), times ``main`` on device-resident inputs with CUDA events (median and min of ``--repeat`` >= 50 runs
after ``--warmup``) and writes ``$OUT/gpu_check.json``.

PyTorch anchors (eager, ``torch.compile``) are not in this bundle yet: the PP-OCR/Magika/Silero models exist only
as ONNX (no torch source on the GPU machine) and MiniLM's fp32 weights do not fit beside its artifact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
#: Bundles (one device call each) → (zoo model, gpu_precision) in packing order; an entry that would pass the budget
#: is left out (recorded). MiniLM-L6 gets its own bundle: 43.6 MiB in fp16 (its fp32 weights alone are 90 MB).
PLANS = {
    "ocr": (("ppocr-det", "fp32"), ("ppocr-cls", "fp32"), ("ppocr-rec", "fp32"), ("magika", "fp32"),
            ("silero-vad", "fp32"), ("ppocr-det", "fp16")),
    "minilm": (("minilm-l6", "fp16"),),
}
#: Accepted difference to onnxruntime per precision (see the module docstring).
FP32_MAX_ABS = 1e-3
FP16_MIN_COSINE, FP16_REL_MAX_ABS = 0.999, 2e-2
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")
CUDART = "libcudart.so.13"
_TVM_FFI_BUILD_ONLY = ("include", "3rdparty", "src", "share")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------------- pack (here)


def _runtime_bundle(dest: Path, python_version: str) -> dict:
    """Copy TVM's runtime libraries and unpack tvm_ffi for ``python_version`` into ``dest``; their sizes."""
    import importlib.metadata

    from effc.runtime.vm import lib_dir

    lib = dest / "lib"
    lib.mkdir(parents=True)
    for name in RUNTIME_LIBS:
        shutil.copy2(lib_dir() / name, lib / name)
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    cudart = next((p for p in (cuda_home / "lib64" / CUDART, cuda_home / "lib" / CUDART) if p.exists()), None)
    if cudart is not None:
        shutil.copy2(cudart.resolve(), lib / CUDART)
    version = importlib.metadata.version("apache-tvm-ffi")
    tag = python_version.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", f"apache-tvm-ffi=={version}", "--no-deps",
                        "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
                        "--platform", "manylinux_2_28_x86_64", "-d", tmp], check=True, capture_output=True)
        wheel = next(Path(tmp).glob(f"apache_tvm_ffi-*-cp{tag}-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(dest / "python")
    package = dest / "python" / "tvm_ffi"
    for folder in _TVM_FFI_BUILD_ONLY:  # headers, sources and CMake files: for building extensions, not running
        shutil.rmtree(package / folder, ignore_errors=True)  # (core.so links lib/libtvm_ffi_testing.so: kept)
    return {"tvm_ffi": f"{version} ({wheel.name})", "lib_bytes": _tree_bytes(lib),
            "python_bytes": _tree_bytes(dest / "python"), "cudart_bundled": cudart is not None}


def _references(artifact: Path, entry, samples: int) -> dict[str, np.ndarray]:
    """Real eval samples of ``entry`` and onnxruntime CPU outputs of the artifact's model.onnx on them."""
    import onnxruntime as ort

    manifest = json.loads((artifact / "manifest.json").read_text())
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    arrays: dict[str, np.ndarray] = {}
    for i, sample in enumerate(entry.samples("eval", samples)):
        feed = {spec["name"]: np.asarray(sample[spec["name"]]).astype(spec["dtype"]) for spec in manifest["inputs"]}
        for n, value in feed.items():
            arrays[f"in_{i}_{n}"] = value
        for k, value in enumerate(session.run(None, feed)):
            arrays[f"ref_{i}_{k}"] = value
    return arrays


def pack(args: argparse.Namespace) -> None:
    """Build the bundle (see the module docstring)."""
    import effc
    from effc import zoo
    from effc.errors import EffcError

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "artifacts").mkdir(parents=True)
    (out / "refs").mkdir()
    budget = int(args.budget_mib * 2**20)
    summary = {"arch": args.arch, "date": time.strftime("%Y-%m-%d"), "budget_bytes": budget,
               "runtime": _runtime_bundle(out / "runtime", args.python), "models": [], "left_out": []}
    work = Path(tempfile.mkdtemp(prefix="effc-gpu-pack-"))
    try:
        for name, precision in PLANS[args.plan]:
            tag = f"{name}-{precision}"
            start = time.perf_counter()
            try:
                result = effc.compile(f"zoo:{name}", target="cuda", out_dir=work / tag, eval_samples=1,
                                      measure_latency=False,
                                      target_options={"arch": args.arch, "gpu_precision": precision})
            except EffcError as exc:  # one model failing to build must not stop the others
                summary["left_out"].append({"tag": tag, "why": f"build failed: {exc}"[:400]})
                print(f"left out {tag}: {exc}", flush=True)
                continue
            seconds = time.perf_counter() - start
            refs = _references(result.out_dir, zoo.get(name), args.samples)
            size = (result.out_dir / "model.so").stat().st_size + sum(a.nbytes for a in refs.values())
            if _tree_bytes(out) + size > budget:
                summary["left_out"].append({"tag": tag, "bytes": size, "why": "over the bundle budget"})
                print(f"left out {tag}: {size / 2**20:.1f} MiB would pass the budget", flush=True)
                continue
            dest = out / "artifacts" / tag
            dest.mkdir()
            for file in ("model.so", "manifest.json"):
                shutil.copy2(result.out_dir / file, dest / file)
            np.savez(out / "refs" / f"{tag}.npz", **refs)
            info = result.manifest["target"]["info"]
            summary["models"].append({
                "tag": tag, "precision": precision, "model_so_bytes": (dest / "model.so").stat().st_size,
                "compile_seconds": round(seconds, 1), "rule_counts": info["rule_counts"],
                "kernels": len(info["kernels"]),
            })
            print(f"packed {tag}: {size / 2**20:.1f} MiB, compiled in {seconds:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["bundle_bytes"] = _tree_bytes(out)
    (out / "bundle.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("bundle_bytes", "runtime", "left_out")}, indent=1))


# ---------------------------------------------------------------------------------------------- run (GPU machine)


def _compare(got: np.ndarray, ref: np.ndarray, precision: str) -> dict:
    got, ref = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    denom = float(np.linalg.norm(got) * np.linalg.norm(ref))
    cosine = float(got @ ref / denom) if denom else 1.0
    if precision == "fp32":
        ok = max_abs <= FP32_MAX_ABS
    else:
        ok = cosine >= FP16_MIN_COSINE and max_abs <= FP16_REL_MAX_ABS * max(1.0, float(np.max(np.abs(ref))))
    return {"max_abs": max_abs, "cosine": cosine, "ok": bool(ok)}


def _time_cuda(fn, warmup: int, repeat: int) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "runs": repeat}


def _device_info() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check run: torch sees no CUDA device; run it on the GPU machine")

    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = "unknown"
    return info


def run(args: argparse.Namespace) -> None:
    """Run, check and time every packed artifact (see the module docstring)."""
    bundle = Path(args.bundle).resolve()
    sys.path.insert(0, str(bundle / "runtime" / "python"))
    sys.path.insert(1, str(ROOT))
    os.environ["EFFC_TVM_LIB_DIR"] = str(bundle / "runtime" / "lib")
    from effc.runtime.vm import VmRunner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": _device_info(), "bundle": json.loads((bundle / "bundle.json").read_text()), "models": []}
    deadline = time.monotonic() + args.time_budget_s
    for art in sorted((bundle / "artifacts").iterdir()):
        row: dict = {"tag": art.name}
        results["models"].append(row)
        if time.monotonic() > deadline:
            row["skipped"] = "time budget reached"
            continue
        try:
            manifest = json.loads((art / "manifest.json").read_text())
            if _sha256(art / "model.so") != manifest["files"]["model.so"]:
                raise RuntimeError("model.so does not match the sha256 in its manifest")
            precision = manifest["target"]["info"]["gpu_precision"]
            names = [spec["name"] for spec in manifest["inputs"]]
            runner = VmRunner(art / "model.so", "cuda", names)
            refs = dict(np.load(bundle / "refs" / f"{art.name}.npz"))
            checks = []
            for i in range(len({k.split("_")[1] for k in refs if k.startswith("ref_")})):
                outputs = runner.run({n: refs[f"in_{i}_{n}"] for n in names})
                checks += [_compare(o, refs[f"ref_{i}_{k}"], precision) for k, o in enumerate(outputs)]
            row.update(precision=precision, ok=all(c["ok"] for c in checks),
                       worst_max_abs=max(c["max_abs"] for c in checks), worst_cosine=min(c["cosine"] for c in checks))
            device_args = runner.to_device({n: refs[f"in_0_{n}"] for n in names})
            row["effc"] = _time_cuda(lambda r=runner, a=device_args: r.call(a), args.warmup, args.repeat)
        except Exception as exc:  # noqa: BLE001  (one failing model must not hide the others' numbers)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(json.dumps(row), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="build artifacts + references + runtime bundle (this machine)")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--out", required=True)
    p.add_argument("--plan", choices=sorted(PLANS), default="ocr", help="which bundle to pack")
    p.add_argument("--samples", type=int, default=2, help="eval samples per model with reference outputs")
    p.add_argument("--budget-mib", type=float, default=63.0)
    p.add_argument("--python", default="3.12", help="Python version of the GPU machine (tvm_ffi wheel)")
    r = sub.add_parser("run", help="run, check and time the bundle (GPU machine)")
    r.add_argument("--bundle", required=True)
    r.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    r.add_argument("--warmup", type=int, default=20)
    r.add_argument("--repeat", type=int, default=50)
    r.add_argument("--time-budget-s", type=float, default=300.0, help="stop starting new models after this")
    args = parser.parse_args(argv)
    (pack if args.cmd == "pack" else run)(args)


if __name__ == "__main__":
    main()
