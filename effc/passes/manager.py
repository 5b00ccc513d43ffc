"""The pass manager: runs a pipeline with timing, optional verification, IR dumps and crash replay files.

Instruments follow TVM's pass instrument idea (``apache/tvm python/tvm/ir/instrument.py``): per-pass timing is
logged through ``logging``; ``verify_each`` runs the ONNX checker (``full_check``) and strict shape inference
after every pass; ``dump_ir`` writes ``00_input.onnx``, ``01_<name>.onnx``, ... On a crash the pipeline's input
model and canonical pipeline text are saved so the failure can be replayed with
``effc compile replay_input.onnx --passes "$(cat replay_pipeline.txt)"``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from effc.errors import ArtifactError, EffcError, PassError
from effc.passes.base import EffcPass
from effc.passes.pipeline import Pipeline, parse_pipeline

__all__ = ["PassManager", "PassRecord", "PipelineResult"]

logger = logging.getLogger(__name__)

_PROTO_LIMIT = 2**31 - 1  # bytes; larger models are checked/saved with external data


@dataclasses.dataclass
class PassRecord:
    """What one pass did.

    Attributes:
        name: the pass name, e.g. ``"prune"``.
        text: the pass's canonical pipeline text, e.g. ``"prune(sparsity=0.5)"``.
        seconds: wall time of the pass (verification and dumps excluded), in seconds.
        modified: what the pass reported.
        stats: a copy of ``pass.stats`` after the run (JSON-serializable).
        warnings: what the pass manager noticed, e.g. a lossy pass that changed nothing.
    """

    name: str
    text: str
    seconds: float
    modified: bool
    stats: dict[str, Any]
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (for manifests and reports)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PipelineResult:
    """The rewritten model and one :class:`PassRecord` per pass, in run order."""

    model: ir.Model
    records: list[PassRecord]

    @property
    def modified(self) -> bool:
        """True when any pass modified the model."""
        return any(r.modified for r in self.records)


def _save_proto(proto: onnx.ModelProto, path: Path) -> None:
    """Save a ModelProto; weights go to ``<name>.data`` beside it when the file would pass 2 GB."""
    if proto.ByteSize() > _PROTO_LIMIT:
        onnx.save_model(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(proto, str(path))


def _dump(model: ir.Model, path: Path) -> None:
    """Save ``model`` to ``path`` (its folder created); weights go to ``<name>.data`` beside it past 2 GB.

    Raises:
        ArtifactError: the folder or file cannot be written (read-only location, a file in the path, disk full).
    """
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ir.save(model, path, external_data=path.name + ".data" if weight_bytes > _PROTO_LIMIT else None)
    except OSError as e:
        raise ArtifactError(f"cannot write the --dump-ir model {path}: {e.strerror or e}",
                            "give --dump-ir a folder you can write to") from e


def verify_model(model: ir.Model) -> None:
    """Run the ONNX checker with ``full_check`` (strict shape inference included) on ``model``.

    Raises:
        onnx.checker.ValidationError | onnx.shape_inference.InferenceError: the model is not valid ONNX.
    """
    proto = ir.to_proto(model)
    if proto.ByteSize() > _PROTO_LIMIT:
        with tempfile.TemporaryDirectory(prefix="effc-verify-") as tmp:
            path = Path(tmp) / "model.onnx"
            _save_proto(proto, path)
            onnx.checker.check_model(str(path), full_check=True)
        return
    onnx.checker.check_model(proto, full_check=True)


class PassManager:
    """Runs the passes of a pipeline in order on an ``onnx_ir.Model``.

    Args:
        pipeline: a :class:`Pipeline`, pipeline text, or a sequence of :class:`EffcPass`.
        verify_each: run the ONNX checker (full check, strict shape inference) on the input and after each pass.
        dump_ir: a folder for ``00_input.onnx``, ``01_<name>.onnx``, ... (created if missing), or None.
        save_replay: on a crash (an unexpected exception inside a pass, a broken invariant, an invalid model
            after a pass), save the input model and pipeline text for replay (in ``dump_ir`` when given, else in a
            new temporary folder ``effc-replay-*`` named in the error). An :class:`EffcError` raised by a pass is
            a user error with its own fix: no files.
        strict: a lossy pass that changes nothing (:meth:`EffcPass.unchanged_reason`) is an error, not a warning.

    Raises:
        PipelineError: pipeline text that does not parse.
    """

    def __init__(
        self,
        pipeline: Pipeline | str | Sequence[EffcPass],
        verify_each: bool = False,
        dump_ir: str | os.PathLike | None = None,
        *,
        save_replay: bool = True,
        strict: bool = False,
    ) -> None:
        if isinstance(pipeline, str):
            pipeline = parse_pipeline(pipeline)
        elif not isinstance(pipeline, Pipeline):
            pipeline = Pipeline(pipeline)
        self.pipeline = pipeline
        self.verify_each = verify_each
        self.dump_ir = Path(dump_ir) if dump_ir is not None else None
        self.save_replay = save_replay
        self.strict = strict

    def run(self, model: ir.Model) -> PipelineResult:
        """Run every pass in order (in place: ``model`` itself is rewritten and returned).

        Args:
            model: the model to rewrite.

        Returns:
            The rewritten model and one record per pass.

        Raises:
            PassError: a pass raised an unexpected exception, broke its pre/postconditions, or (with
                ``verify_each``) produced an invalid model; the message names the pass and the passes before it.
            EffcError: an effc error raised inside a pass, re-raised with the same context prefix.
            ArtifactError: ``dump_ir`` cannot be written.
            PassError: with ``strict``, a lossy pass that changed nothing.
        """
        snapshot = ir.to_proto(model) if self.save_replay and len(self.pipeline) else None
        if self.dump_ir is not None:
            _dump(model, self.dump_ir / "00_input.onnx")
        if self.verify_each:
            self._verify(model, None, [], snapshot)
        records: list[PassRecord] = []
        done: list[str] = []
        for index, p in enumerate(self.pipeline, start=1):
            prefix = (f"pass '{p.name}' failed after [{', '.join(done)}]" if done
                      else f"pass '{p.name}' failed (the first pass)")
            p.stats = {}
            start = time.perf_counter()
            try:
                result = p(model)
            except EffcError as e:  # anticipated (a user error with its fix): no replay files
                raise _with_prefix(e, prefix) from e
            except ir.passes.InvariantError as e:
                if isinstance(e.__cause__, EffcError):  # an effc error raised in requires/ensures
                    raise _with_prefix(e.__cause__, prefix) from e
                cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
                raise PassError(f"{prefix}: {type(e).__name__}: {e}{cause}", self._replay_note(snapshot)) from e
            except Exception as e:  # noqa: BLE001 - every crash inside a pass becomes a PassError
                raise PassError(f"{prefix}: {type(e).__name__}: {e}", self._replay_note(snapshot)) from e
            seconds = time.perf_counter() - start
            model = result.model
            logger.info("pass %s: %.3f s, modified=%s", p, seconds, result.modified)
            records.append(PassRecord(p.name, str(p), seconds, bool(result.modified), copy.deepcopy(p.stats),
                                      self._unchanged(p, result.modified)))
            if self.dump_ir is not None:
                _dump(model, self.dump_ir / f"{index:02d}_{_safe(p.name)}.onnx")
            if self.verify_each:
                self._verify(model, p, done, snapshot)
            done.append(p.name)
        return PipelineResult(model, records)

    def _verify(self, model: ir.Model, p: EffcPass | None, done: list[str],
                snapshot: onnx.ModelProto | None) -> None:
        """``--verify-each``: check ``model``, the pipeline input (``p`` None) or the output of ``p`` after ``done``.

        Raises:
            PassError: the model is not valid ONNX; for a pass's output the hint names the replay files.
        """
        try:
            verify_model(model)
        except Exception as e:  # noqa: BLE001 - any checker failure
            if p is None:
                raise PassError(f"the input model is not valid ONNX before any pass ran: {e}",
                                "fix the model (or canonicalize it) first, or run without --verify-each") from e
            raise PassError(f"pass '{p.name}' produced an invalid model (verify-each, after [{', '.join(done)}]): {e}",
                            f"report a bug in pass '{p.name}'; {self._replay_note(snapshot)}") from e

    def _unchanged(self, p: EffcPass, modified: bool) -> list[str]:
        """The warning for a lossy pass that changed nothing (logged), or an error under ``strict``.

        Raises:
            PassError: ``strict`` and the pass changed nothing it was asked to change.
        """
        reason = None if modified else p.unchanged_reason()
        if reason is None:
            return []
        message = f"pass '{p}' changed nothing: {reason}"
        if self.strict:
            raise PassError(f"{message} (--strict)", p.unchanged_hint)
        logger.warning("%s; fix: %s (--strict makes this an error)", message, p.unchanged_hint)
        return [message]

    def _replay_note(self, snapshot: onnx.ModelProto | None) -> str:
        """Save the pipeline input and text for replay; return a hint naming them."""
        if snapshot is None:
            return "rerun with the same pipeline to reproduce"
        if self.dump_ir is not None:
            folder = self.dump_ir
        else:
            folder = Path(tempfile.mkdtemp(prefix="effc-replay-"))
        try:
            _save_proto(snapshot, folder / "replay_input.onnx")
            (folder / "replay_pipeline.txt").write_text(str(self.pipeline) + "\n", encoding="utf-8")
        except OSError as e:
            logger.warning("could not save the replay files in %s: %s", folder, e)
            return "rerun with the same pipeline to reproduce"
        logger.error("saved replay files in %s", folder)
        return (
            f"input model and pipeline saved for replay in {folder}: "
            f"effc compile {folder / 'replay_input.onnx'} --passes \"$(cat {folder / 'replay_pipeline.txt'})\""
        )


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _with_prefix(error: EffcError, prefix: str) -> EffcError:
    """A copy of ``error`` (same class, same hint) whose message starts with ``prefix``."""
    new = type(error).__new__(type(error))  # not copy.copy: subclasses may take other constructor arguments
    new.__dict__.update(error.__dict__)
    new.message = f"{prefix}: {error.message}"
    new.args = (f"{new.message}; fix: {new.hint}" if new.hint else new.message,)
    return new
