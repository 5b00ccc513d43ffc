"""Calibration data for data-driven passes: input feeds plus taps on intermediate values via onnxruntime.

Passes such as Wanda pruning (|W| * ||X||), MoEfication (co-activation statistics) or block quantization with
activation statistics receive a :class:`Calibration`; they never read files or global state themselves.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from effc.errors import CalibrationError
from effc.ir.reference import Reference, with_taps

logger = logging.getLogger(__name__)


class Calibration:
    """A fixed list of input feeds with a label saying where they come from.

    Args:
        feeds: one ``{input name: array}`` dict per sample (shapes as the model's inputs).
        source: human-readable origin, e.g. ``"zoo:minilm-l6 real samples (calibration split)"``; reports show it.

    Raises:
        CalibrationError: ``feeds`` is empty or an item is not a mapping of arrays.
    """

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], source: str) -> None:
        feeds = list(feeds)
        if not feeds:
            raise CalibrationError(f"calibration data {source!r} holds no samples",
                                   "pass at least one feed (e.g. --data file.npz or a zoo model's samples)")
        for k, feed in enumerate(feeds):
            if not isinstance(feed, Mapping):  # {} is the one sample of a model without inputs
                raise CalibrationError(f"calibration sample {k} of {source!r} is not a dict of arrays",
                                       "give each sample as {input name: numpy array}")
        self._feeds = [{name: np.asarray(a) for name, a in feed.items()} for feed in feeds]
        self.source = source

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self._feeds)

    def __len__(self) -> int:
        return len(self._feeds)

    def __repr__(self) -> str:
        return f"Calibration({len(self)} samples, source={self.source!r})"

    def tap(self, model: ir.Model, value_names: Sequence[str], progress: bool = True,
            threads: int = 1) -> dict[str, list[np.ndarray]]:
        """Run ``model`` on every feed and collect the named intermediate values.

        Args:
            model: the model to observe (unchanged); values must be in its main graph.
            value_names: node outputs (or inputs) to collect.
            progress: show a rich progress bar on stderr when stderr is a terminal.
            threads: onnxruntime intra-op threads.

        Returns:
            ``{name: [array per feed]}``, feeds in order.

        Raises:
            EffcError: an unknown value name (close candidates listed).
            CalibrationError: a feed lacks one of the model's inputs.
        """
        names = list(dict.fromkeys(value_names))
        ref = Reference(with_taps(model, names), threads=threads)
        missing = sorted({n for feed in self._feeds for n in ref.input_names if n not in feed})
        if missing:
            raise CalibrationError(f"calibration data {self.source!r} lacks model input(s) {missing}",
                                   f"provide every input: {ref.input_names}")
        out: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for feed in _progress(self._feeds, f"calibrating ({len(names)} taps)", progress):
            results = dict(zip(ref.output_names, ref.run(feed), strict=True))
            for name in names:
                out[name].append(results[name] if name in results else feed[name])
        logger.debug("tapped %d values on %d samples from %s", len(names), len(self), self.source)
        return out


def _progress(items: list, description: str, enabled: bool):
    """Iterate ``items`` with a transient rich progress bar when enabled and stderr is a TTY."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True, console=None)
