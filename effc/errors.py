"""Typed errors: every bad input becomes one of these, with the thing named and a fix.

The CLI prints ``str(error)`` as one line and exits non-zero; ``--debug`` shows the traceback. Library code
raises these, never ``assert``s, for anything a user can cause.
"""

from __future__ import annotations


class EffcError(Exception):
    """Base class of every error effc raises on purpose.

    Args:
        message: what went wrong, naming the file, node, pass or option involved.
        hint: how to fix it (appended as ``"; fix: ..."``), or None.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}; fix: {hint}")


class LoadError(EffcError):
    """The model file is missing, not ONNX, truncated, or refers to data outside its folder."""


class ShapeError(EffcError):
    """An input dimension stays unknown, or a given ``--input-shape`` does not fit the model."""


class UnsupportedOpError(EffcError):
    """One or more operators cannot be lowered; the message lists all of them at once."""

    def __init__(self, ops: dict[str, list[str]], where: str = "TVM's ONNX frontend", hint: str | None = None):
        self.ops = dict(ops)
        listed = ", ".join(f"{op} (e.g. node {names[0]!r}, {len(names)} node(s))" for op, names in sorted(ops.items()))
        super().__init__(
            f"{len(ops)} operator type(s) not supported by {where}: {listed}",
            hint or "rewrite or remove these nodes before compiling, or open an issue with the model attached",
        )


class PipelineError(EffcError):
    """The ``--passes`` text does not parse, names an unknown pass, or gives an unknown/invalid option."""


class PassError(EffcError):
    """A pass failed on this model (the message names the pass and the passes that ran before it)."""


class CalibrationError(EffcError):
    """Calibration data is missing, or does not match the model's inputs."""


class TargetError(EffcError):
    """Unknown target, a toolchain that is missing, or a failed build for the target."""


class BudgetError(EffcError):
    """The compiled model does not fit the target's flash/RAM budget."""


class ArtifactError(EffcError):
    """An artifact folder is incomplete, tampered with (hash mismatch), or the output folder is not empty."""


class MismatchError(EffcError):
    """The compiled artifact's outputs disagree with onnxruntime on its ``model.onnx`` (the agreement gate)."""


class DataError(EffcError):
    """Evaluation or calibration data (``--data``) cannot be read or does not match the model's inputs."""


class QualityGateError(EffcError):
    """The compiled model missed a quality gate (``--min-cosine``, ``--max-top1-drop``, ``--max-ppl-increase``).

    Its own exit code (4), so scripts tell "too lossy" from a bad input (1) or an internal error (3). ``result``
    holds the :class:`effc.compiler.CompileResult` when ``--keep-failed`` wrote the artifact (marked failed), else
    None.
    """

    exit_code = 4
    result = None
