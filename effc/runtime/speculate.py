"""Self-speculative greedy decoding over a decoder artifact with ``draft`` and ``verify`` entry points.

One step, from a context of ``L`` tokens in the cache and the next token ``t`` (the full model's greedy choice):

1. **draft** ``k`` tokens: ``t`` at position ``L``, then each drafted token, through the ``draft`` entry point (the
   decode graph with some layers skipped, :mod:`effc.decoder.speculative`). The kept layers read the cache the full
   model wrote and write theirs at ``L …``; the skipped layers' cache is neither read nor written;
2. **verify** ``[t, d1 … dk]`` at positions ``L … L+k`` in one call of the ``verify`` entry point (a chunk of
   ``tokens + 1``, padded): it writes every layer's keys and values there (overwriting the draft's) and returns
   the full model's logits at each position;
3. **accept** the longest prefix of the drafts equal to the full model's greedy choices ``g0 … g(k-1)``, plus the
   full model's own next token ``g(n)``. The context becomes ``L + n + 1`` tokens: positions roll back over the
   rejected drafts (their cache slots are overwritten later; attention reads only the first ``length`` slots).

Every emitted token is a greedy choice of the full model given the emitted tokens before it, so the output equals
plain greedy decoding (up to float rounding between the verify and decode graphs: a near-tie of two logits may
break the other way). Method: Zhang et al. 2024, "Draft & Verify: Lossless Large Language Model Acceleration via
Self-Speculative Decoding".

Adaptivity (:class:`DraftController`, after DEL, Zarch et al. 2025): the acceptance rate ``a`` and the times of
one draft call, one verify call and one plain decode step are measured as generation goes (exponential moving
averages); each step takes the draft length ``k`` with the most expected tokens per millisecond
(:func:`effc.decoder.speculative.best_draft_length`), and a plain decode step when even the best ``k`` is slower than
plain decoding. Switched off, it probes one short speculative step after 32, 64, 128 … plain steps, so a context
where drafts start to match turns it back on and one where they do not costs little; switched on, one plain step
in 33 keeps the plain time current. The controller lives on in the session: the next generation starts from what
this one measured.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from effc.decoder.speculative import DRAFT, VERIFY, best_draft_length, draft_layers, draft_layout
from effc.errors import ArtifactError

#: Weight of the newest measurement in the moving averages of times and acceptance.
SMOOTHING = 0.3
#: Plain steps before the first probe once speculation switched itself off (doubling up to :data:`MAX_BACKOFF`).
FIRST_BACKOFF, MAX_BACKOFF = 32, 256


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


@dataclasses.dataclass
class DraftController:
    """Chooses each step's draft length from measured acceptance and call times (module docstring).

    Attributes:
        most: the most tokens a verify call takes (``tokens`` of the artifact's draft).
        accepted, examined: moving sums of drafted tokens accepted, and of tokens examined (accepted plus the first
            rejected one of each step): ``a = accepted / examined`` (the maximum-likelihood acceptance rate when each
            drafted token matches independently).
        draft_ms, verify_ms, decode_ms: moving averages of one call of each entry point (milliseconds).
    """

    most: int
    accepted: float = 1.0
    examined: float = 2.0
    draft_ms: float | None = None
    verify_ms: float | None = None
    decode_ms: float | None = None
    backoff: int = 0  # plain steps left before the next probe (0: speculating)
    next_backoff: int = FIRST_BACKOFF
    since_plain: int = 0  # speculative steps since the last plain one

    @property
    def acceptance(self) -> float:
        """The estimated probability that a drafted token is accepted."""
        return self.accepted / max(self.examined, 1e-9)

    def choose(self, room: int) -> int:
        """Tokens to draft in the next step (0: a plain decode step); ``room``: the most the step may take."""
        if room < 1 or self.decode_ms is None:
            return 0  # the first step after the prompt measures plain decoding
        if self.draft_ms is None or self.verify_ms is None:
            return 1  # a first, short probe measures the draft and verify calls
        k, rate = best_draft_length(self.acceptance, self.draft_ms, self.verify_ms, min(room, self.most))
        if rate * self.decode_ms >= 1.0:
            self.backoff, self.next_backoff = 0, FIRST_BACKOFF
            self.since_plain += 1
            if self.since_plain > FIRST_BACKOFF:  # now and then a plain step keeps its time current
                self.since_plain = 0
                return 0
            return k
        if self.backoff == 0:  # it just stopped paying: plain steps, then a probe
            self.backoff, self.next_backoff = self.next_backoff, min(self.next_backoff * 2, MAX_BACKOFF)
            return 0
        self.backoff -= 1
        return 1 if self.backoff == 0 else 0

    def record_plain(self, ms: float) -> None:
        """One plain decode step took ``ms``."""
        self.decode_ms = _ema(self.decode_ms, ms)

    def record_step(self, drafted: int, accepted: int, draft_ms: float, verify_ms: float) -> None:
        """A speculative step: ``accepted`` of ``drafted`` tokens, ``draft_ms`` per draft call, ``verify_ms``."""
        examined = accepted + (accepted < drafted)
        self.accepted = (1 - SMOOTHING) * self.accepted + SMOOTHING * accepted
        self.examined = (1 - SMOOTHING) * self.examined + SMOOTHING * examined
        self.draft_ms = _ema(self.draft_ms, draft_ms)
        self.verify_ms = _ema(self.verify_ms, verify_ms)


@dataclasses.dataclass
class SpeculationStats:
    """What speculation did during one generation (``Generation.speculation``).

    Attributes:
        skipped_layers: the layers the draft skips (original indices).
        max_draft_tokens: the most tokens one verify call takes.
        verify_calls, plain_steps: speculative steps and plain decode steps taken.
        drafted, accepted: drafted tokens, and those the full model accepted.
        acceptance_rate: ``accepted / drafted`` (None before any draft).
        mean_draft_length: drafted tokens per verify call.
        tokens_per_verify: emitted tokens per verify call (accepted drafts plus the full model's token).
        draft_ms, verify_ms, decode_ms: the controller's final moving averages of one call (milliseconds).
        speculating: whether speculation was on at the end.
    """

    skipped_layers: list[int]
    max_draft_tokens: int
    verify_calls: int = 0
    plain_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    acceptance_rate: float | None = None
    mean_draft_length: float | None = None
    tokens_per_verify: float | None = None
    draft_ms: float | None = None
    verify_ms: float | None = None
    decode_ms: float | None = None
    speculating: bool = True


def check_speculation(info: dict[str, Any]) -> None:
    """Raises ArtifactError naming the fix when the artifact has no ``draft``/``verify`` entry points."""
    entries = info.get("entries") or {}
    if draft_layers(info) is None or DRAFT not in entries or VERIFY not in entries:
        raise ArtifactError("this decoder artifact has no draft entry point, so it cannot speculate",
                            'recompile it with --passes "layer-skip(mode=draft)" (or generate without --speculate)')


class Speculator:
    """Self-speculative greedy token stream over a :class:`effc.runtime.decoder.DecoderSession` (module docstring).

    Args:
        session: the decoder session (its cache and context are used and moved on).
        fixed: draft exactly this many tokens every step (no adaptivity; tests and benchmarks), capped by the
            artifact's ``tokens``; None: :class:`DraftController` decides.
        controller: the controller of an earlier generation of the same session (its measured times and
            acceptance carry over, so a generation does not probe again what the last one learned); None: a new one.

    Raises:
        ArtifactError: the artifact has no draft entry point.
    """

    def __init__(self, session: Any, fixed: int | None = None, controller: DraftController | None = None):
        check_speculation(session.info)
        self.session = session
        self.most = int(session.info["draft"]["tokens"])
        self.fixed = None if fixed is None else min(int(fixed), self.most)
        self.layout = draft_layout(session.info)
        agreement = session.info["draft"].get("agreement")
        self.controller = controller if controller is not None else DraftController(self.most)
        if controller is None and agreement is not None:  # the compile-time measure as the prior (2 tokens' worth)
            self.controller.accepted, self.controller.examined = 2.0 * agreement, 2.0
        self.stats = SpeculationStats(draft_layers(session.info), self.most)

    def tokens(self, logits: np.ndarray, wanted: int) -> Iterator[int]:
        """Greedy tokens after ``logits`` (the prompt's last), ``wanted`` at most; stops early when the consumer does.

        The consumer must stop after ``wanted`` tokens; the cache must hold room for them (checked by ``generate``).
        """
        session, control = self.session, self.controller
        token, given = int(np.argmax(logits)), 0
        while True:
            yield token
            given += 1
            fits = session.length + self.most + 1 <= session.max_cache  # the verify chunk, padding included
            room = min(self.most, wanted - given) if fits else 0
            k = control.choose(room) if self.fixed is None else min(self.fixed, room)
            if k == 0:
                start = time.perf_counter()
                token = int(np.argmax(session.decode(token)))
                control.record_plain((time.perf_counter() - start) * 1e3)
                self.stats.plain_steps += 1
                continue
            accepted, token = self._step(token, k)
            yield from accepted
            given += len(accepted)

    def _step(self, token: int, k: int) -> tuple[list[int], int]:
        """Draft ``k`` tokens after ``token``, verify them; the accepted drafts and the full model's next token."""
        session = self.session
        start, length = time.perf_counter(), session.length
        drafts, current = [], token
        for _ in range(k):
            current = int(np.argmax(session.call_entry(DRAFT, [current], 1, self.layout)[0]))
            drafts.append(current)
        middle = time.perf_counter()
        session.length = length
        greedy = np.argmax(session.call_entry(VERIFY, [token, *drafts], self.most + 1), axis=-1)
        n = 0
        while n < k and drafts[n] == int(greedy[n]):
            n += 1
        session.length = length + n + 1  # roll back over the rejected drafts
        end = time.perf_counter()
        self.controller.record_step(k, n, (middle - start) * 1e3 / k, (end - middle) * 1e3)
        self.stats.verify_calls += 1
        self.stats.drafted += k
        self.stats.accepted += n
        return drafts[:n], int(greedy[n])

    def summary(self) -> dict[str, Any]:
        """The stats of this generation (:class:`SpeculationStats` as a dict)."""
        s, c = self.stats, self.controller
        calls = max(s.verify_calls, 1)
        s.acceptance_rate = round(s.accepted / s.drafted, 4) if s.drafted else None
        s.mean_draft_length = round(s.drafted / calls, 3) if s.verify_calls else None
        s.tokens_per_verify = round((s.accepted + s.verify_calls) / calls, 3) if s.verify_calls else None
        s.draft_ms, s.verify_ms, s.decode_ms = (None if v is None else round(v, 3)
                                                for v in (c.draft_ms, c.verify_ms, c.decode_ms))
        s.speculating = c.backoff == 0
        return dataclasses.asdict(s)
