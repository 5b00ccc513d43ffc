"""Token-by-token generation over a decoder artifact: KV cache, positions, masks, sampling, tokenizer.

A decoder artifact (``manifest["decoder"]``) has entry points over the same weights, ``prefill`` (a chunk of
``P`` tokens) and ``decode`` (one token), with the signature of :mod:`effc.decoder.llama`: ``(input_ids,
positions, attn_mask, past_key.0, past_value.0, ...) -> (logits, key.0, value.0, ...)``, and ``prefill_last``
(:mod:`effc.decoder.last_token`: the chunk with one more input, ``last_index``, and the logits of that row only,
``(1, 1, V)``). Generation prefills through ``prefill_last`` (:meth:`DecoderSession.prefill_last`); scoring
(:func:`token_nll`, perplexity) through ``prefill``, which returns every token's logits. The session owns one
preallocated array per cache input (:func:`effc.ir.decoder.kv_layout`: float32 keys ``(Hkv, D, S)`` and values
``(Hkv, S, D)``, or uint8 MX rows ``(Hkv, S, W)`` for both when ``block-quant(mode=kv)`` stored the cache),
shared with the compiled code without copies, and writes each call's new keys and values into them in place at
the chunk's positions (a few KB per layer and token; the cache itself is never copied). A prompt
is prefilled in chunks of ``P`` (the last one padded; padding sits after the real tokens, so the causal mask hides
it, and its keys are never written into the cache).

Backends run the entry points: :class:`CompiledBackend` (the artifact's ``model.so``), :class:`DeviceCacheBackend`
(a cuda ``model.so``: the cache stays in GPU memory and is written there; padding keys land past the context, where
the mask hides them until real tokens overwrite them) and :class:`OrtBackend` (onnxruntime on the same graphs; the
baseline of reports and benchmarks).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from effc.errors import DataError
from effc.ir.decoder import LAST_INDEX, PREFILL_LAST, kv_layout
from effc.runtime.ffn_skip import FfnSkipCounter

logger = logging.getLogger(__name__)


class CompiledBackend:
    """The artifact's ``prefill``/``decode`` functions (a loaded CPU runner with ``call`` and ``shared_tensor``)."""

    name = "effc"

    def __init__(self, runner: Any):
        self._runner = runner
        self._cache: list[Any] = []

    def bind_cache(self, cache: dict[str, np.ndarray]) -> None:
        """Share the cache arrays (graph input name → array, in graph order) with the compiled code (no copies)."""
        self._cache = [self._runner.shared_tensor(array) for array in cache.values()]

    def run(self, entry: str, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
            last: np.ndarray | None = None) -> list[np.ndarray]:
        """``[logits, key.0, value.0, ...]`` of one call of ``entry`` over the bound cache.

        ``last``: the ``last_index`` input of ``prefill_last`` (after the cache), else None.
        """
        return self._runner.call(entry, [ids, positions, mask, *self._cache, *_extra(last)])


class DeviceCacheBackend:
    """The artifact's entry points with the KV cache in device memory (the cuda target; any :class:`VmRunner`).

    The cache tensors are allocated on the runner's device once (:meth:`bind_cache` copies the session's zero arrays
    there); each call copies ``input_ids``, ``positions`` and ``attn_mask`` in, runs ``entry``, then
    ``<entry>_kv_write`` (:mod:`effc.codegen.kv_write`) writes the chunk's new keys and values into the device cache
    in place at slots ``positions[0, 0] + t``, and copies only the logits back. The session's host arrays are not
    updated (:attr:`owns_cache`).
    """

    name = "effc"
    owns_cache = True

    def __init__(self, runner: Any):
        self._runner = runner
        self._cache: list[Any] = []

    def bind_cache(self, cache: dict[str, np.ndarray]) -> None:
        """Allocate the cache on the device (graph input name → initial array, in graph order)."""
        self._cache = self._runner.to_device_arrays(list(cache.values()))

    def run(self, entry: str, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
            last: np.ndarray | None = None) -> list[np.ndarray]:
        """``[logits]`` of one call of ``entry``; the new keys and values go into the device cache."""
        ids_d, positions_d, mask_d, *last_d = self._runner.to_device_arrays([ids, positions, mask, *_extra(last)])
        logits, *new = self._runner.function(entry)(ids_d, positions_d, mask_d, *self._cache, *last_d)
        self._runner.function(f"{entry}_kv_write")(*self._cache, *new, positions_d)
        return self._runner.to_numpy(logits)


