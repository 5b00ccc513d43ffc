"""The ``effc`` command line: a thin layer over the Python API (every command calls one API function).

Errors that effc raises on purpose (:class:`effc.errors.EffcError`) print as one line on stderr with a non-zero
exit code; ``effc --debug ...`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from effc.errors import ArtifactError, DataError, EffcError

console = Console()
err_console = Console(stderr=True)

EPILOG_COMPILE = """\b
Examples:
  effc compile zoo:ppocr-cls -o out
  effc compile zoo:minilm-l6 --passes "prune(sparsity=0.3)" -o out-pruned
  effc compile model.onnx --input-shape x=1x3x224x224 --data samples.npz -o out
  effc compile model.onnx --passes "prune(sparsity=0.5,method=wanda),cleanup" --verify-each --dump-ir ir/ -o out
  effc compile zoo:minilm-l6 --passes "nm-sparsity(n=2,m=4,vector=1,layers=ffn,reconstruct=block)" \\
      --calibration-samples 256 -o out-24
  effc compile zoo:minilm-l6 --passes "nm-sparsity(n=2,m=4,vector=16)" --min-cosine 0.95 -o out  # exit 4 if lossier

\b
MODEL is a path to an .onnx file or a built-in real model: zoo:minilm-l6, zoo:ppocr-det, zoo:ppocr-rec,
zoo:ppocr-cls, zoo:magika, zoo:silero-vad (weights ship inside pip packages; nothing is downloaded).
See `effc passes` for the passes and their options, `effc targets` for targets.

\b
Exit codes: 0 written; 1 bad input or a failed step (one error line); 3 internal error (a bug: rerun with
--debug); 4 a quality gate (--min-cosine, --max-top1-drop, --max-ppl-increase) missed: nothing written
(with --keep-failed: written, marked failed).
"""


def _parse_target_options(values: tuple[str, ...]) -> dict[str, object]:
    options: dict[str, object] = {}
    for text in values:
        key, sep, raw = text.partition("=")
        if not sep or not key.strip():
            raise EffcError(f"target option {text!r} is not KEY=VALUE", "write e.g. -O schedule=naive")
        low = raw.strip().lower()
        value: object = raw.strip()
        if low in ("true", "false"):
            value = low == "true"
        else:
            try:
                value = int(raw)
            except ValueError:
                try:
                    value = float(raw)
                except ValueError:
                    pass
        options[key.strip().replace("-", "_")] = value
    return options


def _parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    from effc.errors import ShapeError
    from effc.ir.canonicalize import parse_input_shape

    shapes: dict[str, tuple[int, ...]] = {}
    for text in values:
        name, dims = parse_input_shape(text)
        if name in shapes and shapes[name] != dims:
            raise ShapeError(f"--input-shape gives input {name!r} two shapes", "give each input's shape once")
        shapes[name] = dims
    return shapes


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="Log progress (-v: info, -vv: debug).")
@click.version_option(package_name="effc")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """effc: compress a trained network and compile it for CPU, CUDA or a Cortex-M microcontroller.

    The flow: load (ONNX or zoo model) → canonicalize (static shapes, constant folding) → passes
    (pruning, N:M sparsity, block quantization, ...) → lower with Apache TVM → artifact folder with
    model.onnx (the rewritten graph, runs in onnxruntime), the compiled code, manifest.json and a
    report (fidelity vs the original under onnxruntime, bytes, MACs, latency).
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # minutes-long steps announce themselves (tuning plan with a time estimate, per-kernel result)
        for name in ("effc.codegen.tune", "effc.passes.block_recon", "effc.passes.model_recon"):
            logging.getLogger(name).setLevel(logging.INFO)


