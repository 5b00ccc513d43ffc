"""GPU check of the cuda target: pack artifacts here, run and time them on an NVIDIA GPU machine without TVM.

``pack`` (this machine: effc, TVM, nvcc, onnxruntime) compiles zoo models for ``--arch`` with ``--target cuda``,
saves onnxruntime CPU reference outputs for real eval samples, and gathers the runtime bundle:

    benchmarks/gpu_bundle_<plan>/    (plans: ocr = PP-OCR det/cls/rec, Magika, Silero VAD; minilm = MiniLM-L6 fp16;
                                      llm = a tiny random Llama decoder in fp32 and block-quant int4, MiniLM-L6 int4)
      runtime/lib/      libtvm_runtime.so, libtvm_runtime_cuda.so, libcudart.so.13   (no libtvm_compiler.so)
      runtime/python/   tvm_ffi built for the GPU machine's Python (cp312 wheel, unpacked; tvm_ffi is not abi3)
      artifacts/<tag>/  model.so + manifest.json          refs/<tag>.npz  inputs in_*, reference outputs ref_*
      bundle.json       what was packed, sizes, what was left out and why

Models are added in plan order while the bundle stays under ``--budget-mib`` (64: what one device call carries);
MiniLM-L6's fp32 weights alone are 90 MB, so it travels in fp16 (``--gpu-precision fp16``: 45 MB ``model.so``, word
embedding table in fp16 too) in a bundle of its own. The ``llm`` plan checks effc's CUDA lowerings: block-quant
int4 weights decoded inside the GEMM/GEMV kernels (MiniLM-L6, the decoder) and a decoder whose KV cache stays on the
GPU (``prefill``/``decode`` + ``<entry>_kv_write``). SmolLM2-135M does not fit a bundle (int4 ``model.so`` ~79 MB);
the tiny Llama (2 layers, hidden 64, SmolLM2's vocabulary and tokenizer, random weights, seed 0) exercises the same
code. A decoder's references are the calls a :class:`~effc.runtime.decoder.DecoderSession` makes under
onnxruntime on the artifact's graphs (a prompt of 11 tokens, then 8 greedy decode steps): each call's inputs and
logits.

``run`` (GPU machine: Python 3.12, torch with CUDA, numpy; no TVM, no network) loads each ``model.so`` with
:class:`effc.runtime.vm.VmRunner` (tvm_ffi + TVM's runtime libraries), checks its sha256 against the manifest,
compares the outputs with the references (fp32: max |diff| <= 1e-3; fp16: cosine >= 0.999 and max |diff| <= 2e-2 x
max |ref|), times ``main`` on device-resident inputs with CUDA events (median and min of ``--repeat`` >= 50 runs
after ``--warmup``; a decoder: one ``decode`` call plus its cache write, ms per token) and writes
``$OUT/gpu_check.json``.

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
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: effc and the tests' tiny Llama import from it
#: Bundles (one device call each) → (model, gpu_precision, passes) in packing order; an entry that would pass the
#: budget is left out (recorded). Models are zoo names or :data:`LOCAL_MODELS`. MiniLM-L6 fp32 does not fit (its
#: weights alone are 90 MB): fp16 in a bundle of its own, or int4 block-quant.
INT4 = "block-quant(format=int4)"
PLANS = {
    "ocr": (("ppocr-det", "fp32", ""), ("ppocr-cls", "fp32", ""), ("ppocr-rec", "fp32", ""), ("magika", "fp32", ""),
            ("silero-vad", "fp32", ""), ("ppocr-det", "fp16", "")),
    "minilm": (("minilm-l6", "fp16", ""),),
    "llm": (("tiny-llama", "fp32", ""), ("tiny-llama", "fp32", INT4), ("minilm-l6", "fp32", INT4)),
}
#: Decoder check: prompt tokens (one full prefill chunk of 8 and a padded one) and greedy decode steps.
DECODER_PROMPT, DECODER_STEPS = "The harbour town wakes up slowly, one shutter at a time", 8
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


def tiny_llama(vocab_size: int = 49152, max_cache: int = 64, chunk: int = 8):
    """A 2-layer random Llama (hidden 64, seed 0) exported as an effc decoder graph: the tests' factory.

    With SmolLM2's vocabulary size (the default) it carries SmolLM2's tokenizer, so ``effc.compile`` takes it.
    The model comes from ``tests/decoder/tiny.py`` (the checkout is on ``sys.path``), the one definition of the
    tiny Llama that the decoder tests use too.
    """
    from tests.decoder.tiny import CONFIG
    from tests.decoder.tiny import tiny_llama as factory

    return factory(2, max_cache, chunk, tokenizer=vocab_size == CONFIG["vocab_size"], vocab_size=vocab_size)[1]


#: Models that are not in the zoo: name → a function giving the graph to compile.
LOCAL_MODELS = {"tiny-llama": tiny_llama}


class _Recorder:
    """A decoder backend that runs another one and records every call's inputs and logits (the references)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def bind_cache(self, cache):
        self.inner.bind_cache(cache)

    def run(self, entry, ids, positions, mask):
        out = self.inner.run(entry, ids, positions, mask)
        self.calls.append((entry, ids, positions, mask, out[0]))
        return out


