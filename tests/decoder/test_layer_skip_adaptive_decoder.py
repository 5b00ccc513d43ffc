"""layer-skip(mode=adaptive) on a decoder: a per-token FFN gate under an ONNX If, a real branch in the compiled code.

A tiny random Llama (SmolLM2's tokenizer, 2 layers, chunk 16: the shared ``tiny`` fixture): with ratio 0 nothing is
skipped and the rewritten and compiled models give the original's logits; with ratio 0.5 the compiled decode step
runs the FFN kernels only for the gates that say run (VM profiler call counts), token-by-token decoding equals the
masked prefill (the same decisions), the greedy tokens equal those of the artifact's own model.onnx under
onnxruntime, and the generation and the compile report give the measured skip rate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = ("The harbour town wakes up slowly", "Good soup does not need")
#: Prefill chunk of the ``tiny`` fixture.
CHUNK = 16


@pytest.fixture(scope="module")
def adaptive(tiny):
    import effc

    _, graph, tokenizer, folder = tiny
    return effc.compile(graph, passes="layer-skip(mode=adaptive,ratio=0.5)", out_dir=folder / "half",
                        latency_repeat=1, calibration_samples=4)


def _ort_session(artifact):
    from effc.ir.decoder import decoder_info, specialize
    from effc.ir.model import load
    from effc.runtime.decoder import DecoderSession, OrtBackend

    generic = load(artifact / "model.onnx")
    info = {**decoder_info(generic), "chunk": CHUNK}
    return DecoderSession(OrtBackend({"prefill": specialize(generic, CHUNK), "decode": specialize(generic, 1)}), info)


def test_ratio_zero_skips_nothing_and_is_exact(tiny):
    import effc
    import effc.runtime
    from effc.ir.decoder import decoder_info, specialize
    from effc.runtime.decoder import DecoderSession, OrtBackend

    _, graph, tokenizer, folder = tiny
    result = effc.compile(graph, passes="layer-skip(mode=adaptive,ratio=0)", out_dir=folder / "zero",
                          latency_repeat=1, calibration_samples=2)
    stats = result.manifest["passes"][0]["stats"]
    assert [g["threshold"] for g in stats["gates"]] == [float("inf")] * 2 and stats["calibration_skip_rate"] == 0
    ids = tokenizer(PROMPTS[0])["input_ids"]
    original = DecoderSession(OrtBackend({"prefill": specialize(graph, CHUNK)}),
                              {**decoder_info(graph), "chunk": CHUNK})
    reference = original.prefill(ids)
    rewritten = _ort_session(result.out_dir)
    np.testing.assert_allclose(rewritten.prefill(ids), reference, atol=1e-5)
    compiled = effc.runtime.load(result.out_dir).decoder()
    np.testing.assert_allclose(compiled.prefill(ids), reference, atol=1e-5)
    assert compiled.ffn_skip.summary()["prefill"]["skipped"] == 0


def test_gates_are_if_nodes_and_the_report_gives_the_skip_rate(adaptive):
    from effc.ir.model import load

    generic = load(adaptive.out_dir / "model.onnx")
    assert [n.op_type for n in generic.graph].count("If") == 2
    assert generic.graph.outputs[-1].name == "ffn_gates"
    stats = adaptive.manifest["passes"][0]["stats"]
    assert stats["calibration_skip_rate"] == 0.5 and stats["granularity"] == "token"
    skip = adaptive.report["decoder"]["ffn_skip"]
    assert skip["eval_text"]["ffn_calls"] == 2 * skip["eval_text"]["tokens"] > 1000
    assert 0 < skip["eval_text"]["skip_rate"] < 1 and skip["latency_decode"]["tokens"] >= 16
    assert adaptive.manifest["decoder"]["ffn_gates"]["names"] == [g["name"] for g in stats["gates"]]


def test_compiled_decode_step_runs_ffn_kernels_only_for_gates_that_run(adaptive, tiny):
    import tvm

    import effc.runtime
    from effc.codegen import build

    tokenizer = tiny[2]
    session = effc.runtime.load(adaptive.out_dir).decoder()
    vm = build.load_vm(adaptive.out_dir / "model.so", tvm.cpu())
    ids = tokenizer(" ".join(PROMPTS) + " in the morning, when the boats come back with fish")["input_ids"]
    session.prefill(ids[:4])
    ran, calls = [], []
    for token in ids[4:]:
        mask = np.full((1, session.max_cache + 1), -1.0e9, dtype=np.float32)
        mask[0, :session.length] = mask[0, -1] = 0.0
        args = [np.asarray([[token]], dtype=np.int64), np.asarray([[session.length]], dtype=np.int64), mask,
                *session.cache.values()]
        kernels = build.kernel_profile(vm, [build.to_tvm_tensor(a, tvm.cpu()) for a in args], reps=1, entry="decode")
        calls.append(sum(k["calls"] for k in kernels if not k["name"].startswith("vm.builtin")))
        before = session.ffn_skip.summary().get("decode", {"skipped": 0, "ffn_calls": 0})
        session.decode(token)
        after = session.ffn_skip.summary()["decode"]
        ran.append((after["ffn_calls"] - before["ffn_calls"]) - (after["skipped"] - before["skipped"]))
    assert len(set(ran)) > 1, ran  # some steps skip more FFNs than others
    # every FFN that runs adds the same kernel calls; a skipped one adds none
    per_ffn = {(c - min(calls)) / (r - min(ran)) for c, r in zip(calls, ran, strict=True) if r != min(ran)}
    assert len(per_ffn) == 1 and per_ffn.pop() >= 2, (ran, calls)


def test_decode_equals_masked_prefill_and_greedy_matches_model_onnx(adaptive, tiny):
    import effc.runtime

    tokenizer = tiny[2]
    compiled = effc.runtime.load(adaptive.out_dir).decoder()
    reference = _ort_session(adaptive.out_dir)
    ids = tokenizer(PROMPTS[0] + " and the gulls are loud")["input_ids"]
    whole = compiled.prefill(ids)
    compiled.reset()
    compiled.prefill(ids[:2])
    steps = np.stack([compiled.decode(t) for t in ids[2:]])
    np.testing.assert_allclose(steps, whole[2:], atol=1e-4)  # the same gate decisions token by token
    for prompt in PROMPTS:
        mine = compiled.generate(prompt, max_new_tokens=12)
        reference.tokenizer = tokenizer
        ref = reference.generate(prompt, max_new_tokens=12)
        assert mine.tokens == ref.tokens and len(mine.tokens) == 12
        assert mine.ffn_skip["decode"] == ref.ffn_skip["decode"]
        assert mine.ffn_skip["decode"]["ffn_calls"] == 2 * 11  # the 12th token is sampled, not decoded


def test_generate_json_gives_the_skip_rate(adaptive):
    from click.testing import CliRunner

    from effc.cli import cli

    run = CliRunner().invoke(cli, ["generate", str(adaptive.out_dir), "--prompt", PROMPTS[1], "--max-new-tokens",
                                   "6", "--json"])
    assert run.exit_code == 0, run.output
    result = json.loads(run.output.strip().splitlines()[-1])
    skip = result["ffn_skip"]
    assert skip["decode"]["ffn_calls"] == 2 * 5 and 0 <= skip["decode"]["skip_rate"] <= 1
    assert skip["prefill"]["tokens"] == result["prompt_tokens"]
    run = CliRunner().invoke(cli, ["generate", str(adaptive.out_dir), "--prompt", PROMPTS[1], "--max-new-tokens", "6"])
    assert run.exit_code == 0 and "of 10 FFN calls skipped in decode" in run.output, run.output


def test_options_that_make_no_sense_for_a_decoder_are_refused(tiny):
    from effc.decoder.compile import calibration_feeds
    from effc.errors import PassError
    from effc.ir.calibration import Calibration
    from effc.ir.decoder import decoder_info, specialize
    from effc.passes.layer_skip import LayerSkipPass

    _, graph, tokenizer, _ = tiny
    info = {**decoder_info(graph), "chunk": CHUNK}
    calibration = Calibration(calibration_feeds(info, [list(range(100, 100 + CHUNK))], CHUNK), "tokens")
    for options, match in (({"count": 1}, "count="), ({"blocks": "layer", "ratio": 0.2}, "blocks=ffn"),
                           ({"max_ppl_increase": 0.1, "ratio": 0.2}, "max_ppl_increase"), ({}, "ratio=")):
        with pytest.raises(PassError, match=match):
            LayerSkipPass(mode="adaptive", calibration=calibration, **options)(specialize(graph, CHUNK))


def test_global_allocation_shares_one_threshold(tiny):
    from effc.decoder.compile import calibration_feeds
    from effc.ir.calibration import Calibration
    from effc.ir.decoder import decoder_info, specialize
    from effc.passes.layer_skip import LayerSkipPass

    _, graph, tokenizer, _ = tiny
    info = {**decoder_info(graph), "chunk": CHUNK}
    ids = tokenizer(" ".join(PROMPTS) * 4)["input_ids"]
    windows = [ids[:CHUNK], ids[CHUNK:2 * CHUNK]]
    p = LayerSkipPass(mode="adaptive", ratio=0.5, allocate="global",
                      calibration=Calibration(calibration_feeds(info, windows, CHUNK), "tokens"))
    assert p(specialize(graph, CHUNK)).modified
    assert len({g["threshold"] for g in p.stats["gates"]}) == 1
    assert abs(p.stats["calibration_skip_rate"] - 0.5) <= 0.2  # re-measured with the gates in place