@cli.command(epilog=EPILOG_COMPILE)
@click.argument("model")
@click.option(
    "-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="Artifact folder to write."
)
@click.option(
    "--passes", default="", metavar="TEXT", help='Pipeline, e.g. "prune(sparsity=0.3),cleanup". Default: none.'
)
@click.option("--target", default="cpu", show_default=True, help="Target name (see `effc targets`).")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    metavar="NAME=DxDxD",
    help="Fix an input's shape, e.g. x=1x3x48x192 (repeatable). Needed for dynamic dimensions.",
)
@click.option(
    "--data",
    type=click.Path(exists=True),
    help="Samples: .npz keyed by input name (optional leading sample axis) or a folder of .npz. The first "
    "--calibration-samples calibrate (default: half), up to --eval-samples of the rest evaluate. Default: zoo "
    "samples or synthetic.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Threads for the artifact and for onnxruntime.",
)
@click.option("--mcpu", default=None, help="CPU model for LLVM (default: detected from this machine).")
@click.option("--no-fast-math", is_flag=True, help="Keep exact erf/exp/tanh (CPU target).")
@click.option("--tune", type=click.IntRange(min=0), default=0, metavar="N",
              help="CPU: tune the heaviest kernels with N MetaSchedule trials in all (default 0: off); cached per "
              "CPU and reused.")
@click.option("--arch", default=None, help="GPU architecture for --target cuda: sm_80, sm_86, sm_89, sm_90 (default).")
@click.option("--gpu-precision", default=None, metavar="P",
              help="cuda: fp32 (default, exact) or fp16 (tensor cores, fp32 accumulation); see `effc targets`.")
@click.option("--fallback", default=None, metavar="dense",
              help="cuda: run effc operators without a CUDA lowering (all but block-quant) as their reference "
                   "ONNX bodies (default: an error naming them).")
@click.option("--flash", default=None, help="Flash budget for microcontroller targets, e.g. 1M.")
@click.option("--ram", default=None, help="RAM budget for microcontroller targets, e.g. 256K.")
@click.option("--force", is_flag=True,
              help="Replace an existing artifact folder (only one effc wrote; any other folder is refused).")
@click.option("--verify-each", is_flag=True, help="Run the ONNX checker and shape inference after every pass.")
@click.option("--dump-ir", type=click.Path(file_okay=False), help="Write the model after each pass (numbered .onnx).")
@click.option(
    "--calibration-samples",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Samples that data-driven passes (wanda, reconstruct, gptq, ...) calibrate on. Default: 32 zoo or "
    "synthetic samples; with --data, its first half. More distinct samples fit better: reconstruct=block wants "
    "128-512 (slower). With --data, N must leave at least one sample for evaluation (else an error).",
)
@click.option("--eval-samples", type=click.IntRange(min=1), default=8, show_default=True, metavar="N",
              help="Held-out samples for the fidelity report (fewer, with a warning, when --data holds no more).")
@click.option("--no-latency", is_flag=True, help="Skip the latency comparison with onnxruntime.")
@click.option("--max-cache", type=click.IntRange(min=1), default=None, metavar="N",
              help="Decoders: KV-cache length in tokens (prompt + generated; default 2048).")
@click.option("--chunk", type=click.IntRange(min=1), default=None, metavar="P",
              help="Decoders: tokens per prefill call (default 128).")
@click.option("--allow-mismatch", is_flag=True,
              help="Write the artifact even when its outputs disagree with onnxruntime (recorded in the report).")
@click.option("--primary-output", default=None, metavar="NAME",
              help="Output the headline and the quality gates use. Default: the zoo model's (MiniLM: "
              "sentence_embedding), else the first output.")
@click.option("--min-cosine", type=float, default=None, metavar="X",
              help="Quality gate: fail (exit code 4, nothing written) when the primary output's cosine against the "
              "original, mean over the evaluation samples, is below X.")
@click.option("--max-top1-drop", type=float, default=None, metavar="P",
              help="Quality gate for class scores: fail when more than P percent of the evaluation rows change their "
              "top-1 class against the original.")
@click.option("--max-ppl-increase", type=float, default=None, metavar="P",
              help="Quality gate for decoders: fail when perplexity rises by more than P percent.")
@click.option("--keep-failed", is_flag=True,
              help="Write the artifact even when it misses a quality gate, marked failed in manifest and report "
              "(the exit code stays 4).")
@click.option("--strict", is_flag=True,
              help="A lossy pass that changes nothing (matched no layer, quantized no tensor) is an error, not a "
              "warning.")
