"""Load and save ONNX models as ``onnx_ir.Model`` (external data included, checked before it is read).

Source: ONNX IR spec, "External Tensor Data" (``data_location = EXTERNAL``, keys ``location``/``offset``/``length``,
locations are relative to the model file's folder).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from effc.errors import LoadError

logger = logging.getLogger(__name__)

#: Protobuf cannot serialize a message of 2 GiB or more; above this weights go to an external data file.
PROTO_LIMIT_BYTES = 2**31 - 1


def _external_locations(proto: onnx.ModelProto) -> list[str]:
    """Every ``location`` of every tensor stored outside the file (initializers, attributes, subgraphs)."""
    locations = []
    for tensor in external_data_helper._get_all_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            locations.append(info.location)
    return locations


def _check_locations(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Raise LoadError if an external-data location is absolute or resolves outside ``base_dir``."""
    root = base_dir.resolve()
    for location in _external_locations(proto):
        target = (root / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(root):
            raise LoadError(
                f"external data location {location!r} resolves to {target}, outside the model's folder {root}",
                "external data files must sit inside the model's folder; re-save the model with relative locations "
                "(onnx.save(model, path, save_as_external_data=True, location='model.onnx.data'))",
            )
        if not target.is_file():
            raise LoadError(
                f"external data file {location!r} of the model is missing (looked for {target})",
                "copy the .data file next to the .onnx file, or re-save the model with weights inline",
            )


def load(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX file into an ``onnx_ir.Model`` with all external data loaded into memory.

    Args:
        path: the ``.onnx`` file; external data files must lie inside its folder.

    Returns:
        The model; every initializer holds its values in memory (no lazy file references).

    Raises:
        LoadError: the file is missing or a folder, is not an ONNX protobuf (text, image, empty), is truncated,
            refers to external data outside its folder or to a missing data file.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"model file {str(path)!r} does not exist",
                        "check the path, or use a zoo name like zoo:ppocr-cls")
    if not path.is_file():
        raise LoadError(f"model path {str(path)!r} is not a file", "pass the .onnx file itself, not its folder")
    data = path.read_bytes()
    not_onnx = LoadError(
        f"{str(path)!r} is not a readable ONNX model ({len(data)} bytes; truncated or not an ONNX protobuf)",
        "pass a complete .onnx file (re-export or re-download it); text/ONNX-JSON and images are not accepted",
    )
    try:
        proto = onnx.ModelProto.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as err:
        raise not_onnx from err
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise not_onnx
    if not proto.graph.output:
        raise not_onnx
    _check_locations(proto, path.parent)
    if _external_locations(proto):
        try:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as err:
            raise LoadError(f"cannot read the external data of {str(path)!r}: {err}", "re-save the model") from err
    try:
        model = ir.from_proto(proto)
    except Exception as err:  # onnx_ir raises several types on malformed graphs
        raise LoadError(f"{str(path)!r} parses as protobuf but is not a valid ONNX graph: {err}",
                        "run onnx.checker.check_model on it and re-export") from err
    logger.debug("loaded %s: %d nodes, opset %s", path, len(model.graph), model.opset_imports.get("", None))
    return model


def _tensor_bytes(model: ir.Model) -> int:
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save(model: ir.Model, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` as one self-contained ONNX file (weights inline).

    Above the 2 GB protobuf limit the weights go to ``<name>.data`` beside the file instead.

    Args:
        model: the model; tensors still referring to external files are read into memory first.
        path: destination ``.onnx`` file; its folder is created if needed.

    Raises:
        LoadError: the file cannot be written (permission, disk full).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.external_data.load_to_model(model)
    try:
        if _tensor_bytes(model) >= PROTO_LIMIT_BYTES:
            ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
        else:
            ir.save(model, path)
    except OSError as err:
        raise LoadError(f"cannot write model to {str(path)!r}: {err}",
                        "check the folder exists and is writable") from err


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _describe(value: ir.Value) -> dict[str, Any]:
    shape = None
    if value.shape is not None:
        shape = [(d if d >= 0 else None) if isinstance(d, int) else (d.value if isinstance(d.value, str) else None)
                 for d in value.shape]
    dtype = None
    if value.dtype is not None:
        dtype = value.dtype.numpy().name if value.dtype.numpy() is not None else str(value.dtype)
    return {"name": value.name, "shape": shape, "dtype": dtype}


def io_signature(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes and dtypes of the graph inputs (initializers excluded) and outputs.

    Returns:
        ``{"inputs": [{"name", "shape", "dtype"}], "outputs": [...]}``; ``shape`` is a list whose items are ints,
        symbolic dim names (str) or None; ``dtype`` is the numpy name (``"float32"``, ``"int64"``, ``"bool"``).
        An integer input that reaches index operands (Gather, GatherElements, GatherND, Scatter* indices) also
        carries ``"index_checks"``: each operand and the range ``[low, high)`` its values must lie in
        (:func:`effc.ir.index_inputs.index_checks`), which :class:`effc.runtime.CompiledModel` enforces.
    """
    from effc.ir.index_inputs import index_checks

    specs = []
    for v in (v for v in model.graph.inputs if not v.is_initializer()):
        spec = _describe(v)
        if spec["dtype"].startswith(("int", "uint")) and (checks := index_checks(v)):
            spec["index_checks"] = checks
        specs.append(spec)
    return {"inputs": specs, "outputs": [_describe(v) for v in model.graph.outputs]}
