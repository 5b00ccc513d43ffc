"""``manifest.json``: what an artifact folder holds, with a sha256 per file so tampering is caught before loading.

Keys (written by the compiler): ``effc_version``, ``source`` {path/name, sha256}, ``pipeline`` (canonical text),
``passes`` (records), ``target`` {name, options, info}, ``inputs``/``outputs`` [{name, shape, dtype}],
``files`` {relative path: sha256}, ``metrics``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from effc.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _relative(out_dir: Path, rel: str) -> Path:
    path = (out_dir / rel).resolve()
    if not path.is_relative_to(out_dir.resolve()):
        raise ArtifactError(f"manifest file entry {rel!r} points outside {out_dir}", "recompile the model")
    return path


def write_manifest(out_dir: Path | str, data: dict[str, Any], files: Iterable[str] = ()) -> Path:
    """Write ``out_dir/manifest.json`` from ``data`` plus ``files: {relpath: sha256}`` of the listed files.

    Args:
        out_dir: the artifact folder.
        data: JSON-serializable manifest content; its own ``files`` entry, if any, is replaced by the hashes.
        files: paths relative to ``out_dir`` to hash (e.g. ``["model.so", "model.onnx"]``); when empty, the
            names in ``data["files"]`` (a list, or a dict's keys) are hashed instead.

    Returns:
        The manifest's path.

    Raises:
        ArtifactError: a listed file does not exist, or ``data`` is not JSON-serializable.
    """
    out_dir = Path(out_dir)
    files = list(files) or list(data.get("files") or [])
    hashes = {}
    for rel in files:
        path = _relative(out_dir, rel)
        if not path.is_file():
            raise ArtifactError(f"file {rel!r} listed for the manifest is missing in {out_dir}", "build it first")
        hashes[str(rel)] = sha256_of(path)
    manifest = {**data, "files": hashes}
    try:
        text = json.dumps(manifest, indent=2, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"manifest data is not JSON-serializable: {exc}", "use str/int/float/list/dict") from exc
    path = out_dir / MANIFEST_NAME
    path.write_text(text + "\n", encoding="utf-8")
    return path


def read_manifest(out_dir: Path | str) -> dict[str, Any]:
    """Read ``out_dir/manifest.json``.

    Raises:
        ArtifactError: the folder or manifest is missing, or the manifest is not a JSON object.
    """
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_NAME} in {out_dir}", "point at a folder written by `effc compile`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})", "recompile the model to rewrite it") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} does not hold a JSON object", "recompile the model to rewrite it")
    return manifest


def verify_files(out_dir: Path | str, manifest: dict[str, Any]) -> None:
    """Check every file listed in ``manifest["files"]`` exists with the recorded sha256.

    Raises:
        ArtifactError: a file is missing or its bytes changed (the message names it), or ``files`` is malformed.
    """
    out_dir = Path(out_dir)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"manifest in {out_dir} lists no files", "recompile the model")
    for rel, expected in files.items():
        path = _relative(out_dir, rel)
        if not path.is_file():
            raise ArtifactError(f"artifact file {rel!r} is missing in {out_dir}", "recompile the model")
        actual = sha256_of(path)
        if actual != expected:
            raise ArtifactError(
                f"artifact file {rel!r} in {out_dir} has sha256 {actual[:12]}…, the manifest says {str(expected)[:12]}…"
                " (modified after compilation)",
                "recompile the model; never edit files of an artifact folder",
            )