@click.option(
    "-O",
    "--target-option",
    "target_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other target option, e.g. -O schedule=naive -O opt=-O3 (cortex-m), -O tune=64 (cpu). Repeatable.",
)
@click.pass_context
def compile(
    ctx,
    model,
    out_dir,
    passes,
    target,
    input_shapes,
    data,
    threads,
    mcpu,
    no_fast_math,
    tune,
    arch,
    gpu_precision,
    fallback,
    flash,
    ram,
    force,  # noqa: A001
    verify_each,
    dump_ir,
    calibration_samples,
    eval_samples,
    no_latency,
    max_cache,
    chunk,
    allow_mismatch,
    primary_output,
    min_cosine,
    max_top1_drop,
    max_ppl_increase,
    keep_failed,
    strict,
    target_opts,
):
    """Compile MODEL with the given passes into an artifact folder, and report cost and gain."""

    def run():
        from effc.compiler import compile_model
        from effc.eval.report import summary_rows

        options = _parse_target_options(target_opts)
        if mcpu:
            options["mcpu"] = mcpu
        if no_fast_math:
            options["fast_math"] = False
        for key, value in (("arch", arch), ("gpu_precision", gpu_precision), ("fallback", fallback)):
            if value:
                options[key] = value
        if flash:
            options["flash"] = flash
        if ram:
            options["ram"] = ram
        with console.status(f"compiling {model} for {target} ..."):
            result = compile_model(
                model,
                passes=passes,
                target=target,
                out_dir=out_dir,
                input_shapes=_parse_shapes(input_shapes),
                data=data,
                force=force,
                verify_each=verify_each,
                dump_ir=dump_ir,
                threads=threads,
                eval_samples=eval_samples,
                calibration_samples=calibration_samples,
                measure_latency=not no_latency,
                tune=tune,
                target_options=options,
                max_cache=max_cache,
                chunk=chunk,
                allow_mismatch=allow_mismatch,
                primary_output=primary_output,
                min_cosine=min_cosine,
                max_top1_drop=max_top1_drop,
                max_ppl_increase=max_ppl_increase,
                keep_failed=keep_failed,
                strict=strict,
            )
        table = Table(title=escape(f"effc compile {model} → {result.out_dir}"), show_header=False)
        for key, value in summary_rows(result.report):
            table.add_row(escape(key), escape(value))
        console.print(table)
        calib = result.manifest.get("calibration") or {}
        if calib.get("used_by"):  # only when a data-driven pass received them
            line = f"calibration: {calib['samples']} sample(s) from {calib['source']}"
            console.print(escape(line), highlight=False, soft_wrap=True)
        console.print(escape(f"report: {result.out_dir / 'report.md'}"), highlight=False)
        agreement = result.manifest.get("agreement") or {}
        if agreement.get("ok") is False:
            console.print(escape(f"MISMATCH (--allow-mismatch): {agreement.get('message')}"), style="bold red")

    _guard(ctx, run)


@cli.command()
@click.argument("model")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD", help="Fix an input's shape.")
@click.pass_context
def inspect(ctx, model, input_shapes):
    """Print a model's inputs/outputs, operators (and whether TVM imports each), parameters and MACs."""

    def run():
        from effc.compiler import load_any
        from effc.eval.cost import count_macs, param_bytes, param_count
        from effc.ir.canonicalize import canonicalize
        from effc.ir.model import io_signature
        from effc.ir.queries import op_types

        loaded = load_any(model)
        shapes = {**loaded.input_shapes, **_parse_shapes(input_shapes)}
        canonical = canonicalize(
            loaded.model, input_shapes=shapes or None, constant_inputs=loaded.constant_inputs or None
        )
        from effc.codegen.frontend import unsupported_ops

        missing = unsupported_ops(canonical)
        sig = io_signature(canonical)
        io = Table(title=escape(f"{model}: inputs and outputs"))
        for col in ("kind", "name", "shape", "dtype"):
            io.add_column(col)
        for kind in ("inputs", "outputs"):
            for v in sig[kind]:
                io.add_row(kind[:-1], v["name"], "x".join(map(str, v["shape"])), v["dtype"])
        console.print(io)
        ops = Table(title="operators (after canonicalization)")
        for col in ("op", "count", "TVM import"):
            ops.add_column(col)
        for op, n in sorted(op_types(canonical).items()):
            ops.add_row(op, str(n), "[red]no[/red]" if op in missing else "yes")
        console.print(ops)
        macs = count_macs(canonical)
        console.print(
            f"parameters: {param_count(canonical):,} ({param_bytes(canonical):,} bytes)   MACs: {macs['total']:,}"
        )
        if missing:
            console.print(f"[red]not importable by TVM:[/red] {', '.join(sorted(missing))}")

    _guard(ctx, run)


