"""The pass contract: every effc pass is an ``onnx_ir`` pass with a name, a summary and typed options.

A pass subclasses :class:`EffcPass` (an ``onnx_ir.passes.InPlacePass``), declares ``name``/``summary`` and an
options dataclass derived from :class:`PassOptions`, and implements ``call(model) -> PassResult``. Options are
validated when the pass is constructed (``PassOptions.__post_init__`` calls ``validate``), never at first use.
What a pass changed (counts, sparsity reached, measured error) goes into ``self.stats``, a JSON-serializable
dict that the pass manager copies into the manifest and the report.

Passes are registered by name with :func:`register_pass`; ``effc.passes.registry`` looks them up.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import onnx_ir as ir

from effc.errors import PipelineError

if TYPE_CHECKING:
    from effc.ir.calibration import Calibration


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Base class of pass options. Subclasses are frozen dataclasses with a default for every field.

    Field types must be one of ``bool``, ``int``, ``float``, ``str``, ``str | None``, ``float | None``,
    ``int | None`` or ``tuple[str, ...]`` so that the pipeline text can be parsed into them and printed back.
    Field metadata ``{"help": "..."}`` is shown by ``effc passes``.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values; raise :class:`effc.errors.PipelineError` naming the option and its valid range."""

    @staticmethod
    def fail(option: str, value: Any, expected: str) -> None:
        """Raise the standard invalid-option error.

        Raises:
            PipelineError: always.
        """
        raise PipelineError(f"invalid value {option}={value!r}", f"{option} must be {expected}")


class EffcPass(ir.passes.InPlacePass):
    """Base class of all effc passes (in place on an ``onnx_ir.Model``).

    Class attributes:
        name: CLI name, e.g. ``"prune"``.
        summary: one line shown by ``effc passes``.
        Options: the options dataclass (a :class:`PassOptions` subclass).
        exact: True when outputs stay equal within 1e-5 (a test shows it); False for lossy passes.
        uses_calibration: True when the pass can use a :class:`~effc.ir.calibration.Calibration`.
        unchanged_hint: the fix named when a lossy pass changed nothing (:meth:`unchanged_reason`).

    Args:
        options: an ``Options`` instance; when None, it is built from ``**kwargs``.
        calibration: input feeds plus taps on intermediate values, for data-driven passes.
        **kwargs: option values, e.g. ``PrunePass(sparsity=0.5)``.

    Raises:
        PipelineError: an unknown option name or an invalid value.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    Options: ClassVar[type[PassOptions]] = PassOptions
    exact: ClassVar[bool] = True
    uses_calibration: ClassVar[bool] = False
    unchanged_hint: ClassVar[str] = (
        "check the pass's options (`effc passes NAME`; include/exclude patterns match node and weight names) "
        "against the model")

    def __init__(
        self, options: PassOptions | None = None, *, calibration: Calibration | None = None, **kwargs: Any
    ) -> None:
        if options is not None and kwargs:
            raise TypeError("give either an options object or keyword options, not both")
        if options is None:
            known = [f.name for f in dataclasses.fields(self.Options)]
            unknown = [k for k in kwargs if k not in known]
            if unknown:
                raise PipelineError(
                    f"pass '{self.name}' has no option {unknown[0]!r}",
                    f"options of '{self.name}' are: {', '.join(known) or '(none)'}",
                )
            options = self.Options(**kwargs)
        self.options = options
        self.calibration = calibration
        self.stats: dict[str, Any] = {}

    def __str__(self) -> str:
        """Canonical pipeline text of this pass: ``name`` or ``name(key=value,...)`` (non-default options only)."""
        from effc.passes.pipeline import format_pass

        return format_pass(self.name, self.options)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self}>"

    def unchanged_reason(self) -> str | None:
        """Why this pass, run and reporting ``modified=False``, changed nothing it was asked to change.

        Exact passes (cleanup, reordering) may legitimately find nothing to do: None. A lossy pass was asked to
        prune or quantize something, so changing nothing is worth a warning (an error under ``--strict``): the
        text counts the layers it skipped by reason (``stats["skipped"]`` records with a ``"reason"``; numbers
        in reasons are folded, so "138 elements < min_params" and "12 elements < min_params" count together).
        """
        if self.exact:
            return None
        skipped = [s for s in self.stats.get("skipped") or [] if isinstance(s, Mapping) and s.get("reason")]
        if not skipped:
            return "no weight changed (no layer was skipped either: check the options that set how much changes)"
        counts = collections.Counter(re.sub(r"\d+", "N", str(s["reason"])) for s in skipped)
        shown = "; ".join(f"{n}x {reason}" for reason, n in counts.most_common(3))
        more = f"; {len(counts) - 3} other reason(s)" if len(counts) > 3 else ""
        return f"no weight changed ({len(skipped)} layer(s) skipped: {shown}{more})"


_REGISTRY: dict[str, type[EffcPass]] = {}


def register_pass(cls: type[EffcPass]) -> type[EffcPass]:
    """Class decorator: make ``cls`` available under ``cls.name`` in pipelines and ``effc passes``.

    Raises:
        ValueError: the name is empty or already taken by another class.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name {cls.name!r} registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[EffcPass]]:
    """All registered passes by name (imports ``effc.passes`` so that every built-in pass is registered)."""
    import effc.passes  # noqa: F401  (registration side effect)

    return dict(sorted(_REGISTRY.items()))
