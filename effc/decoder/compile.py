"""Compile a decoder: passes once on the prefill graph, both entry points from the rewritten weights, one library.

Flow (DESIGN.md, "Decoders"): the token-generic graph (:mod:`effc.ir.decoder`) is specialized to the prefill
chunk ``P``; the passes rewrite it once, calibrated on token windows; the rewritten graph is made token-generic
again and specialized to one token for ``decode``, whose attention becomes ``effc.DecodeAttention``
(:mod:`effc.decoder.attention`: only the valid prefix of the cache is read), and to ``prefill_last``
(:mod:`effc.decoder.last_token`: the chunk's logits of one row only, for generation; ``prefill`` returns every
row's, for perplexity). Under onnxruntime, prefill and decode of the rewritten graphs are checked to agree (a pass
that baked the chunk length in would fail here), and ``prefill_last`` to return ``prefill``'s row. A decoder
whose metadata holds a draft (``layer-skip(mode=draft)``) gets two more entry points, ``draft`` and ``verify``
(:mod:`effc.decoder.speculative`). The CPU target
compiles both into one ``model.so`` (weights once); ``model.onnx`` is the rewritten token-generic graph; the
tokenizer is copied into ``tokenizer/``. The report gives perplexity vs the original model, prefill and decode
latency vs onnxruntime on the same graphs, weight bytes read per decoded token and KV-cache bytes per token.
"""

from __future__ import annotations

import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from effc.decoder import last_token, speculative
from effc.decoder.attention import fuse_decode_attention
from effc.errors import EffcError, PassError, TargetError
from effc.ir.decoder import PREFILL_LAST, decoder_info, regeneralize, specialize

logger = logging.getLogger(__name__)

#: Perplexity windows (tokens) of compile reports and ``effc eval --text``.
PPL_WINDOW = 512
#: Decode steps timed per side in the compile report.
DECODE_STEPS = 16
#: Logit agreement required between prefill and decode of the same rewritten graph under onnxruntime.
CONSISTENCY_ATOL = 1e-3


def calibration_feeds(info: dict[str, Any], windows: list[list[int]], chunk: int) -> list[dict[str, np.ndarray]]:
    """Prefill feeds of token windows from an empty cache (zero cache arrays shared by all feeds)."""
    from effc.ir.decoder import kv_layout

    cache = {slot.input: np.zeros(slot.shape(info, info["max_cache"]), dtype=slot.dtype) for slot in kv_layout(info)}
    masked = np.float32(info.get("masked", -1.0e9))
    mask = np.full((chunk, info["max_cache"] + chunk), masked, dtype=np.float32)
    mask[:, info["max_cache"]:] = np.triu(np.full((chunk, chunk), masked, dtype=np.float32), 1)
    positions = np.arange(chunk, dtype=np.int64)[None]
    return [{"input_ids": np.asarray([w], dtype=np.int64), "positions": positions, "attn_mask": mask, **cache}
            for w in windows]


def _session(backend: Any, info: dict[str, Any], tokenizer: Any = None) -> Any:
    from effc.runtime.decoder import DecoderSession

    return DecoderSession(backend, info, tokenizer)