@cli.command()
@click.argument("name", required=False)
@click.pass_context
def passes(ctx, name):
    """List every pass with its summary and options (or one pass in detail)."""

    def run():
        from effc.passes.pipeline import describe_passes

        found = False
        for p in describe_passes():
            if name and p["name"] != name:
                continue
            found = True
            kind = "exact" if p.get("exact") else "lossy"
            head = _wrapped(f"{p['name']} ({kind}) — {p['summary']}", "", "    ")
            console.print(f"[bold]{escape(p['name'])}[/bold]{escape(head[len(p['name']):])}", highlight=False,
                          soft_wrap=True)
            for opt in p.get("options", []):
                line = f"{opt['name']}: {opt['type']} = {opt['default']!r} — {opt.get('help', '')}".rstrip(" —")
                console.print(escape(_wrapped(line, "    ", "          ")), highlight=False, soft_wrap=True)
        if name and not found:
            raise EffcError(f"unknown pass {name!r}", "run `effc passes` to list them")

    _guard(ctx, run)


def _wrapped(text: str, first: str, rest: str) -> str:
    """``text`` wrapped at word boundaries to the terminal width, continuation lines indented by ``rest``."""
    import textwrap

    width = max(60, min(console.width, 110))
    wrapper = textwrap.TextWrapper(width=width, initial_indent=first, subsequent_indent=rest,
                                   break_long_words=False, break_on_hyphens=False)
    wrapper.wordsep_simple_re = re.compile(r"(\s+|(?<=\|))")  # a long "a|b|c" choice list may break after a "|"
    return wrapper.fill(text)


@cli.command()
def targets():
    """List the compilation targets."""
    from effc.targets import get_target, target_names

    for n in target_names():
        target = get_target(n)
        console.print(f"[bold]{n}[/bold] — {escape(target.summary)}")
        for option, text in getattr(target, "option_help", dict)().items():  # targets that describe their options
            console.print(f"    {option.replace('_', '-')}: {escape(text)}", highlight=False)


@cli.command(name="run")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--data", type=click.Path(exists=True), help=".npz keyed by input name; default: synthetic inputs.")
@click.option("-o", "--output", "out_file", type=click.Path(dir_okay=False), help="Write outputs to this .npz.")
@click.option("--no-check-indices", is_flag=True,
              help="Skip the range check of index inputs (Gather/Scatter indices, token ids; microseconds per run). "
              "Only for data known to be in range: an out-of-range index then accesses memory out of bounds.")
@click.pass_context
def run_cmd(ctx, artifact, data, out_file, no_check_indices):
    """Run a compiled artifact once per sample and print (or save) the outputs."""

    def run():
        import numpy as np

        from effc.api import run_artifact

        if out_file:
            _check_output_file(Path(out_file))  # before the runs, not after them
        results = run_artifact(artifact, data, check_indices=not no_check_indices)
        source = f"--data {data}" if data else "SYNTHETIC (no --data given; the outputs mean nothing)"
        console.print(escape(f"inputs: {source}; {len(results)} run(s)"), highlight=False)
        for i, outputs in enumerate(results):
            for name, arr in outputs.items():
                stats = f"min={arr.min():.6g} max={arr.max():.6g} mean={arr.mean():.6g}" if arr.size else "empty"
                console.print(escape(f"sample {i} {name}: shape={arr.shape} dtype={arr.dtype} {stats}"))
        if out_file:
            flat = {
                f"{name}" if len(results) == 1 else f"{i}/{name}": a
                for i, o in enumerate(results)
                for name, a in o.items()
            }
            try:
                np.savez(out_file, **flat)
            except OSError as exc:
                raise ArtifactError(f"cannot write the outputs to {out_file}: {exc.strerror or exc}",
                                    "give -o a .npz path in a folder you can write to") from exc
            console.print(f"outputs written to {out_file}")

    _guard(ctx, run)