def _extra(last: np.ndarray | None) -> list[np.ndarray]:
    """The inputs after the cache: ``[last_index]`` for ``prefill_last``, else none."""
    return [] if last is None else [last]


def compiled_backend(runner: Any) -> Any:
    """The backend of a loaded decoder artifact's runner.

    The runner's own if it has one (:class:`DeviceCacheBackend` for a GPU), else :class:`CompiledBackend` (the
    cache shared with the CPU code).
    """
    make = getattr(runner, "decoder_backend", None)
    return make() if make is not None else CompiledBackend(runner)


class OrtBackend:
    """onnxruntime sessions over the same graphs (``{"prefill": model, "decode": model}`` of ``ir.Model``).

    Attributes:
        entries: the entry points it runs (the keys of ``graphs``).
    """

    name = "onnxruntime"

    def __init__(self, graphs: dict[str, Any], threads: int = 1):
        from effc.ir.reference import Reference

        self._sessions = {entry: Reference(model, threads=threads) for entry, model in graphs.items()}
        self.entries = tuple(graphs)
        self._cache: dict[str, np.ndarray] = {}

    def bind_cache(self, cache: dict[str, np.ndarray]) -> None:
        self._cache = cache

    def run(self, entry: str, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray,
            last: np.ndarray | None = None) -> list[np.ndarray]:
        feeds = {"input_ids": ids, "positions": positions, "attn_mask": mask, **self._cache}
        return self._sessions[entry].run(feeds if last is None else {**feeds, LAST_INDEX: last})


