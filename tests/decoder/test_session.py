"""DecoderSession logic (cache writes, positions, masks, chunking, stops, errors) over a numpy stand-in backend."""

from __future__ import annotations

import numpy as np
import pytest

from effc.errors import DataError
from effc.runtime.decoder import DecoderSession, perplexity, sample

INFO = {"layers": 1, "kv_heads": 1, "head_dim": 1, "max_cache": 16, "chunk": 4, "masked": -1.0e9, "vocab": 8}


class EchoBackend:
    """Predicts ``(last visible token + 1) % 8``; the new keys hold each token id, so the mask decides what is seen."""

    def __init__(self):
        self.calls = []

    def bind_cache(self, cache):
        self.cache = cache

    def run(self, entry, ids, positions, mask):
        self.calls.append((entry, ids.copy(), positions.copy(), mask.copy()))
        tokens = ids.shape[1]
        s = self.cache["past_key.0"].shape[2]
        keys = np.concatenate([self.cache["past_key.0"][0, 0], ids[0].astype(np.float32)])  # (S + T,)
        logits = np.zeros((1, tokens, 8), np.float32)
        for t in range(tokens):
            visible = np.flatnonzero(mask[t] == 0)
            assert visible.max() == s + t  # a token sees itself last (causal)
            logits[0, t, (int(keys[visible[-1]]) + 1) % 8] = 1.0
        new = ids[0].astype(np.float32)
        return [logits, new.reshape(1, 1, tokens), -new.reshape(1, tokens, 1)]  # key.0 (Hkv, D, T), value.0


def test_prefill_chunks_pad_and_write_only_real_tokens():
    backend = EchoBackend()
    session = DecoderSession(backend, INFO)
    logits = session.prefill([1, 2, 3, 4, 5, 6])
    assert logits.shape == (6, 8)
    assert [c[0] for c in backend.calls] == ["prefill", "prefill"]
    second = backend.calls[1]
    assert second[1].tolist() == [[5, 6, 0, 0]] and second[2].tolist() == [[4, 5, 6, 7]]
    assert (second[3][:, :4] == 0).all() and (second[3][:, 4:16] < 0).all()  # cache slots 0-3 visible only
    assert session.length == 6
    assert list(session.cache) == ["past_key.0", "past_value.0"]
    assert session.cache["past_key.0"][0, 0, :7].tolist() == [1, 2, 3, 4, 5, 6, 0]  # padding never written
    assert session.cache["past_value.0"][0, :7, 0].tolist() == [-1, -2, -3, -4, -5, -6, 0]
    assert np.argmax(logits, axis=1).tolist() == [2, 3, 4, 5, 6, 7]


def test_generate_greedy_stops_and_counts():
    session = DecoderSession(EchoBackend(), INFO, stop_ids=[0])
    result = session.generate([5], max_new_tokens=10)
    assert result.tokens == [6, 7]  # 7 + 1 = 8 % 8 = 0 is the stop token
    assert result.stopped == "stop_token" and result.prompt_tokens == 1
    result = DecoderSession(EchoBackend(), INFO).generate([1], max_new_tokens=3)
    assert result.tokens == [2, 3, 4] and result.stopped == "max_new_tokens"


def test_prompt_longer_than_cache_is_a_clear_error():
    session = DecoderSession(EchoBackend(), INFO)
    with pytest.raises(DataError, match="do not fit the decoder's KV cache of 16"):
        session.generate(list(range(1, 8)) * 2, max_new_tokens=8)
    with pytest.raises(DataError, match="max_new_tokens"):
        session.generate([1], max_new_tokens=0)
    with pytest.raises(DataError, match="top_p"):
        session.generate([1], temperature=1.0, top_p=0)


def test_sampling_is_seeded_and_nucleus_cuts_the_tail():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    draws = [sample(logits, 1.0, 0.5, np.random.default_rng(s)) for s in range(20)]
    assert set(draws) == {0}  # top-p 0.5 keeps only the 0.6 token
    draws = [sample(logits, 1.0, 0.85, np.random.default_rng(s)) for s in range(200)]
    assert set(draws) == {0, 1}
    a = [sample(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(5)]
    assert a == [sample(logits, 1.0, 1.0, np.random.default_rng(7)) for _ in range(5)]
    assert sample(logits, 0.0, 1.0, np.random.default_rng(0)) == 0


def test_perplexity_of_a_perfectly_predicted_sequence():
    session = DecoderSession(EchoBackend(), INFO)
    result = perplexity(session, [1, 2, 3, 4, 5, 6, 7, 0, 1], window=4)
    # one-hot logits of 1.0: p(correct) = e / (e + 7) for every scored token
    assert result["perplexity"] == pytest.approx((np.e + 7) / np.e, rel=1e-4)
    assert result["windows"] == 2 and result["tokens_scored"] == 3 + 3  # the last 1-token window is dropped
    with pytest.raises(DataError, match="longer than the KV cache"):
        perplexity(session, [1, 2], window=32)
