"""effc: a model compiler for compressed networks on CPU, CUDA and Cortex-M.

Typical use::

    import effc
    result = effc.compile("model.onnx", passes="prune(sparsity=0.3)", target="cpu", out_dir="out")
    model = effc.runtime.load("out")
    outputs = model.run({"x": x})
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "compile"]


def compile(*args, **kwargs):  # noqa: A001  (the public name users expect)
    """Compile a model; see :func:`effc.compiler.compile_model` for arguments, results and errors."""
    from effc.compiler import compile_model

    return compile_model(*args, **kwargs)
