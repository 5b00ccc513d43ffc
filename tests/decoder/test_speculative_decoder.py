"""Self-speculative decoding on a tiny random Llama (SmolLM2's tokenizer and vocabulary, 4 layers).

``layer-skip(mode=draft)`` adds ``draft`` and ``verify`` entry points over the same weights and cache; greedy
generation with ``speculate`` gives the same tokens as plain greedy decoding (adaptive, and with the draft length
fixed so that every step drafts and verifies); the draft equals the transformers model without the skipped layers
on an empty context; the verify entry point equals prefill; the controller switches itself off when drafting does
not pay.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.decoder.tiny import without_layers

PROMPTS = ("The harbour town wakes up slowly", "A bicycle is a simple machine", "Good soup does not need",
           "Once upon a time there was", "The committee met on Tuesday to")


@pytest.fixture(scope="module")
def drafted(tiny4):
    import effc
    import effc.runtime

    _, graph, _, folder = tiny4
    result = effc.compile(graph, passes="layer-skip(mode=draft)", out_dir=folder / "draft", latency_repeat=1,
                          calibration_samples=4)
    return result, effc.runtime.load(result.out_dir)


@pytest.mark.slow
def test_draft_and_verify_entry_points_in_the_artifact(drafted):
    result, _ = drafted
    stats = result.manifest["passes"][0]["stats"]
    draft = result.manifest["decoder"]["draft"]
    assert draft["skip_layers"] == [int(name.split(".")[1]) for name in stats["draft"]["layers"]]
    assert 1 <= len(draft["skip_layers"]) <= 2 and draft["tokens"] == 4  # measured prefixes: 1 to half the layers
    assert [t["count"] for t in stats["draft_trials"]] == [1, 2]
    assert all(0.0 <= t["agreement"] <= 1.0 and t["modeled_speedup"] > 0 for t in stats["draft_trials"])
    entries = result.manifest["decoder"]["entries"]
    assert set(entries) == {"prefill", "prefill_last", "decode", "draft", "verify"}
    inputs = {name: [i["name"] for i in e["inputs"]] for name, e in entries.items()}
    assert inputs["draft"] == inputs["decode"] == inputs["verify"]  # one call signature over the whole cache
    outputs = [o["name"] for o in entries["draft"]["outputs"]]
    assert not any(o.endswith(f".{layer}") for o in outputs for layer in draft["skip_layers"])
    assert len(outputs) == 1 + 2 * (4 - len(draft["skip_layers"]))
    assert entries["verify"]["inputs"][0]["shape"] == [1, 5]
    assert result.report["decoder"]["draft"]["skip_layers"] == draft["skip_layers"]
    # the two added entry points share the weights: the library grows by code, not by another 12.6 MB embedding
    assert (result.out_dir / "model.so").stat().st_size < (result.out_dir / "model.onnx").stat().st_size * 2.2


@pytest.mark.slow
def test_speculative_greedy_equals_plain_greedy(tiny4, drafted):
    _, _, tokenizer, _ = tiny4
    session = drafted[1].decoder()
    drafted_total = 0
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        plain = session.generate(ids, max_new_tokens=24)
        for mode in (True, 1, 4):
            mine = session.generate(ids, max_new_tokens=24, speculate=mode)
            assert mine.tokens == plain.tokens, (prompt, mode)
            spec = mine.speculation
            assert spec["accepted"] <= spec["drafted"] and spec["skipped_layers"] == session.info["draft"][
                "skip_layers"]
            if mode is not True:
                assert spec["verify_calls"] > 0 and spec["mean_draft_length"] <= mode
                assert spec["accepted"] + spec["verify_calls"] + spec["plain_steps"] + 1 >= len(mine.tokens)
                drafted_total += spec["drafted"]
    assert drafted_total > 50
    controller = session.draft_controller  # adaptive generations share what they measured
    session.generate(tokenizer(PROMPTS[0])["input_ids"], max_new_tokens=4, speculate=True)
    assert session.draft_controller is controller and controller.decode_ms is not None


@pytest.mark.slow
def test_draft_on_an_empty_context_is_the_model_without_its_skipped_layers(tiny4, drafted):
    import torch

    hf, _, tokenizer, _ = tiny4
    session = drafted[1].decoder()
    short = without_layers(hf, set(session.info["draft"]["skip_layers"]))
    from effc.decoder.speculative import draft_layout

    for token in tokenizer(PROMPTS[0])["input_ids"][:3]:
        session.reset()
        mine = session.call_entry("draft", [token], 1, draft_layout(session.info))
        with torch.no_grad():
            ref = short(torch.tensor([[token]])).logits[0].numpy()
        np.testing.assert_allclose(mine, ref, atol=1e-4)


@pytest.mark.slow
def test_verify_equals_prefill_and_writes_every_layer(tiny4, drafted):
    _, _, tokenizer, _ = tiny4
    session = drafted[1].decoder()
    ids = tokenizer(PROMPTS[1])["input_ids"][:9]
    session.reset()
    whole = session.prefill(ids)
    cache = {name: array.copy() for name, array in session.cache.items()}
    session.reset()
    session.prefill(ids[:-3])
    for name, array in session.cache.items():  # stale entries where the verify call must write every layer's
        index = [slice(None)] * 3
        index[2 if name.startswith("past_key") else 1] = slice(len(ids) - 3, len(ids))
        array[tuple(index)] = 7.0
    got = session.call_entry("verify", ids[-3:], 5)
    np.testing.assert_allclose(got, whole[-3:], atol=1e-4)
    assert session.length == len(ids)
    for name, array in session.cache.items():
        axis = 2 if name.startswith("past_key") else 1
        np.testing.assert_allclose(np.take(array, range(len(ids)), axis=axis),
                                   np.take(cache[name], range(len(ids)), axis=axis), atol=1e-5)


@pytest.mark.slow
def test_cli_generate_speculate_json(drafted):
    from click.testing import CliRunner

    from effc.cli import cli

    out = drafted[0].out_dir
    run = CliRunner().invoke(cli, ["generate", str(out), "--prompt", PROMPTS[2], "--max-new-tokens", "12",
                                   "--speculate", "--json"])
    assert run.exit_code == 0, run.output
    result = json.loads(run.output.strip().splitlines()[-1])
    spec = result["speculation"]
    assert spec["skipped_layers"] == drafted[0].manifest["decoder"]["draft"]["skip_layers"]
    assert {"acceptance_rate", "mean_draft_length", "tokens_per_verify", "speculating"} <= set(spec)
    assert result["tokens_per_s"] > 0
    run = CliRunner().invoke(cli, ["generate", str(out), "--prompt", "x", "--speculate", "--temperature", "0.7"])
    assert run.exit_code != 0 and "greedy" in run.output


class _NoBackend:
    def bind_cache(self, cache):
        self.cache = cache


def test_speculate_without_a_draft_entry_names_the_fix():
    from effc.errors import ArtifactError, DataError
    from effc.runtime.decoder import DecoderSession

    info = {"layers": 2, "kv_heads": 1, "head_dim": 8, "max_cache": 16, "chunk": 4,
            "entries": {"prefill": {}, "decode": {}}}
    session = DecoderSession(_NoBackend(), info)
    with pytest.raises(ArtifactError, match=r'--passes "layer-skip\(mode=draft\)"'):
        session.generate([1, 2, 3], max_new_tokens=4, speculate=True)
    with pytest.raises(DataError, match="greedy"):
        session.generate([1, 2, 3], max_new_tokens=4, temperature=0.5, speculate=True)
    with pytest.raises(DataError, match="draft length"):
        session.generate([1, 2, 3], max_new_tokens=4, speculate=0.5)


def test_controller_switches_off_when_drafting_does_not_pay_and_probes_again():
    from effc.runtime.speculate import FIRST_BACKOFF, DraftController

    control = DraftController(most=4)
    assert control.choose(4) == 0  # first: a plain step measures decoding
    control.record_plain(10.0)
    assert control.choose(4) == 1  # then a short probe
    control.record_step(1, 0, draft_ms=9.0, verify_ms=14.0)  # drafts as slow as decoding, none accepted
    for _ in range(4):
        control.record_step(1, 0, draft_ms=9.0, verify_ms=14.0)
    choices = [control.choose(4) for _ in range(FIRST_BACKOFF + 1)]
    assert choices[:FIRST_BACKOFF] == [0] * FIRST_BACKOFF and choices[FIRST_BACKOFF] == 1  # off, then one probe
    fast = DraftController(most=4, decode_ms=10.0)
    for _ in range(8):
        fast.record_step(4, 4, draft_ms=2.0, verify_ms=11.0)  # cheap drafts, all accepted
    assert fast.acceptance > 0.9 and fast.choose(4) == 4 and fast.choose(2) == 2


def test_expected_tokens_and_best_draft_length():
    from effc.decoder.speculative import best_draft_length, expected_tokens

    assert expected_tokens(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens(1.0, 3) == 4.0 and expected_tokens(0.0, 3) == 1.0
    k, rate = best_draft_length(0.9, 0.2, 1.0, 4)
    assert k == 4 and rate == pytest.approx(expected_tokens(0.9, 4) / 1.8)
    assert best_draft_length(0.1, 1.0, 1.0, 4)[0] == 1