def _decoder_references(artifact: Path) -> dict[str, np.ndarray]:
    """Every call of a prompt prefill and greedy decode steps under onnxruntime: ``call_<i>_{ids,positions,mask,ref}``
    and ``entries`` (the entry point of each call); ``ref`` holds the logits of the call's real tokens."""
    import transformers

    from effc.ir.decoder import specialize
    from effc.ir.model import load
    from effc.runtime.decoder import DecoderSession, OrtBackend

    manifest = json.loads((artifact / "manifest.json").read_text())
    info = manifest["decoder"]
    generic = load(artifact / "model.onnx")
    recorder = _Recorder(OrtBackend({"prefill": specialize(generic, info["chunk"]), "decode": specialize(generic, 1)}))
    session = DecoderSession(recorder, info)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(artifact / info["tokenizer"]))
    ids = list(tokenizer(DECODER_PROMPT)["input_ids"])[:info["chunk"] + 3]
    token = int(np.argmax(session.prefill(ids)[-1]))
    for _ in range(DECODER_STEPS):
        token = int(np.argmax(session.decode(token)))
    arrays = {"entries": np.array([call[0] for call in recorder.calls])}
    for i, (_, call_ids, positions, mask, logits) in enumerate(recorder.calls):
        real = len(ids) - i * info["chunk"] if i * info["chunk"] < len(ids) else 1
        arrays.update({f"call_{i}_ids": call_ids, f"call_{i}_positions": positions, f"call_{i}_mask": mask,
                       f"call_{i}_ref": logits[0, :min(real, call_ids.shape[1])]})
    return arrays


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
        for name, precision, passes in PLANS[args.plan]:
            tag = f"{name}-{precision}" + ("-int4" if passes == INT4 else "")
            start = time.perf_counter()
            try:
                source = LOCAL_MODELS[name]() if name in LOCAL_MODELS else f"zoo:{name}"
                result = effc.compile(source, target="cuda", out_dir=work / tag, eval_samples=1, passes=passes,
                                      measure_latency=False,
                                      target_options={"arch": args.arch, "gpu_precision": precision})
            except EffcError as exc:  # one model failing to build must not stop the others
                summary["left_out"].append({"tag": tag, "why": f"build failed: {exc}"[:400]})
                print(f"left out {tag}: {exc}", flush=True)
                continue
            seconds = time.perf_counter() - start
            refs = (_decoder_references(result.out_dir) if result.manifest.get("decoder") else
                    _references(result.out_dir, zoo.get(name), args.samples))
            size = (result.out_dir / "model.so").stat().st_size + sum(a.nbytes for a in refs.values())
            if _tree_bytes(out) + size > budget:
                summary["left_out"].append({"tag": tag, "bytes": size, "why": "over the bundle budget"})
                print(f"left out {tag}: {size / 2**20:.1f} MiB would pass the budget", flush=True)
                continue
            dest = out / "artifacts" / tag
            dest.mkdir()
            for file in ("model.so", "manifest.json"):  # (a decoder's tokenizer stays here: calls carry token ids)
                shutil.copy2(result.out_dir / file, dest / file)
            np.savez(out / "refs" / f"{tag}.npz", **refs)
            info = result.manifest["target"]["info"]
            summary["models"].append({
                "tag": tag, "precision": precision, "passes": passes, "effc_ops": info.get("effc_ops", {}),
                "model_so_bytes": (dest / "model.so").stat().st_size,
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


def _run_decoder(runner, manifest: dict, refs: dict, args: argparse.Namespace) -> dict:
    """Replay the recorded calls with the KV cache on the GPU (entry, then ``<entry>_kv_write``); time decode."""
    specs = manifest["decoder"]["entries"]["prefill"]["inputs"][3:]  # the cache inputs, after ids/positions/mask
    cache = runner.to_device_arrays([np.zeros(spec["shape"], np.float32) for spec in specs])
    checks, step = [], None
    for i, entry in enumerate(str(e) for e in refs["entries"]):
        ids, positions, mask = runner.to_device_arrays([refs[f"call_{i}_{k}"] for k in ("ids", "positions", "mask")])
        logits, *new = runner.function(entry)(ids, positions, mask, *cache)
        runner.function(f"{entry}_kv_write")(*cache, *new, positions)
        ref = refs[f"call_{i}_ref"]
        checks.append(_compare(runner.to_numpy(logits)[0][0, :len(ref)], ref, "fp32"))
        if entry == "decode":
            step = (ids, positions, mask)

    def decode_once():  # rewrites the last step's slot: the cache stays as it was
        logits, *new = runner.function("decode")(*step, *cache)
        runner.function("decode_kv_write")(*cache, *new, step[1])

    return {"precision": "fp32", "decoder": True, "calls": len(checks), "ok": all(c["ok"] for c in checks),
            "worst_max_abs": max(c["max_abs"] for c in checks), "worst_cosine": min(c["cosine"] for c in checks),
            "effc_decode_step": _time_cuda(decode_once, args.warmup, args.repeat)}


def run(args: argparse.Namespace) -> None:
    """Run, check and time every packed artifact (see the module docstring)."""
    bundle = Path(args.bundle).resolve()
    sys.path.insert(0, str(bundle / "runtime" / "python"))  # before the checkout (ROOT, inserted at import)
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
            refs = dict(np.load(bundle / "refs" / f"{art.name}.npz"))
            if manifest.get("decoder"):
                row.update(_run_decoder(VmRunner(art / "model.so", "cuda", names, entry="prefill"), manifest, refs,
                                        args))
                print(json.dumps(row), flush=True)
                continue
            runner = VmRunner(art / "model.so", "cuda", names)
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