@dataclasses.dataclass
class Generation:
    """What :meth:`DecoderSession.generate` produced.

    Attributes:
        text: the generated text (prompt excluded, stop token excluded).
        tokens: generated token ids.
        prompt_tokens: prompt length in tokens.
        prefill_ms: wall time of the prompt's prefill (all chunks).
        decode_ms_per_token: median wall time of one decode step (model call plus sampling).
        tokens_per_s: generated tokens per second of decoding.
        stopped: ``"stop_token"`` or ``"max_new_tokens"``.
        speculation: with ``speculate``, what it did (:class:`effc.runtime.speculate.SpeculationStats`: acceptance
            rate, draft lengths, skipped layers, call times), else None.
        ffn_skip: for an adaptive artifact (``layer-skip(mode=adaptive)``), the FFN calls skipped per entry point
            (:meth:`effc.runtime.ffn_skip.FfnSkipCounter.summary`: ``decode`` = the generated tokens), else None.
    """

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_ms: float
    decode_ms_per_token: float | None
    tokens_per_s: float | None
    stopped: str
    speculation: dict[str, Any] | None = None
    ffn_skip: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DecoderSession:
    """Cache, positions and masks around a backend; generation and scoring of token sequences.

    Args:
        backend: :class:`CompiledBackend` or :class:`OrtBackend`.
        info: the decoder facts (``manifest["decoder"]``): ``layers, kv_heads, head_dim, max_cache, chunk,
            masked`` at least; ``entries`` (the artifact's entry points) unless the backend lists its own.

    Attributes:
        cache: graph input name → the preallocated cache array of :func:`effc.ir.decoder.kv_layout` (in its order).
        tokenizer: a ``transformers`` tokenizer (needed for text in/out only).
        stop_ids: token ids that end a generation.
    """

    def __init__(self, backend: Any, info: dict[str, Any], tokenizer: Any = None, stop_ids: Sequence[int] = ()):
        self.backend = backend
        self.info = info
        self.tokenizer = tokenizer
        self.stop_ids = {int(t) for t in stop_ids}
        self.max_cache = int(info["max_cache"])
        self.chunk = int(info["chunk"])
        self._masked = np.float32(info.get("masked", -1.0e9))
        self._layout = kv_layout(info)
        self.cache = {slot.input: aligned_zeros(slot.shape(info, self.max_cache), slot.dtype) for slot in self._layout}
        backend.bind_cache(self.cache)
        self.length = 0  # tokens held in the cache
        self.draft_controller: Any = None  # speculation's measurements, kept across generations
        entries = getattr(backend, "entries", None) or info.get("entries") or ()
        self.has_prefill_last = PREFILL_LAST in entries  # artifacts built before it have prefill only
        gates = info.get("ffn_gates")  # layer-skip(mode=adaptive): the FFN calls skipped, counted per entry point
        self.ffn_skip = FfnSkipCounter(gates["names"]) if gates else None

    def reset(self) -> None:
        """Forget the context (the cache contents are masked, not cleared)."""
        self.length = 0

    def _mask(self, tokens: int) -> np.ndarray:
        mask = np.full((tokens, self.max_cache + tokens), self._masked, dtype=np.float32)
        mask[:, :self.length] = 0.0
        mask[:, self.max_cache:] = np.triu(np.full((tokens, tokens), self._masked, dtype=np.float32), 1)
        return mask

    def call_entry(self, entry: str, ids: Sequence[int], tokens: int, layout: list[Any] | None = None) -> np.ndarray:
        """Logits ``(len(ids), V)`` of one call of ``entry`` on ``ids`` (padded to ``tokens``) at the next positions.

        The call's new keys and values go into the cache at those positions (``layout``: the slots the entry point
        returns, default all) and the context grows by ``len(ids)``; :mod:`effc.runtime.speculate` rolls it back.
        """
        return self._call(entry, ids, tokens, layout)

    def _call(self, entry: str, ids: Sequence[int], tokens: int, layout: list[Any] | None = None,
              last: bool = False) -> np.ndarray:
        """As :meth:`call_entry`; ``last``: ``entry`` is ``prefill_last``, the logits ``(1, V)`` of ``ids[-1]``."""
        real = len(ids)
        padded = np.zeros((1, tokens), dtype=np.int64)
        padded[0, :real] = ids
        positions = (self.length + np.arange(tokens, dtype=np.int64))[None]
        index = np.array([real - 1], dtype=np.int64) if last else None
        logits, *new = self.backend.run(entry, padded, positions, self._mask(tokens),
                                        *([] if index is None else [index]))
        if getattr(self.backend, "owns_cache", False):  # it wrote the new keys/values into its own (device) cache
            new, layout = [], []
        else:
            layout = layout or self._layout
            if self.ffn_skip is not None and len(new) > len(layout):  # the gate decisions follow the cache outputs
                self.ffn_skip.add("prefill" if entry == PREFILL_LAST else entry, new.pop()[:real])
        for slot, values in zip(layout, new, strict=True):
            into, take = [slice(None)] * 3, [slice(None)] * 3
            into[slot.seq_axis], take[slot.seq_axis] = slice(self.length, self.length + real), slice(0, real)
            self.cache[slot.input][tuple(into)] = values[tuple(take)]
        self.length += real
        return logits[0] if last else logits[0, :real]

    def _check_room(self, tokens: int) -> None:
        if self.length + tokens > self.max_cache:
            raise DataError(
                f"{self.length + tokens} tokens do not fit the decoder's KV cache of {self.max_cache} tokens "
                f"({self.length} already held, {tokens} more asked)",
                "shorten the prompt or --max-new-tokens, or recompile with a larger cache (--max-cache)")

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to the context in chunks of ``P``; returns their logits ``(len(ids), V)``.

        Raises:
            DataError: the tokens do not fit the cache.
        """
        ids = [int(t) for t in ids]
        self._check_room(len(ids))
        out = [self._call("prefill", ids[start:start + self.chunk], self.chunk)
               for start in range(0, len(ids), self.chunk)]
        return np.concatenate(out, axis=0)

    def prefill_last(self, ids: Sequence[int]) -> np.ndarray:
        """Append ``ids`` to the context in chunks of ``P``; returns the logits ``(V,)`` of the last one only.

        Runs ``prefill_last`` (:mod:`effc.decoder.last_token`: the LM head of one row per chunk; the logits of the
        earlier chunks are not needed), or ``prefill`` where the backend has no such entry point; the cache ends
        the same either way.

        Raises:
            DataError: the tokens do not fit the cache, or ``ids`` is empty.
        """
        ids = [int(t) for t in ids]
        if not ids:
            raise DataError("nothing to prefill (no tokens)", "give at least one token")
        if not self.has_prefill_last:
            return self.prefill(ids)[-1]
        self._check_room(len(ids))
        for start in range(0, len(ids), self.chunk):
            logits = self._call(PREFILL_LAST, ids[start:start + self.chunk], self.chunk, last=True)
        return logits[0]

    def decode(self, token: int) -> np.ndarray:
        """Append one token; returns its logits ``(V,)``.

        Raises:
            DataError: the cache is full.
        """
        self._check_room(1)
        return self._call("decode", [int(token)], 1)[0]

    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """Token ids of ``prompt`` (``chat``: wrapped in the tokenizer's chat template as one user turn).

        Raises:
            DataError: the artifact has no tokenizer, or ``chat`` and the tokenizer has no chat template.
        """
        if self.tokenizer is None:
            raise DataError("this decoder artifact has no tokenizer", "recompile it from zoo:smollm2-135m")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError("the tokenizer has no chat template", "generate without --chat")
            return list(self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                                           add_generation_prompt=True, return_dict=False))
        return list(self.tokenizer(prompt)["input_ids"])

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, chat: bool = False,
                 on_text: Callable[[str], None] | None = None, speculate: bool | int = False) -> Generation:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` (text, or token ids) from an empty context.

        Args:
            prompt: the prompt text (tokenized here) or its token ids.
            max_new_tokens: tokens to generate at most (a stop token ends earlier).
            temperature: 0 = greedy (argmax); > 0 samples from ``softmax(logits / temperature)``.
            top_p: nucleus sampling: sample among the most likely tokens whose probabilities sum to ``top_p``.
            seed: seed of the sampler (numpy ``default_rng``).
            chat: apply the tokenizer's chat template to a text prompt.
            on_text: called with each new piece of text as it is generated (streaming).
            speculate: greedy self-speculative decoding (:mod:`effc.runtime.speculate`): the same tokens, drafted
                by the artifact's ``draft`` entry point and verified several at a time; True adapts the draft length
                (and switches speculation off where it does not pay), an integer ``k`` drafts ``k`` tokens always.

        Raises:
            DataError: bad arguments, an empty prompt, prompt plus ``max_new_tokens`` longer than the cache, or
                ``speculate`` with a temperature above 0.
            ArtifactError: ``speculate`` and the artifact has no draft entry point.
        """
        _check_sampling(max_new_tokens, temperature, top_p)
        speculator = _speculator(self, temperature, speculate) if speculate else None
        ids = self.encode(prompt, chat) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise DataError("the prompt is empty (no tokens)", "give a prompt with some text")
        self.reset()
        self._check_room(len(ids) + max_new_tokens)
        if self.ffn_skip is not None:
            self.ffn_skip.reset()
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        logits = self.prefill_last(ids)
        prefill_ms = (time.perf_counter() - start) * 1e3
        tokens: list[int] = []
        steps: list[float] = []
        shown = ""
        stopped = "max_new_tokens"
        stream = (speculator.tokens(logits, max_new_tokens) if speculator is not None
                  else self._sampled(logits, temperature, top_p, rng, steps))
        started = time.perf_counter()
        for token in stream:
            if token in self.stop_ids:
                stopped = "stop_token"
                break
            tokens.append(token)
            if on_text is not None and self.tokenizer is not None:
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    on_text(text[len(shown):])
                    shown = text
            if len(tokens) == max_new_tokens:
                break
        if speculator is not None and len(tokens) > 1:  # speculative steps emit several tokens: the mean step
            steps = [(time.perf_counter() - started) * 1e3 / (len(tokens) - 1)]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown):])
        decode_ms = float(np.median(steps)) if steps else None
        return Generation(text, tokens, len(ids), round(prefill_ms, 3), _round(decode_ms),
                          _round(1e3 / decode_ms if decode_ms else None), stopped,
                          speculator.summary() if speculator is not None else None,
                          self.ffn_skip.summary() if self.ffn_skip is not None else None)

    def _sampled(self, logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator,
                 steps: list[float]) -> Iterator[int]:
        """Tokens sampled one decode step at a time after ``logits``; each step's milliseconds go to ``steps``."""
        while True:
            token = sample(logits, temperature, top_p, rng)
            yield token
            step = time.perf_counter()
            logits = self.decode(token)
            steps.append((time.perf_counter() - step) * 1e3)