def _check_output_file(path: Path) -> None:
    """Raise ArtifactError when ``effc run -o PATH`` could not write ``path`` (named with the reason)."""
    parent = path.resolve().parent
    reason = (f"folder {parent} does not exist" if not parent.exists() else f"{parent} is a file"
              if not parent.is_dir() else f"folder {parent} is not writable"
              if not os.access(parent, os.W_OK | os.X_OK) else None)
    if reason:
        raise ArtifactError(f"cannot write the outputs to {path}: {reason}",
                            "give -o a .npz path in a folder you can write to")


_EVAL_LABELS = {
    "max_abs_diff": "max |compiled - onnxruntime (rewritten model.onnx)|",
    "min_cosine": "min cosine",
    "ort_median_ms": "onnxruntime (rewritten model.onnx) median ms",
    "effc_median_ms": "effc median ms",
    "ratio": "latency ratio effc / onnxruntime on model.onnx (< 1: effc faster)",
    "baseline": "onnxruntime ran",
}


@cli.command(name="eval")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--data", type=click.Path(exists=True), help=".npz keyed by input name; default: synthetic inputs.")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="Decoders: a UTF-8 text file; reports perplexity (512-token windows) of the artifact and of the "
              "original model under onnxruntime (default for a decoder: effc's held-out English prose).")
@click.option("--json", "as_json", is_flag=True, help="Decoders: print one JSON object.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Threads for the artifact and for onnxruntime (both sides get the same count).")
@click.pass_context
def eval_cmd(ctx, artifact, data, threads, text_file, as_json):
    """Compare a compiled artifact with its model.onnx under onnxruntime (fidelity and latency)."""

    def run():
        from effc.api import evaluate_artifact
        from effc.runtime.manifest import read_manifest

        if text_file is not None or read_manifest(Path(artifact)).get("decoder"):
            if data is not None:  # it would be ignored: perplexity is measured on text
                raise DataError(f"--data {data} does not apply to a decoder (perplexity is measured on text)",
                                "give a UTF-8 text file with --text FILE, or neither for effc's held-out prose")
            from effc.decoder.text import eval_text
            from effc.eval.perplexity import evaluate_text

            text = Path(text_file).read_text(encoding="utf-8") if text_file else eval_text()  # built-in held-out
            result = evaluate_text(artifact, text, threads=threads)
            if as_json:
                click.echo(json.dumps(result))
                return
            table = Table(title=escape(f"effc eval {artifact}" + (f" --text {text_file}" if text_file else "")),
                          show_header=False)
            for key, value in result.items():
                table.add_row(escape(key), escape(str(value)))
            console.print(table)
            return

        summary = evaluate_artifact(artifact, data, threads=threads)
        table = Table(title=escape(f"effc eval {artifact}"), show_header=False)
        for key, value in summary.items():
            label = _EVAL_LABELS.get(key, key)
            table.add_row(escape(label), escape(f"{value:.4g}" if isinstance(value, float) else str(value)))
        console.print(table)

    _guard(ctx, run)


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--data", type=click.Path(exists=True), help=".npz keyed by input name; default: synthetic inputs.")
@click.option(
    "--atol",
    type=click.FloatRange(min=0),
    default=None,
    help="Plain check for every float output: max |compiled - onnxruntime| <= ATOL. Default: 1e-4, or the "
    "quantization-aware check described above for models that quantize activations at run time.",
)
@click.pass_context
def verify(ctx, artifact, data, atol):
    """Run the artifact on its target (qemu for Cortex-M) and check every output against onnxruntime.

    The reference is onnxruntime running the artifact's own model.onnx. Float outputs must have max abs diff
    <= 1e-4 -- except when model.onnx quantizes activations at run time (block-quant(mode=weight_act) or
    mode=kv: effc.BlockQDQ nodes). There, fp32 summation-order differences flip block codes at rounding
    boundaries and the flips cascade (a correct MiniLM MXINT8 W+A artifact: max diff 0.15, rel. L2 0.03), so an
    output passes when its relative L2 error ||ort - compiled|| / ||ort|| is at most 1.5x the relative L2 change
    the activation quantization itself makes (onnxruntime with the quantizers bypassed). That catches wrong
    kernels, scales and layouts, not an artifact that skipped the activation quantization (see the compile
    report's fidelity for that). --atol always selects the plain check. Integer outputs must be equal. Prints,
    per output, max abs diff, cosine, rel. L2 and the criterion applied. Exit code 0 only when all pass.
    """

    def run():
        from effc.api import verify_artifact

        result = verify_artifact(artifact, data, atol=atol)
        console.print("reference: onnxruntime running the artifact's own model.onnx (the rewritten model; "
                      "fidelity against the original model is in report.md)", highlight=False, soft_wrap=True)
        rows = result.pop("outputs", None)
        if rows is None:  # a target's own verify (Cortex-M under QEMU): its facts as a table
            table = Table(title=escape(f"effc verify {artifact}"), show_header=False)
            for label, text in _target_verify_rows(result):
                table.add_row(escape(label), escape(text))
            console.print(table)
        else:
            for key, value in result.items():
                console.print(escape(f"{key}: {value}"), highlight=False, soft_wrap=True)
            for name, row in rows.items():
                console.print(escape(_verify_line(name, row)), highlight=False, soft_wrap=True)
        if not result["ok"]:
            err_console.print("[red]verification failed[/red]: outputs differ from onnxruntime")
            sys.exit(1)
        console.print("[green]verified[/green]")

    _guard(ctx, run)