def check_consistency(graphs: dict[str, ir.Model], info: dict[str, Any], ids: list[int], threads: int) -> float:
    """Max abs logit difference between one prefill of ``ids`` and a shorter prefill followed by 3 decode steps.

    ``prefill_last`` of ``ids`` (when ``graphs`` has it) is checked against the last row of that prefill too.

    Graphs that quantize activations at run time (``effc.BlockQDQ``, ``block-quant(mode=weight_act)``) are checked
    with those quantizers bypassed: the check is about the graph's structure, and a last-ulp difference between the
    prefill and decode shapes' fp32 sums flips an activation code now and then, which 30 layers amplify (SmolLM2
    W4A8: 0.53 in the logits with them, while each token's quantization is per row and independent of the chunk).

    Raises:
        PassError: decode disagrees with prefill by more than :data:`CONSISTENCY_ATOL` (the rewritten graph
            depends on the chunk length, so its decode specialization is wrong), or ``prefill_last`` with
            ``prefill``'s row (its LM head does not read that row only).
    """
    from effc.eval.output_check import dynamic_quant_nodes, without_dynamic_quant
    from effc.runtime.decoder import OrtBackend

    if any(dynamic_quant_nodes(g) for g in graphs.values()):
        graphs = {entry: without_dynamic_quant(g) for entry, g in graphs.items()}
    session = _session(OrtBackend(graphs, threads), info)
    whole = session.prefill(ids)
    if PREFILL_LAST in graphs:
        session.reset()
        last = float(np.abs(session.prefill_last(ids) - whole[-1]).max())
        if last > CONSISTENCY_ATOL:
            raise PassError(f"the decoder's {PREFILL_LAST} entry disagrees with the last row of its prefill by "
                            f"{last:.3g} in the logits (> {CONSISTENCY_ATOL})",
                            "report the pass that rewrote the LM head (the node before the logits)")
    session.reset()
    session.prefill(ids[:-3])
    steps = np.stack([session.decode(t) for t in ids[-3:]])
    diff = float(np.abs(steps - whole[-3:]).max())  # row i: the logits after token i
    if diff > CONSISTENCY_ATOL:
        raise PassError(f"the rewritten decoder's decode step disagrees with its prefill by {diff:.3g} in the "
                        f"logits (> {CONSISTENCY_ATOL}): a pass made the graph depend on the chunk length",
                        "drop the last pass from the pipeline and report it")
    return diff


def _ort_latency(graphs: dict[str, ir.Model], info: dict[str, Any], ids: list[int], threads: int,
                 repeat: int) -> dict[str, Any]:
    from effc.runtime.decoder import OrtBackend

    return latency(_session(OrtBackend(graphs, threads), info), ids, repeat)


