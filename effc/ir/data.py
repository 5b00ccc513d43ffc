"""User data for calibration/evaluation (``--data``) and labelled synthetic feeds.

File format: an ``.npz`` keyed by input name. An array whose rank is the input's rank + 1 holds many samples along
its first axis; an array of the input's rank is one sample. A folder is read as its ``.npz`` files in name order.
"""

from __future__ import annotations

import logging
import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.errors import DataError, ShapeError
from effc.ir.index_inputs import index_checks

logger = logging.getLogger(__name__)

#: Range of synthetic integer ids (token ids, byte values): [0, SYNTHETIC_INT_HIGH).
SYNTHETIC_INT_HIGH = 100


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    fix = "save inputs with numpy.savez(path, **{input_name: array})"
    try:
        with open(path, "rb") as handle:
            magic = handle.read(6)
    except OSError as err:
        raise DataError(f"cannot read data file {str(path)!r}: {err}", fix) from err
    if magic == b"\x93NUMPY":
        raise DataError(f"data file {str(path)!r} is a single .npy array, not an .npz keyed by input name",
                        f"{fix}, e.g. numpy.savez('samples.npz', x=numpy.load({path.name!r}))")
    if not magic.startswith(b"PK"):
        raise DataError(f"cannot read data file {str(path)!r}: not an .npz archive (no zip header)", fix)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"cannot read data file {str(path)!r}: {err}",
                        "save inputs with numpy.savez(path, **{input_name: array})") from err
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):  # numpy hands back the raw bytes of a member that is not .npy
            raise DataError(f"member {key!r} of data file {str(path)!r} is not a .npy array "
                            f"({len(value)} bytes without the .npy header)", fix)
    return arrays


def _samples_of(arrays: Mapping[str, np.ndarray], path: Path, input_names: Sequence[str],
                ranks: Mapping[str, int] | None) -> list[dict[str, np.ndarray]]:
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise DataError(f"data file {str(path)!r} lacks input(s) {missing}; it holds {sorted(arrays)}",
                        f"save one array per model input: {list(input_names)}")
    counts = set()
    batched = {}
    for name in input_names:
        array = arrays[name]
        rank = (ranks or {}).get(name)
        if rank is None:
            is_batched = False
        elif array.ndim == rank + 1:
            is_batched = True
        elif array.ndim == rank:
            is_batched = False
        else:
            raise DataError(f"input {name!r} in {str(path)!r} has rank {array.ndim} (shape {array.shape}), "
                            f"the model expects rank {rank}", f"give shape of rank {rank} (one sample) or "
                            f"{rank + 1} (samples along axis 0)")
        batched[name] = is_batched
        counts.add(array.shape[0] if is_batched else 1)
    if len(counts) > 1:
        raise DataError(f"inputs in {str(path)!r} hold different sample counts {sorted(counts)}",
                        "stack the same number of samples for every input")
    n = counts.pop()
    return [{name: (arrays[name][k] if batched[name] else arrays[name]) for name in input_names} for k in range(n)]


def load_data(path: str | os.PathLike, input_names: Sequence[str],
              ranks: Mapping[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Read feeds from an ``.npz`` file (or a folder of them).

    Args:
        path: ``.npz`` keyed by input name, or a folder whose ``*.npz`` files are read in name order.
        input_names: the model's data inputs (every one must be present; extra keys are ignored).
        ranks: rank per input (e.g. from the model); with it an extra leading axis means many samples and a wrong
            rank raises. Without it every file is one sample.

    Returns:
        One feed dict per sample.

    Raises:
        DataError: missing path, unreadable file, empty folder, missing input key, wrong rank, or unequal sample
            counts between inputs.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist", "pass an .npz file or a folder of .npz files")
    files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"data folder {str(path)!r} holds no .npz files", "save inputs with numpy.savez")
    feeds = []
    for file in files:
        feeds.extend(_samples_of(_read_npz(file), file, input_names, ranks))
    if not feeds:
        raise DataError(f"data {str(path)!r} holds zero samples", "stack at least one sample per input")
    logger.info("loaded %d samples from %s", len(feeds), path)
    return feeds


def _same_family(have: np.dtype, want: np.dtype) -> bool:
    """True when ``have`` converts to ``want`` keeping the meaning (float64 → float32, int32 → int64, uint8 → int64)."""
    family = {"f": "f", "i": "i", "u": "i", "b": "b", "c": "c"}
    return family.get(have.kind, have.kind) == family.get(want.kind, want.kind)


def conform_feeds(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]],
                  where: str = "the data") -> list[dict[str, np.ndarray]]:
    """Check feeds against ``model``'s data inputs and convert dtypes of the same kind.

    Every feed must hold every data input with the input's static shape. An array whose dtype is of the same
    family as the input's (``float64`` data for a ``float32`` input, ``int32`` for ``int64``) is converted; keys
    that are not model inputs are dropped.

    Args:
        model: the model the feeds are for (canonical: static input shapes).
        feeds: one dict input name → array per sample.
        where: how the error messages name the data, e.g. ``"--data samples.npz"``.

    Returns:
        New feed dicts holding exactly the model's data inputs, with the model's dtypes.

    Raises:
        DataError: a feed lacks an input, or an array's shape or dtype kind does not match the input's (the
            message names the input, the sample, what was given and what the model expects).
    """
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    names = [v.name for v in inputs]
    conformed = []
    for index, feed in enumerate(feeds):
        missing = [n for n in names if n not in feed]
        if missing:
            raise DataError(f"{where}: sample {index} lacks input(s) {missing}; it holds {sorted(feed)}",
                            f"give one array per model input: {names}")
        out = {}
        for value in inputs:
            array = np.asarray(feed[value.name])
            want_shape = tuple(value.shape) if value.shape is not None else None
            static = want_shape is not None and all(isinstance(d, int) and d >= 0 for d in want_shape)
            if static and array.shape != want_shape:
                dims = "x".join(map(str, want_shape))
                raise DataError(
                    f"{where}: input {value.name!r} of sample {index} has shape {list(array.shape)}, the model "
                    f"expects {list(want_shape)}",
                    f"give arrays of shape {list(want_shape)} (or ({', '.join(['N', *map(str, want_shape)])}) for N "
                    f"samples), or compile for another shape with --input-shape {value.name}=... (now {dims})")
            want = np.dtype(value.dtype.numpy()) if value.dtype is not None else array.dtype
            if array.dtype != want:
                if not _same_family(array.dtype, want):
                    raise DataError(
                        f"{where}: input {value.name!r} of sample {index} has dtype {array.dtype}, the model expects "
                        f"{want}", f"save it as {want}, e.g. numpy.savez(path, {value.name}=array.astype('{want}'))")
                array = array.astype(want)
            out[value.name] = array
        conformed.append(out)
    return conformed