def _target_verify_rows(result: dict) -> list[tuple[str, str]]:
    """Label and text per fact of a target's verify result (``VerifyResult.to_dict()`` of the Cortex-M targets)."""
    facts = dict(result)
    rows = [("result", "ok" if facts.pop("ok") else "FAILED"), ("criterion", str(facts.pop("criterion", "")))]
    if "target" in facts:
        rows.append(("ran on", f"{facts.pop('target')} under QEMU {facts.pop('machine', '?')}"))
    rows.append(("samples", f"{facts.pop('samples', '?')} ({facts.pop('inputs', '?')} inputs)"))
    steps, one_step = facts.pop("steps", {}) or {}, facts.pop("one_step", {}) or {}
    for name, diff in (facts.pop("max_abs", {}) or {}).items():
        text = f"{diff:.3g}"
        if name in steps:
            text += f"; {one_step.get(name, 0)} element(s) one quantization step ({steps[name]:.3g}) off"
        rows.append((f"output {name}: max abs diff", text))
    if "bit_exact" in facts:
        rows.append(("bit-exact output elements", f"{100 * facts.pop('bit_exact'):.1f}%"))
    per_inference, per_mac = facts.pop("instructions_per_inference", None), facts.pop("instructions_per_mac", None)
    facts.pop("instructions", None)
    macs = facts.pop("macs", None)
    if per_inference:
        extra = f" ({per_mac:.2f} per MAC, {macs:,} MACs)" if per_mac and macs else ""
        rows.append(("instructions per inference", f"{per_inference:,.0f}{extra}"))
    if "flash_bytes" in facts:
        rows.append(("verification firmware flash / RAM",
                     f"{facts.pop('flash_bytes'):,} / {facts.pop('ram_bytes', 0):,} bytes (model, harness and libc)"))
    facts.pop("atol", None)  # stated in the criterion
    rows.extend((key, str(value)) for key, value in facts.items())  # facts a target adds later
    return rows


def _verify_line(name: str, row: dict) -> str:
    """One output's facts, e.g. ``output y: max abs diff 0.1, cosine 0.9995, rel L2 0.03 [quantized] ok``."""
    text = f"output {name}: max abs diff {row['max_abs']:.3g}"
    if row["cosine"] is not None:
        text += f", cosine {row['cosine']:.6f}, rel L2 {row['rel_l2']:.3g}"
    if row.get("quant_rel_l2") is not None:
        text += f" (activation quantization alone: rel L2 {row['quant_rel_l2']:.3g})"
    return f"{text} [{row['criterion']}] {'ok' if row['ok'] else 'FAILED'}"


