"""The README's code blocks marked runnable (``<!-- runnable -->`` on the line before the fence) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- runnable -->"


def runnable_blocks(text: str) -> list[str]:
    """The bodies of the ```python blocks whose fence line follows a ``<!-- runnable -->`` line."""
    return re.findall(rf"^{re.escape(MARKER)}\n```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_marker_finds_the_blocks():
    text = f"{MARKER}\n```python\nx = 1\n```\n```python\nnot run\n```\n"
    assert runnable_blocks(text) == ["x = 1\n"]


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    blocks = runnable_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no block marked runnable"
    monkeypatch.chdir(tmp_path)  # the example writes its artifact into the current folder
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    # the example's outputs are the compiled artifact's: equal to onnxruntime on its model.onnx
    x, name = namespace["x"].numpy(), namespace["name"]
    reference = ort.InferenceSession(str(tmp_path / "out-torch" / "model.onnx")).run(None, {name: x})
    np.testing.assert_allclose(namespace["outputs"][0], reference[0], atol=1e-5)