def input_ranks(model: ir.Model) -> dict[str, int]:
    """Rank of every data input of ``model`` (for :func:`load_data`)."""
    return {v.name: len(v.shape) for v in model.graph.inputs if not v.is_initializer() and v.shape is not None}


def _index_bound(value: ir.Value) -> int:
    """Exclusive bound of synthetic integers in ``value``: the smallest axis it indexes, or SYNTHETIC_INT_HIGH."""
    sizes = [min(check["high"]) for check in index_checks(value)]
    return min([SYNTHETIC_INT_HIGH, *sizes])


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that reports it
        return None


def check_input_sizes(model: ir.Model, memory_bytes: int | None = None) -> None:
    """Refuse inputs whose one sample would not fit this machine's memory (e.g. ``--input-shape x=1x3x100000x100000``).

    Args:
        model: the canonical model (static input shapes).
        memory_bytes: the memory to compare with; None: this machine's physical memory.

    Raises:
        ShapeError: an input's elements times its dtype size exceed the memory (names the input, shape and bytes).
    """
    memory = _memory_bytes() if memory_bytes is None else memory_bytes
    for v in model.graph.inputs:
        if v.is_initializer() or v.shape is None or v.dtype is None or v.dtype.numpy() is None:
            continue
        if not all(isinstance(d, int) and d >= 0 for d in v.shape):
            continue
        nbytes = math.prod(v.shape) * np.dtype(v.dtype.numpy()).itemsize
        if memory is not None and nbytes > memory:
            dims = "x".join(map(str, v.shape))
            raise ShapeError(
                f"input {v.name!r} of shape {dims} takes {nbytes / 1e9:.3g} GB per sample "
                f"({np.dtype(v.dtype.numpy())}), more than this machine's {memory / 1e9:.3g} GB of memory",
                f"compile for a smaller shape with --input-shape {v.name}=...")


def synthetic_feeds(model: ir.Model, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``n`` SYNTHETIC feeds for ``model``'s inputs (for smoke tests and timing, never fidelity claims).

    Floats are standard normal, integers uniform in ``[0, 100)`` — or in ``[0, size)`` when the input indexes an axis
    of that size (Gather, GatherElements, GatherND, Scatter*: e.g. BERT's ``token_type_ids`` into a 2-row embedding;
    an index out of range makes onnxruntime fail and compiled code access memory out of bounds), booleans True.

    Raises:
        DataError: an input has no static shape (canonicalize first) or an unsupported dtype.
    """
    rng = np.random.default_rng(seed)
    inputs = [v for v in model.graph.inputs if not v.is_initializer()]
    for v in inputs:
        if v.shape is None or not all(isinstance(d, int) and d >= 0 for d in v.shape):
            raise DataError(f"input {v.name!r} has no static shape ({v.shape})",
                            "canonicalize the model with --input-shape first")
    feeds = []
    for _ in range(n):
        feed = {}
        for v in inputs:
            dtype = np.dtype(v.dtype.numpy())
            shape = tuple(v.shape)
            if dtype == np.bool_:
                feed[v.name] = np.ones(shape, dtype=np.bool_)
            elif np.issubdtype(dtype, np.integer):
                feed[v.name] = rng.integers(0, _index_bound(v), shape).astype(dtype)
            elif np.issubdtype(dtype, np.floating):
                feed[v.name] = rng.standard_normal(shape).astype(dtype)
            else:
                raise DataError(f"cannot synthesize input {v.name!r} of dtype {dtype}", "pass real data with --data")
        feeds.append(feed)
    return feeds