def _speculator(session: DecoderSession, temperature: float, speculate: bool | int) -> Any:
    from effc.runtime.speculate import Speculator

    if temperature != 0:
        raise DataError(f"speculative decoding is greedy, and temperature={temperature} samples",
                        "drop --temperature (or generate without --speculate)")
    if speculate is not True and (isinstance(speculate, bool) or not isinstance(speculate, (int, np.integer))
                                  or speculate < 1):
        raise DataError(f"speculate={speculate!r} is neither True nor a draft length >= 1",
                        "give speculate=True (adaptive) or a number of tokens to draft")
    if speculate is not True:
        return Speculator(session, int(speculate))
    speculator = Speculator(session, controller=session.draft_controller)
    session.draft_controller = speculator.controller
    return speculator


def aligned_zeros(shape: tuple[int, ...], dtype: str = "float32", align: int = 64) -> np.ndarray:
    """A zero array whose data starts on an ``align``-byte boundary (TVM shares only such buffers)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(size + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + size].view(dtype).reshape(shape)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _check_sampling(max_new_tokens: Any, temperature: Any, top_p: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise DataError(f"max_new_tokens={max_new_tokens!r} is not a positive integer", "give 1 or more")
    if not np.isfinite(temperature) or temperature < 0:
        raise DataError(f"temperature={temperature!r} is not >= 0", "give 0 (greedy) or a positive temperature")
    if not (0 < top_p <= 1):
        raise DataError(f"top_p={top_p!r} is not in (0, 1]", "give e.g. --top-p 0.9 (1 = no nucleus cut)")


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Next token from ``logits (V,)``: argmax at temperature 0, else nucleus sampling (Holtzman et al. 2020).

    Ties at temperature 0 go to the lowest token id (``np.argmax``).
    """
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)
    chosen = order[:keep]
    return int(rng.choice(chosen, p=probs[chosen] / probs[chosen].sum()))