@cli.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", required=True, help="The prompt text.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, metavar="N")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy; > 0 samples.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampler seed.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template (one user turn).")
@click.option("--speculate", is_flag=True,
              help="Greedy self-speculative decoding with the artifact's draft entry point (layer-skip(mode=draft)): "
                   "the same tokens; reports acceptance rate, draft length and skipped layers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (text and timings) instead of streaming.")
@click.pass_context
def generate(ctx, artifact, prompt, max_new_tokens, temperature, top_p, seed, chat, speculate, as_json):
    """Generate text with a decoder artifact: streams the text, then prefill ms, decode ms/token, tokens/s.

    An adaptive artifact (layer-skip(mode=adaptive)) also reports the FFN calls it skipped in decode.
    """

    def run():
        import effc.runtime

        model = effc.runtime.load(artifact)
        stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
        result = model.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, chat=chat, on_text=stream, speculate=speculate)
        if as_json:
            click.echo(json.dumps(result.to_dict()))
            return
        click.echo()
        decode = f"{result.decode_ms_per_token:.2f} ms/token" if result.decode_ms_per_token else "not measured"
        speed = f"{result.tokens_per_s:.1f} tokens/s" if result.tokens_per_s else "not measured"
        err_console.print(escape(f"prompt {result.prompt_tokens} tokens, prefill {result.prefill_ms:.1f} ms; "
                                 f"{len(result.tokens)} tokens generated, decode {decode}, {speed} "
                                 f"(stopped: {result.stopped})"), highlight=False, soft_wrap=True)
        decode_skip = (result.ffn_skip or {}).get("decode")
        if decode_skip:
            err_console.print(escape(f"FFN skipping: {decode_skip['skipped']} of {decode_skip['ffn_calls']} FFN calls "
                                     f"skipped in decode ({decode_skip['skip_rate']:.1%})"),
                              highlight=False, soft_wrap=True)
        if result.speculation is not None:
            spec = result.speculation
            rate = "n/a" if spec["acceptance_rate"] is None else f"{spec['acceptance_rate']:.0%}"
            err_console.print(escape(f"speculation: draft skips layers {spec['skipped_layers']}, acceptance {rate}, "
                                     f"{spec['verify_calls']} verify calls (mean draft {spec['mean_draft_length']}), "
                                     f"{spec['plain_steps']} plain steps, "
                                     f"{'on' if spec['speculating'] else 'off'} at the end"),
                              highlight=False, soft_wrap=True)

    _guard(ctx, run)


#: Exit code for a failure effc did not anticipate (a bug): distinct from an EffcError's.
INTERNAL_ERROR_EXIT = 3


def _guard(ctx: click.Context, fn) -> None:
    """Run ``fn``; an EffcError or MemoryError prints as one line, any other exception as one "internal error" line.

    ``--debug`` re-raises instead (full traceback). Ctrl-C is left to click ("Aborted!").
    """
    try:
        fn()
    except EffcError as exc:
        if ctx.obj.get("debug"):
            raise
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except MemoryError as exc:  # sizes the user chose (shapes, sample counts), not a bug
        if ctx.obj.get("debug"):
            raise
        err_console.print(
            f"[red]error:[/red] out of memory: {escape(str(exc)[:300])}; fix: use smaller --input-shape values or "
            "fewer samples (--eval-samples, --calibration-samples), or a machine with more memory",
            highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001  (no traceback for users; --debug shows it)
        if ctx.obj.get("debug"):
            raise
        message = f"internal error: {type(exc).__name__}: {str(exc)[:300]}".replace("\n", " ")
        err_console.print(
            f"[red]error:[/red] {escape(message)}; fix: rerun with `effc --debug ...` for the traceback and report "
            "it with the command line",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(INTERNAL_ERROR_EXIT)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. SIGTERM exits through Python's cleanup: a compile removes its staging folder."""
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cli.main(args=argv, prog_name="effc")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])


__all__ = ["cli", "main", "Path"]
