"""English text for decoders: held-out evaluation prose and calibration token windows (disjoint sources).

Evaluation: ``effc/data/decoder_text.json``, original prose written for effc (12 paragraphs, ~1,100 words), used
only to measure perplexity. Calibration: the calibration split of ``effc/data/sentences.json`` (original English
sentences written for effc; the even-indexed half), joined into one running text and cut into token windows.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from effc.data import samples as S
from effc.errors import DataError

EVAL_DESCRIPTION = "held-out original English prose (effc/data/decoder_text.json, written for effc)"
CALIBRATION_DESCRIPTION = ("token windows of original English sentences (calibration split of "
                           "effc/data/sentences.json, written for effc; disjoint from the evaluation prose)")


@functools.cache
def eval_text() -> str:
    """The evaluation prose, paragraphs separated by blank lines."""
    data = json.loads(resources.files("effc.data").joinpath("decoder_text.json").read_text(encoding="utf-8"))
    return "\n\n".join(data["eval"])


def calibration_text() -> str:
    """The calibration split's distinct sentences joined into one running text."""
    return " ".join(S.sentences()[S.check_split("calibration")::2])


def calibration_windows(tokenizer: Any, n: int, tokens: int) -> list[list[int]]:
    """``n`` non-overlapping windows of ``tokens`` token ids from :func:`calibration_text`.

    Raises:
        DataError: the text holds fewer than ``n`` windows.
    """
    ids = list(tokenizer(calibration_text())["input_ids"])
    available = len(ids) // tokens
    if n > available:
        raise DataError(f"the decoder calibration text holds {available} windows of {tokens} tokens, {n} asked",
                        f"ask for at most {available} calibration samples")
    return [ids[i * tokens:(i + 1) * tokens] for i in range(n)]