def token_nll(session: DecoderSession, ids: Sequence[int]) -> np.ndarray:
    """Negative log-likelihood (nats) of ``ids[1:]`` given the tokens before each, from an empty context."""
    session.reset()
    logits = session.prefill(ids)[:-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(logits).sum(axis=-1))
    return logz - logits[np.arange(len(ids) - 1), np.asarray(ids[1:])]


def perplexity(session: DecoderSession, ids: Sequence[int], window: int = 512) -> dict[str, Any]:
    """Perplexity of ``ids`` in non-overlapping windows of ``window`` tokens (each window from an empty context).

    Returns:
        ``{"perplexity", "tokens_scored", "windows", "window"}``; a last window shorter than 2 tokens is dropped.

    Raises:
        DataError: fewer than 2 tokens, or a window longer than the cache.
    """
    if window > session.max_cache:
        raise DataError(f"perplexity window {window} is longer than the KV cache ({session.max_cache})",
                        "use a smaller window, or recompile with a larger --max-cache")
    pieces = [ids[s:s + window] for s in range(0, len(ids), window)]
    pieces = [p for p in pieces if len(p) >= 2]
    if not pieces:
        raise DataError("the text has fewer than 2 tokens, so it has no perplexity", "give a longer text")
    nll = np.concatenate([token_nll(session, p) for p in pieces])
    return {"perplexity": round(float(np.exp(nll.mean())), 4), "tokens_scored": int(nll.size),
            "windows": len(pieces), "window": int(window)}
