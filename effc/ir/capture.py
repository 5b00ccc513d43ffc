"""Capture a PyTorch module as an ONNX ``ir.Model``: ``torch.export`` -> ``torch.onnx.export(dynamo=True)``.

Shapes are fixed by the example inputs (no dynamic dims). Source: PyTorch docs, "torch.onnx (TorchDynamo-based
ONNX exporter)"; the notes in ``shared/notes/import.md`` (opset 20 exports import into TVM 0.27 as is).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from effc.errors import LoadError

logger = logging.getLogger(__name__)

#: Opset of captured models (measured to import into TVM 0.27 and run in onnxruntime 1.32).
CAPTURE_OPSET = 20


def _reason(err: BaseException) -> str:
    """First line of the innermost exception message (the exporter wraps torch.export's own error), no ANSI."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def capture_torch(module: Any, example_inputs: Sequence[Any] | Any, input_names: Sequence[str] | None = None,
                  output_names: Sequence[str] | None = None, opset: int = CAPTURE_OPSET) -> ir.Model:
    """Export ``module`` called on ``example_inputs`` to an in-memory ONNX model with its weights inline.

    Args:
        module: a ``torch.nn.Module`` (put into eval mode for the export, restored afterwards).
        example_inputs: one tensor or a tuple/list of tensors passed positionally; their shapes become the
            model's static input shapes.
        input_names: graph input names (default: the exporter's, from the ``forward`` argument names).
        output_names: graph output names (default: the exporter's).
        opset: default-domain opset of the result (>= 18).

    Returns:
        An ``ir.Model`` whose initializers hold their values in memory (no temporary files remain).

    Raises:
        LoadError: ``module`` is not a torch module, or ``torch.export``/the ONNX exporter fails (the message names
            the module class and the exporter's reason).
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise LoadError(f"capture_torch needs a torch.nn.Module, got {type(module).__name__}",
                        "pass the nn.Module itself (or an ONNX path / zoo name instead)")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    name = type(module).__name__
    was_training = module.training
    module.eval()
    # The exporter prints its progress to stdout; effc libraries log instead.
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, verbose=False,
                                        input_names=list(input_names) if input_names else None,
                                        output_names=list(output_names) if output_names else None,
                                        external_data=False, optimize=True)
    except Exception as err:  # torch.export raises many types (Unsupported, UserError, TorchExportError...)
        first = _reason(err)
        raise LoadError(f"cannot export module {name} to ONNX with torch.export: {first}",
                        "make forward() traceable by torch.export (no data-dependent Python control flow), or "
                        "export it to ONNX yourself and pass the file") from err
    finally:
        module.train(was_training)
    # Serialize once so the weights become plain in-memory tensors, detached from the torch parameters.
    model = ir.from_proto(ir.to_proto(program.model))
    logger.info("captured %s: %d nodes, opset %d", name, len(model.graph), opset)
    return model
