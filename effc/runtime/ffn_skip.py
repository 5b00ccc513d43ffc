"""Counts of the FFN calls a decoder artifact skipped (``layer-skip(mode=adaptive)``), read from its gate output.

An adaptive decoder returns every FFN gate's decision per token as one more output, ``ffn_gates`` ``(T, G)``
float32 (1 = the FFN ran; :mod:`effc.passes.skip_token_gate`). :class:`FfnSkipCounter` sums the decisions of the
real (not padding) tokens per entry point; the skip rate of ``decode`` is the fraction of FFN calls a generation
really skipped.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class FfnSkipCounter:
    """Per entry point: tokens seen and, per gate, how many of them ran the FFN.

    Args:
        names: the gated FFNs in the output's column order (``info["ffn_gates"]["names"]``).
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self._tokens: dict[str, int] = {}
        self._ran: dict[str, np.ndarray] = {}

    def reset(self) -> None:
        """Forget every count."""
        self._tokens.clear()
        self._ran.clear()

    def add(self, entry: str, decisions: np.ndarray) -> None:
        """Count one call of ``entry``: ``decisions`` ``(tokens, G)`` of its real tokens (1 = ran)."""
        decisions = np.asarray(decisions, dtype=np.float64).reshape(-1, len(self.names))
        self._tokens[entry] = self._tokens.get(entry, 0) + decisions.shape[0]
        self._ran[entry] = self._ran.get(entry, np.zeros(len(self.names))) + decisions.sum(axis=0)

    def summary(self) -> dict[str, Any]:
        """``{entry: {"tokens", "ffn_calls", "skipped", "skip_rate", "skip_rate_per_ffn"}}`` of the counted calls.

        ``ffn_calls`` counts every gated FFN once per token (``tokens × G``); ``skip_rate`` is ``skipped /
        ffn_calls``; ``skip_rate_per_ffn`` follows :attr:`names`.
        """
        out = {}
        for entry, tokens in self._tokens.items():
            ran = self._ran[entry]
            calls = tokens * len(self.names)
            skipped = int(round(calls - ran.sum()))
            out[entry] = {"tokens": tokens, "ffn_calls": calls, "skipped": skipped,
                          "skip_rate": round(skipped / max(calls, 1), 4),
                          "skip_rate_per_ffn": [round(float(1 - r / tokens), 4) for r in ran]}
        return out
