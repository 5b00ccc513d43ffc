"""Real (or clearly labelled synthetic) inputs for the zoo models, split into disjoint calibration/eval sets.

Everything is deterministic and offline: sentences shipped in ``sentences.json``, text images rendered with Pillow,
file bytes read from installed Python packages, and a synthetic speech-like signal for the voice detector.
The calibration split uses even-indexed items and seed 1, the eval split odd-indexed items and seed 2, so the two
never share an input.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from effc.errors import DataError

SPLITS = ("calibration", "eval")
_SEEDS = {"calibration": 1, "eval": 2}


def check_split(split: str) -> int:
    """Index (0 or 1) of ``split``; raises DataError naming the valid splits."""
    if split not in SPLITS:
        raise DataError(f"unknown sample split {split!r}", f"use one of {list(SPLITS)}")
    return SPLITS.index(split)


@functools.cache
def sentences() -> tuple[str, ...]:
    """The English sentences shipped with effc (``effc/data/sentences.json``)."""
    text = resources.files("effc.data").joinpath("sentences.json").read_text(encoding="utf-8")
    return tuple(json.loads(text)["sentences"])


#: Samples a sentence split can give: its distinct sentences, then this many rounds of joined pairs.
PAIR_ROUNDS = 3


def split_sentences(split: str, n: int) -> list[str]:
    """``n`` sentences of one split; beyond the single sentences, pairs of the same split are joined.

    Raises:
        DataError: ``n`` above ``(1 + PAIR_ROUNDS)`` × the split's distinct sentences (joined pairs add little
            beyond that; give your own data).
    """
    own = list(sentences()[check_split(split)::2])
    limit = (1 + PAIR_ROUNDS) * len(own)
    if n > limit:
        raise DataError(f"only {len(own)} distinct {split} sentences ({limit} samples with joined pairs), {n} asked",
                        f"ask for at most {limit}, or give your own text samples with --data")
    out = list(own)
    step = 1
    while len(out) < n:
        out.extend(f"{own[i]} {own[(i + step) % len(own)]}" for i in range(len(own)))
        step += 1
    return out[:n]


# ---------------------------------------------------------------- OCR images (PaddleOCR / rapidocr preprocessing)
def _bgr_chw(image: Image.Image) -> np.ndarray:
    """RGB image -> (3, H, W) float32 BGR, normalized ``(x / 255 - 0.5) / 0.5`` as rapidocr does."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
    return ((array / 255.0 - 0.5) / 0.5).transpose(2, 0, 1).copy()


def _line_image(text: str, rng: np.random.Generator) -> Image.Image:
    """One text line, dark ink on a light background, tightly cropped with a small margin."""
    font = ImageFont.load_default(size=int(rng.integers(26, 40)))
    left, top, right, bottom = font.getbbox(text)
    margin = int(rng.integers(3, 10))
    bg = tuple(int(c) for c in rng.integers(200, 256, 3))
    image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), bg)
    ink = tuple(int(c) for c in rng.integers(0, 80, 3))
    ImageDraw.Draw(image).text((margin - left, margin - top), text, font=font, fill=ink)
    return image


def ocr_line(split: str, n: int, height: int, width: int, rotate_half: bool = False) -> list[np.ndarray]:
    """Text-line crops preprocessed like rapidocr's recognizer/classifier: ``(1, 3, height, width)`` float32.

    The line keeps its aspect ratio at ``height`` pixels (clipped to ``width``) and is zero-padded on the right
    (``resize_norm_img`` in rapidocr_onnxruntime). With ``rotate_half`` every other line is upside down (what the
    angle classifier detects).
    """
    rng = np.random.default_rng(_SEEDS[split])
    out = []
    for k, sentence in enumerate(split_sentences(split, n)):
        words = sentence.split()
        start = int(rng.integers(0, max(1, len(words) - 3)))
        text = " ".join(words[start:start + int(rng.integers(2, 6))])
        image = _line_image(text, rng)
        if rotate_half and k % 2 == 1:
            image = image.rotate(180)
        resized_w = min(width, int(math.ceil(height * image.width / image.height)))
        chw = _bgr_chw(image.resize((resized_w, height), Image.BILINEAR))
        padded = np.zeros((3, height, width), dtype=np.float32)
        padded[:, :, :resized_w] = chw
        out.append(padded[None])
    return out


def ocr_page(split: str, n: int, size: int) -> list[np.ndarray]:
    """Document-like pages (several lines of text at varied sizes) as ``(1, 3, size, size)`` float32 (BGR)."""
    rng = np.random.default_rng(_SEEDS[split])
    pool = split_sentences(split, max(n * 5, 1))
    out = []
    for k in range(n):
        bg = tuple(int(c) for c in rng.integers(215, 256, 3))
        page = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(page)
        y = int(rng.integers(4, 30))
        for line in range(5):
            font = ImageFont.load_default(size=int(rng.integers(14, 30)))
            words = pool[(k * 5 + line) % len(pool)].split()
            text = " ".join(words[: int(rng.integers(2, 6))])
            x = int(rng.integers(4, 60))
            ink = tuple(int(c) for c in rng.integers(0, 90, 3))
            draw.text((x, y), text, font=font, fill=ink)
            y += int(font.size * rng.uniform(1.4, 2.4))
            if y > size - 30:
                break
        out.append(_bgr_chw(page)[None])
    return out


# ---------------------------------------------------------------- Magika: bytes of real files
_MAGIKA_PACKAGES = ("magika", "matplotlib", "onnx", "PIL", "rich", "click")
_MAGIKA_EXTS = (".py", ".json", ".txt", ".md", ".png", ".svg", ".ttf", ".afm", ".csv", ".rst", ".c", ".h", ".pyi",
                ".html", ".css", ".js", ".so", ".toml", ".yaml", ".xml", ".cfg", ".proto", ".onnx", ".npy")