def latency(session: Any, ids: list[int], repeat: int) -> dict[str, Any]:
    """Prefill of one full chunk (median/min of ``repeat``) and decode ms per token (median/min of 16 steps).

    The prefill is generation's (:meth:`effc.runtime.decoder.DecoderSession.prefill_last`: the last token's
    logits only, where the session's backend has that entry point).
    """
    chunk = session.chunk
    prompt = (ids * (chunk // max(len(ids), 1) + 1))[:chunk]
    prefill = []
    for _ in range(max(repeat, 1) + 1):
        session.reset()
        start = time.perf_counter()
        session.prefill_last(prompt)
        prefill.append((time.perf_counter() - start) * 1e3)
    prefill = prefill[1:]  # the first call warms up
    steps = []
    token = prompt[-1]
    for _ in range(DECODE_STEPS + 1):
        start = time.perf_counter()
        token = int(np.argmax(session.decode(token)))
        steps.append((time.perf_counter() - start) * 1e3)
    steps = steps[1:]
    return {"prefill_tokens": chunk, "prefill_ms": {"median": round(float(np.median(prefill)), 3),
                                                    "min": round(float(np.min(prefill)), 3)},
            "decode_ms_per_token": {"median": round(float(np.median(steps)), 3), "min": round(float(np.min(steps)), 3)},
            "decode_steps": DECODE_STEPS, "context": chunk}


def compile_decoder(loaded: Any, *, out: Path, tgt: Any, passes: str, options: dict[str, Any], threads: int,
                    calibration_samples: int | None, measure_latency: bool, latency_repeat: int,
                    verify_each: bool, dump_ir: Any, started: float, chunk: int | None = None,
                    max_cache: int | None = None) -> Any:
    """Compile a token-generic decoder graph (see the module docstring) into the artifact folder ``out``.

    Raises:
        PipelineError, PassError, CalibrationError, DataError, TargetError: as :func:`effc.compile`; nothing is
            left in ``out`` on failure.
    """
    from effc.compiler import DEFAULT_CALIBRATION_SAMPLES, CompileResult, _move_into_place, _version
    from effc.decoder import text
    from effc.eval import cost
    from effc.ir.calibration import Calibration
    from effc.ir.decoder import is_decoder
    from effc.ir.model import io_signature, save
    from effc.ir.model import load as load_onnx
    from effc.passes.manager import PassManager
    from effc.passes.pipeline import parse_pipeline
    from effc.runtime.manifest import read_manifest, sha256_of, write_manifest

    if not is_decoder(loaded.model):
        raise EffcError(f"max_cache/chunk apply to decoders only, and {loaded.source['name']} is not one",
                        "drop --max-cache/--chunk, or compile a decoder such as zoo:smollm2-135m")
    for name, value in (("max_cache", max_cache), ("chunk", chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise EffcError(f"{name}={value!r} is not a positive integer", f"give {name} >= 1")
    if max_cache is not None and max_cache != decoder_info(loaded.model)["max_cache"]:
        loaded.model = load_onnx(loaded.zoo.decoder_graph(max_cache)) if loaded.zoo is not None else None
        if loaded.model is None:
            raise EffcError("max_cache of a decoder graph given as a file cannot change (its cache shape is fixed)",
                            "compile the decoder from the zoo to pick --max-cache")
    if not hasattr(tgt, "build_entries"):
        raise TargetError(f"target {tgt.name!r} cannot build decoders (prefill and decode entry points)",
                          "compile decoders for the cpu target")
    info = decoder_info(loaded.model)
    info["chunk"] = int(chunk or info["chunk"])
    if info["chunk"] > info["max_cache"]:
        raise EffcError(f"a prefill chunk of {info['chunk']} tokens exceeds the KV cache of {info['max_cache']}",
                        "give chunk <= max_cache")
    tokenizer_dir = loaded.zoo.tokenizer_dir() if loaded.zoo is not None else info.get("tokenizer_dir")
    tokenizer = _tokenizer(tokenizer_dir)
    if tokenizer is None:
        raise EffcError("a decoder compile needs its tokenizer (calibration windows, evaluation text)",
                        "compile decoders from the zoo, e.g. zoo:smollm2-135m")
    n_calib = calibration_samples or DEFAULT_CALIBRATION_SAMPLES
    windows = text.calibration_windows(tokenizer, n_calib, info["chunk"])
    calibration = Calibration(calibration_feeds(info, windows, info["chunk"]), source=text.CALIBRATION_DESCRIPTION)
    pipeline = parse_pipeline(passes, calibration=calibration)
    prefill = specialize(loaded.model, info["chunk"])
    result = PassManager(pipeline, verify_each=verify_each, dump_ir=dump_ir).run(prefill)
    del prefill
    info = {**decoder_info(result.model), "chunk": info["chunk"]}  # a pass may change the cache (kv_layers, ...)
    generic = regeneralize(result.model)
    decode = specialize(generic, 1)
    fused = fuse_decode_attention(decode)
    fused_prefill = fuse_decode_attention(result.model)  # a first chunk attends to its own tokens, not S slots
    graphs = {"prefill": result.model, "decode": decode, PREFILL_LAST: last_token.entry_graph(generic, info["chunk"])}
    entries = {**graphs, **speculative.entry_graphs(generic, info)}  # + draft, verify (layer-skip draft)
    eval_ids = list(tokenizer(text.eval_text())["input_ids"])
    consistency = check_consistency(graphs, info, eval_ids[:info["chunk"] + 2], threads)
    stop_ids = sorted({int(t) for t in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
                       if t is not None and t >= 0 and t != tokenizer.unk_token_id})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save(generic, tmp / "model.onnx")
        del generic
        tokenizer.save_pretrained(tmp / "tokenizer")
        token_files = sorted(str(p.relative_to(tmp)) for p in (tmp / "tokenizer").rglob("*") if p.is_file())
        build_started = time.perf_counter()
        build = tgt.build_entries(entries, tmp, options)
        build_seconds = time.perf_counter() - build_started
        decoder = {**info, "entries": {name: io_signature(g) for name, g in entries.items()},
                   "tokenizer": "tokenizer", "stop_token_ids": stop_ids,
                   "chat_template": bool(getattr(tokenizer, "chat_template", None))}
        manifest = {
            "effc_version": _version(), "source": loaded.source, "pipeline": str(pipeline),
            "passes": [r.to_dict() for r in result.records],
            "calibration": {"samples": len(calibration), "source": calibration.source,
                            "used_by": [str(p) for p in pipeline if getattr(p, "uses_calibration", False)]},
            "target": {"name": tgt.name, "options": options, "info": build.info},
            **io_signature(graphs["prefill"]), "decoder": decoder,
        }
        runner = (tgt.load(tmp, {**manifest, "files": {rel: sha256_of(tmp / rel) for rel in build.files}})
                  if tgt.can_run_here() else None)  # e.g. a cuda artifact built here: nothing to run it on
        report = evaluate_decoder(loaded.model, graphs, runner, info, tokenizer, eval_ids, threads,
                                  measure_latency, latency_repeat)
        report["decoder"]["prefill_decode_consistency_max_abs"] = consistency
        report["decoder"]["decode_attention_fused_layers"] = fused
        report["decoder"]["prefill_attention_fused_layers"] = fused_prefill
        if info.get("draft"):
            report["decoder"]["draft"] = info["draft"]
        weight_bytes = bytes_read_per_token(graphs["decode"])
        kv_bytes = kv_bytes_per_token(info)
        report["decoder"].update(weight_bytes_per_decoded_token=weight_bytes, kv_cache_bytes_per_token=kv_bytes,
                                 kv_cache_bytes=kv_bytes * info["max_cache"])
        if info.get("kv_format") is not None:  # block-quant(mode=kv): MX rows, or float32 values on the MX grid
            report["decoder"].update(kv_format=info["kv_format"], kv_format_bytes_per_token=kv_bytes_per_token(
                info, info["kv_format"], info.get("kv_block_size", 32)),
                kv_cache_storage="mx rows" if info.get("kv_row_bytes") else "float32 on the MX grid")
        report.update(model={"name": loaded.source["name"], "source": loaded.source.get("path")},
                      target={"name": tgt.name, "options": options, "info": build.info}, pipeline=str(pipeline),
                      passes=manifest["passes"],
                      inputs={"description": text.EVAL_DESCRIPTION, "synthetic": False, "count": len(eval_ids),
                              "calibration_samples": len(calibration), "calibration_source": calibration.source},
                      compile_seconds=round(time.perf_counter() - started, 3), build_seconds=round(build_seconds, 3),
                      cost={"params_bytes_before": cost.param_bytes(specialize(loaded.model, 1)),
                            "params_bytes_after": weight_bytes,
                            "sparsity": {"total": cost.sparsity_stats(graphs["decode"])["total"]}})
        from effc.eval.report import write_report

        report_files = write_report(tmp, report)
        manifest["metrics"] = {"decoder": report["decoder"], "cost": report["cost"]}
        write_manifest(tmp, manifest, files=["model.onnx", *token_files, *build.files, *report_files])
        del runner
        gc.collect()
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CompileResult(out, read_manifest(out), report)


def kv_bytes_per_token(info: dict[str, Any], kv_format: str | None = None, block_size: int = 32) -> float:
    """Bytes of keys and values one token adds to the cache, all layers.

    By default the bytes the runtime really stores (:func:`effc.ir.decoder.kv_layout`: float32 entries, or MX rows
    of codes and scales); with ``kv_format`` the bytes that block format needs for the same entries (element codes
    plus one scale per ``block_size``).
    """
    from effc.ir.decoder import kv_layout
    from effc.ops.block_formats import bits_per_weight

    layout = kv_layout(info)
    if kv_format is None:
        return sum(int(np.prod(slot.shape(info, 1))) * np.dtype(slot.dtype).itemsize for slot in layout)
    elements = len(layout) * int(info["kv_heads"]) * int(info["head_dim"])
    return elements * bits_per_weight(kv_format, block_size) / 8


def bytes_read_per_token(model: ir.Model) -> int:
    """Weight bytes one call of ``model`` reads (the decode graph: one token).

    Every initializer counts in full, except lookup tables read only through Gather-like nodes (``Gather``,
    ``effc.BlockQuantGather``, as data input 0), which count one row along the gathered axis, and the weights of an
    ``effc.MoEFFN``, which count its router, shared expert and ``top_k`` routed experts only
    (:func:`effc.ops.moe.weight_bytes_per_token`).
    """
    from effc.ops.moe import OP_TYPE as MOE
    from effc.ops.moe import layout_of, weight_bytes_per_token

    total, moe_read = 0, set()
    for node in model.graph:
        layout = layout_of(node) if node.op_type == MOE else None
        if layout is not None:
            total += weight_bytes_per_token(layout)
            moe_read |= {id(v) for v in node.inputs[1:] if v is not None}
    for value in model.graph.initializers.values():
        if id(value) in moe_read:
            continue
        nbytes = value.const_value.nbytes if value.const_value is not None else 0
        uses = list(value.uses())
        if uses and all(u.node.op_type.endswith("Gather") and u.idx == 0 for u in uses):
            rows = value.const_value.shape[0] if value.const_value.shape else 1
            axis = uses[0].node.attributes.get_int("axis", 0)
            rows = value.const_value.shape[axis] if len(value.const_value.shape) > axis else rows
            total += -(-nbytes // max(rows, 1))
        else:
            total += nbytes
    return int(total)


def _tokenizer(folder: Path | None) -> Any:
    if folder is None:
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))


def evaluate_decoder(original: ir.Model, graphs: dict[str, ir.Model], runner: Any, info: dict[str, Any],
                     tokenizer: Any, eval_ids: list[int], threads: int, measure_latency: bool,
                     repeat: int) -> dict[str, Any]:
    """Perplexity (original under onnxruntime, rewritten under onnxruntime, compiled) and latency of both sides.

    ``runner`` None (the artifact cannot run on this machine): the compiled perplexity and latency are not measured
    (None, with ``compiled_not_measured`` saying why).
    """
    from effc.runtime.decoder import OrtBackend, compiled_backend, perplexity

    window = min(PPL_WINDOW, info["max_cache"])  # a cache shorter than the window scores shorter windows (stated)
    original_info = {**decoder_info(original), "chunk": info["chunk"]}  # its own cache (all layers, float32)
    ppl = {"original_onnxruntime": perplexity(_session(OrtBackend({"prefill": specialize(original, info["chunk"])},
                                                                  threads), original_info), eval_ids, window)}
    gc.collect()
    ppl["rewritten_onnxruntime"] = perplexity(_session(OrtBackend({"prefill": graphs["prefill"]}, threads), info),
                                              eval_ids, window)
    gc.collect()
    base = ppl["original_onnxruntime"]["perplexity"]
    if runner is None:
        ppl["compiled"] = None
        return {"decoder": {"perplexity": ppl, "perplexity_window": window, "perplexity_change_pct": None,
                            "eval_text": "held-out original English prose", "max_cache": info["max_cache"],
                            "chunk": info["chunk"],
                            "compiled_not_measured": "the target's device is not on this machine"}}
    compiled = _session(compiled_backend(runner), info)
    ppl["compiled"] = perplexity(compiled, eval_ids, window)
    skips = {"eval_text": compiled.ffn_skip.summary().get("prefill")} if compiled.ffn_skip is not None else None
    report: dict[str, Any] = {"decoder": {
        "perplexity": ppl, "perplexity_window": window, "eval_text": "held-out original English prose",
        "perplexity_change_pct": round((ppl["compiled"]["perplexity"] / base - 1) * 100, 3),
        "max_cache": info["max_cache"], "chunk": info["chunk"]}}
    if measure_latency:
        if skips is not None:
            compiled.ffn_skip.reset()
        mine = latency(compiled, eval_ids, min(repeat, 5))
        if skips is not None:
            skips["latency_decode"] = compiled.ffn_skip.summary().get("decode")
        ort = _ort_latency(graphs, info, eval_ids, threads, min(repeat, 5))
        report["decoder"]["latency"] = {
            "threads": threads, "baseline": "onnxruntime on the same rewritten prefill/decode graphs",
            "effc": mine, "ort": ort,
            "prefill_ratio": round(mine["prefill_ms"]["median"] / ort["prefill_ms"]["median"], 3),
            "decode_ratio": round(mine["decode_ms_per_token"]["median"] / ort["decode_ms_per_token"]["median"], 3)}
    if skips is not None:  # layer-skip(mode=adaptive): FFN calls skipped by the compiled artifact, measured
        report["decoder"]["ffn_skip"] = skips
    return report
