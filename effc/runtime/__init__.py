"""Load a compiled artifact folder and run it from Python.

``load(out_dir)`` reads ``manifest.json``, checks every listed file's sha256 *before* any shared object is
loaded, then hands the folder to the target named in the manifest::

    model = effc.runtime.load("out")
    outputs = model.run({"x": x})      # list of numpy arrays, graph output order

This package does not import :mod:`effc.passes`. Artifacts of the ``cpu`` and ``cuda`` targets load through
:mod:`effc.runtime.vm` with TVM's runtime libraries only (no ``import tvm``, no ``libtvm_compiler.so``); a ``cuda``
artifact runs on CUDA device 0 and raises ``TargetError("built for sm_90; no CUDA device found")`` without one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from effc.errors import ArtifactError, DataError
from effc.runtime.index_check import check_index_input, checks_of
from effc.runtime.manifest import read_manifest, verify_files, write_manifest

__all__ = ["CompiledModel", "load", "read_manifest", "verify_files", "write_manifest"]

logger = logging.getLogger(__name__)


class CompiledModel:
    """A loaded artifact.

    Attributes:
        manifest: the parsed ``manifest.json``.
        inputs: ``[{"name", "shape", "dtype"}]`` in the order ``run`` expects them.
        outputs: ``[{"name", "shape", "dtype"}]`` in the order ``run`` returns them.
        check_indices: whether ``run`` checks index inputs against their ranges (``index_checks`` in the manifest).
    """

    def __init__(self, out_dir: Path, manifest: dict[str, Any], runner: Any, check_indices: bool = True):
        self.out_dir = Path(out_dir)
        self.check_indices = bool(check_indices)
        self.manifest = manifest
        self.inputs: list[dict[str, Any]] = list(manifest.get("inputs", []))
        self.outputs: list[dict[str, Any]] = list(manifest.get("outputs", []))
        self._runner = runner

    def _check_feeds(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        expected = [spec["name"] for spec in self.inputs]
        unknown = sorted(set(feeds) - set(expected))
        missing = [name for name in expected if name not in feeds]
        if unknown or missing:
            raise DataError(
                f"feeds do not match the model inputs (missing {missing}, unknown {unknown})",
                f"pass exactly these inputs: {expected}",
            )
        checked = {}
        for spec in self.inputs:
            name, shape, dtype = spec["name"], tuple(spec["shape"]), np.dtype(spec["dtype"])
            array = np.asarray(feeds[name])
            if array.shape != shape:
                raise DataError(
                    f"input {name!r} has shape {list(array.shape)}, the compiled model expects {list(shape)}",
                    "reshape the data, or recompile with --input-shape " + f"{name}={'x'.join(map(str, shape))}",
                )
            if array.dtype != dtype:
                if array.dtype.kind != dtype.kind:
                    raise DataError(
                        f"input {name!r} has dtype {array.dtype}, the compiled model expects {dtype}",
                        f"convert it with .astype('{dtype}')",
                    )
                array = array.astype(dtype)
            if self.check_indices:
                check_index_input(name, array, checks_of(spec))
            checked[name] = array
        return checked

    def run(self, feeds: dict[str, Any]) -> list[np.ndarray]:
        """Run one inference.

        Args:
            feeds: input name → array with the manifest's shape; a dtype of the same kind (float64 for float32,
                int32 for int64) is converted, others (int for float) are rejected.

        Returns:
            Output arrays in the manifest's output order.

        Raises:
            DataError: an input is missing, unknown, or has the wrong shape/dtype (names it and the expected one), or an
                index input (``index_checks`` in the manifest: Gather/GatherElements/GatherND/Scatter* indices) holds a
                value outside ``[-size, size)`` of the axis it indexes (unless loaded with ``check_indices=False``).
            TargetError: the target failed at run time.
        """
        return self._runner.run(self._check_feeds(feeds))

    @property
    def is_decoder(self) -> bool:
        """True for a decoder artifact (``prefill`` and ``decode`` entry points over a KV cache)."""
        return bool(self.manifest.get("decoder"))

    def decoder(self) -> Any:
        """The :class:`effc.runtime.decoder.DecoderSession` of this artifact (created once: cache, tokenizer).

        Raises:
            ArtifactError: the artifact is not a decoder.
        """
        if not self.is_decoder:
            raise ArtifactError(
                f"the artifact in {self.out_dir} ({(self.manifest.get('source') or {}).get('name')}) is not a decoder "
                "language model, so it cannot generate text",
                "compile a decoder, e.g. effc compile zoo:smollm2-135m -o out; run this one with effc run",
            )
        if getattr(self, "_session", None) is None:
            from effc.runtime.decoder import DecoderSession, compiled_backend
            from effc.runtime.hugepages import advise_huge_pages

            info = self.manifest["decoder"]
            _check_cache_layout(self.out_dir, info)
            import transformers

            tokenizer = transformers.AutoTokenizer.from_pretrained(str(self.out_dir / info["tokenizer"]))
            self._session = DecoderSession(compiled_backend(self._runner), info, tokenizer, info["stop_token_ids"])
            advise_huge_pages()  # decode streams every weight constant once per token: fewer TLB misses
        return self._session

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False, on_text: Any = None, speculate: bool = False) -> Any:
        """Generate text after ``prompt`` (see :meth:`effc.runtime.decoder.DecoderSession.generate`).

        Returns:
            A :class:`effc.runtime.decoder.Generation` (text, tokens, prefill ms, decode ms/token, tokens/s).

        Raises:
            ArtifactError: the artifact is not a decoder, or ``speculate`` and it has no draft entry point.
            DataError: bad sampling arguments, the prompt plus ``max_new_tokens`` does not fit the KV cache, or
                ``speculate`` with a temperature above 0.
        """
        return self.decoder().generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, seed=seed, chat=chat, on_text=on_text, speculate=speculate)


def load(out_dir: Path | str, *, check_indices: bool = True) -> CompiledModel:
    """Load the artifact in ``out_dir`` (hashes verified before any shared object is loaded).

    Args:
        out_dir: the artifact folder written by ``effc compile``.
        check_indices: check index inputs before every run (:mod:`effc.runtime.index_check`; a few microseconds).
            False skips it, for inputs known to be in range only: an out-of-range index then makes the compiled
            code access memory out of bounds.

    Raises:
        ArtifactError: manifest missing/invalid, a file missing or modified, or no target recorded.
        TargetError: the manifest's target is unknown here or cannot run the artifact on this machine.
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    verify_files(out_dir, manifest)
    target_name = (manifest.get("target") or {}).get("name")
    if not target_name:
        raise ArtifactError(f"manifest in {out_dir} names no target", "recompile the model")
    from effc.runtime import vm

    # TVM artifacts: runtime libraries only, never TVM's compiler. CPU decoders (two entry points, a cache shared
    # without copies) still load through their target's runner; cuda decoders keep their cache on the device.
    if target_name in vm.DEVICES and (not manifest.get("decoder") or target_name != "cpu"):
        runner: Any = vm.load_vm_runner(out_dir, manifest)
    else:
        from effc.targets import get_target  # import here: targets pull in TVM

        runner = get_target(target_name).load(out_dir, manifest)
    logger.info("loaded %s artifact from %s", target_name, out_dir)
    return CompiledModel(out_dir, manifest, runner, check_indices=check_indices)


def _check_cache_layout(out_dir: Path, info: dict[str, Any]) -> None:
    """Raises ArtifactError when the artifact's entry points take another KV-cache layout than this runtime's."""
    from effc.ir.decoder import INPUTS, LAST_INDEX, PREFILL_LAST, kv_layout

    expected = [*INPUTS, *(slot.input for slot in kv_layout(info))]
    for entry, signature in (info.get("entries") or {}).items():
        names = [spec["name"] for spec in signature["inputs"]]
        if names != (expected + [LAST_INDEX] if entry == PREFILL_LAST else expected):
            raise ArtifactError(f"the decoder artifact in {out_dir} takes its KV cache as {names[len(INPUTS):][:2]}"
                                f"... in '{entry}', not as this effc's per-layer {expected[len(INPUTS):][:2]}...",
                                "recompile it with this version of effc")