@functools.cache
def _package_files() -> tuple[Path, ...]:
    """Files of installed packages, sorted, interleaved by extension so every prefix mixes file types."""
    by_ext: dict[str, list[Path]] = {ext: [] for ext in _MAGIKA_EXTS}
    seen: set[tuple[int, bytes]] = set()  # files whose bytes Magika sees (start and end) are identical count once
    for package in _MAGIKA_PACKAGES:
        spec = resources.files(package) if _importable(package) else None
        if spec is None:
            continue
        for root, dirs, files in os.walk(str(spec)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")  # .pyc caches change as modules get imported
            for name in sorted(files):
                ext = os.path.splitext(name)[1]
                path = Path(root, name)
                if ext in by_ext and path.stat().st_size >= 64:
                    key = _content_key(path)
                    if key not in seen:
                        seen.add(key)
                        by_ext[ext].append(path)
    lists = [sorted(v) for v in by_ext.values() if v]
    interleaved = [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]
    return tuple(interleaved)


def _content_key(path: Path, edge: int = 4096) -> tuple[int, bytes]:
    """Size and a digest of the first and last ``edge`` bytes: equal keys give equal Magika inputs."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(edge)
        fh.seek(max(0, size - edge))
        tail = fh.read(edge)
    return size, hashlib.sha256(head + tail).digest()


def _importable(package: str) -> bool:
    try:
        resources.files(package)
    except (ModuleNotFoundError, TypeError):
        return False
    return True


def magika_features(data: bytes, config: dict) -> np.ndarray:
    """Magika's model input for one file: ``(1, beg_size + end_size)`` int32 via magika's own feature extraction."""
    from magika import Magika
    from magika.types.seekable import Seekable

    features = Magika._extract_features_from_seekable(
        Seekable(io.BytesIO(data)), beg_size=config["beg_size"], mid_size=config["mid_size"],
        end_size=config["end_size"], padding_token=config["padding_token"], block_size=config["block_size"],
        use_inputs_at_offsets=config["use_inputs_at_offsets"])
    return np.asarray([features.beg[: config["beg_size"]] + features.end[-config["end_size"]:]], dtype=np.int32)


def magika_files(split: str, n: int) -> list[Path]:
    """``n`` real files of installed packages for one split (even/odd positions of the interleaved list)."""
    files = list(_package_files()[check_split(split)::2])
    if n > len(files):
        raise DataError(f"only {len(files)} files available for the magika {split} split, asked for {n}",
                        f"ask for at most {len(files)} samples")
    return files[:n]


# ---------------------------------------------------------------- Silero: synthetic speech-like audio
def speech_like(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """SYNTHETIC speech-like audio, float32 in [-1, 1]: voiced syllables, fricative noise bursts and pauses.

    Voiced parts are harmonic series of a gliding f0 (90-260 Hz) shaped by three formant bumps; unvoiced parts are
    high-passed noise; pauses carry faint background noise. Not real speech: the voice detector sees inputs of the
    right scale and spectral character, nothing more.
    """
    rng = np.random.default_rng(seed)
    total = int(seconds * rate)
    out = np.zeros(total, dtype=np.float64)
    pos = 0
    while pos < total:
        kind = rng.choice(["voiced", "fricative", "pause"], p=[0.55, 0.15, 0.30])
        length = min(total - pos, int(rate * rng.uniform(0.08, 0.35)))
        t = np.arange(length) / rate
        if kind == "voiced":
            f0 = rng.uniform(90, 260) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(2, 6) * t))
            phase = 2 * np.pi * np.cumsum(f0) / rate
            formants = rng.uniform([300, 900, 2200], [900, 2200, 3200])
            seg = np.zeros(length)
            for h in range(1, 30):
                freq = h * f0.mean()
                gain = sum(np.exp(-(((freq - f) / 180.0) ** 2)) for f in formants) + 0.05
                seg += gain / h**0.5 * np.sin(h * phase)
            seg *= np.hanning(length) * rng.uniform(0.2, 0.6) / max(np.abs(seg).max(), 1e-6)
        elif kind == "fricative":
            noise = rng.standard_normal(length)
            seg = np.diff(noise, prepend=0.0) * np.hanning(length) * rng.uniform(0.02, 0.1)
        else:
            seg = rng.standard_normal(length) * 0.002
        out[pos:pos + length] = seg
        pos += length
    return np.clip(out, -1, 1).astype(np.float32)


def silero_chunks(split: str, n: int, model_path: Path, sample_rate: int = 16000, chunk: int = 512,
                  context: int = 64) -> list[dict[str, np.ndarray]]:
    """``n`` consecutive chunks of one synthetic stream as Silero feeds, the state carried by the original model.

    Each feed is ``{"input": (1, context + chunk) float32, "state": (2, 1, 128) float32}``; ``input`` prepends the
    last ``context`` samples of the previous chunk (as ``silero_vad.utils_vad.OnnxWrapper`` does) and ``state``
    is the one the original ONNX model returned for the previous chunk.
    """
    import onnxruntime as ort

    audio = speech_like((n * chunk) / sample_rate + 0.1, seed=_SEEDS[split] + 10 * check_split(split), rate=sample_rate)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), dtype=np.float32)
    previous = np.zeros(context, dtype=np.float32)
    feeds = []
    for k in range(n):
        samples = audio[k * chunk:(k + 1) * chunk]
        x = np.concatenate([previous, samples])[None].astype(np.float32)
        feeds.append({"input": x, "state": state})
        _, state = session.run(None, {"input": x, "state": state, "sr": np.array(sample_rate, dtype=np.int64)})
        previous = samples[-context:]
    return feeds
