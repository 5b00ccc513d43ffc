"""zoo:smollm2-135m compiled once per session: greedy tokens, decode logits and perplexity vs torch fp32."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "To repair a puncture on a bicycle, first")


@pytest.fixture(scope="module")
def smollm2(compiled_zoo):
    import effc.runtime
    from effc.decoder import smollm2 as source

    result = compiled_zoo("smollm2-135m")
    return result, effc.runtime.load(result.out_dir), source.load_hf_model(), source.load_tokenizer()


def _agree(mine: list[int], logits: np.ndarray, ref: list[int]) -> bool:
    """Equal tokens, or equal up to a step where torch's top-2 logits tie within 1e-4 (either token is greedy)."""
    for i, (a, b) in enumerate(zip(mine, ref, strict=False)):
        if a != b:
            top2 = np.sort(logits[i])[-2:]
            return bool(top2[1] - top2[0] <= 1e-4)
    return len(mine) == len(ref)


def test_greedy_tokens_equal_torch_fp32(smollm2):
    import torch

    _, model, hf, tokenizer = smollm2
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        mine = model.generate(prompt, max_new_tokens=16)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=tokenizer.eos_token_id)
        ref = out.sequences[0, len(ids):].tolist()
        logits = torch.cat(out.logits).numpy()
        ref = [t for t in ref]
        stop = next((i for i, t in enumerate(ref) if t in model.manifest["decoder"]["stop_token_ids"]), len(ref))
        assert _agree(mine.tokens, logits, ref[:stop]), (mine.tokens, ref)


def test_decode_logits_within_1e3_of_torch(smollm2):
    import torch

    _, model, hf, tokenizer = smollm2
    ids = tokenizer(" ".join(PROMPTS))["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    session = model.decoder()
    session.reset()
    session.prefill(ids[:-4])
    steps = np.stack([session.decode(t) for t in ids[-4:]])
    np.testing.assert_allclose(steps, ref[-4:], atol=1e-3)


def test_perplexity_within_half_a_percent_of_torch(smollm2):
    import torch

    result, _, hf, tokenizer = smollm2
    from effc.decoder.text import eval_text

    ids = tokenizer(eval_text())["input_ids"]
    nll = []
    for start in range(0, len(ids), 512):
        window = torch.tensor([ids[start:start + 512]])
        if window.shape[1] < 2:
            continue
        with torch.no_grad():
            nll.append(torch.nn.functional.cross_entropy(hf(window).logits[0, :-1], window[0, 1:], reduction="none"))
    ref = float(torch.exp(torch.cat(nll).mean()))
    section = result.report["decoder"]
    assert section["perplexity_window"] == 512
    assert section["perplexity"]["compiled"]["perplexity"] == pytest.approx(ref, rel=5e-3)
    assert section["perplexity"]["original_onnxruntime"]["perplexity"] == pytest.approx(ref, rel=5e-3)
    assert section["kv_cache_bytes_per_token"] == 30 * 2 * 3 * 64 * 4
