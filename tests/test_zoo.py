import os

import numpy as np
import pytest

from effc import zoo
from effc.data import samples as S
from effc.errors import DataError, EffcError
from effc.ir.model import load
from effc.ir.reference import Reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_names_and_prefix():
    assert zoo.names() == ["minilm-l6", "ppocr-det", "ppocr-rec", "ppocr-cls", "magika", "silero-vad",
                           "smollm2-135m"]
    assert zoo.get("zoo:ppocr-cls") is zoo.get("ppocr-cls")
    with pytest.raises(EffcError, match="zoo:magika") as info:
        zoo.get("zoo:resnet50")
    assert "zoo:minilm-l6" in str(info.value)


@pytest.mark.parametrize("name", [n for n in zoo.names() if n != "minilm-l6" and not zoo.get(n).is_decoder])
def test_shipped_files_exist_and_match_input_shapes(name):
    entry = zoo.get(name)
    assert entry.path().is_file() and entry.output_kind in ("class_scores", "embedding", "probability",
                                                            "feature_map")
    model_inputs = {v.name for v in load(entry.path()).graph.inputs if not v.is_initializer()}
    assert model_inputs == set(entry.input_shapes) | set(entry.constant_inputs)


@pytest.mark.parametrize("name", [n for n in zoo.names() if not zoo.get(n).is_decoder])
def test_samples_deterministic_disjoint_and_shaped(name):
    entry = zoo.get(name)
    calib, calib_again = entry.samples("calibration", 4), entry.samples("calibration", 4)
    evals = entry.samples("eval", 4)
    assert len(calib) == 4 and len(evals) == 4
    for feed, again in zip(calib, calib_again, strict=True):
        assert sorted(feed) == sorted(entry.input_shapes)
        for key, array in feed.items():
            assert array.shape == entry.input_shapes[key]
            np.testing.assert_array_equal(array, again[key])
    data_key = next(iter(entry.input_shapes))
    for c in calib:
        assert not any(np.array_equal(c[data_key], e[data_key]) for e in evals)
    assert "calibration split" in entry.samples_description("calibration")
    with pytest.raises(DataError, match="unknown sample split"):
        entry.samples("train", 1)


def test_silero_samples_are_labelled_synthetic_and_carry_state():
    entry = zoo.get("silero-vad")
    assert "SYNTHETIC" in entry.samples_description("eval")
    feeds = entry.samples("eval", 6)
    assert np.abs(feeds[0]["state"]).max() == 0 and np.abs(feeds[5]["state"]).max() > 0.01
    np.testing.assert_array_equal(feeds[3]["input"][0, :64], feeds[2]["input"][0, -64:])  # 64-sample context


def test_ocr_cls_samples_are_real_text_lines():
    entry = zoo.get("ppocr-cls")
    ref = Reference(load(entry.path()))
    predicted = [int(ref.run(f)[0].argmax()) for f in entry.samples("eval", 8)]
    assert predicted == [0, 1] * 4  # every other line is rendered upside down


def test_magika_samples_are_recognized_file_types():
    config = zoo._magika_config()
    labels = config["target_labels_space"]
    ref = Reference(load(zoo.get("magika").path()))
    expected = {".py": "python", ".json": "json", ".svg": "svg", ".js": "javascript", ".png": "png"}
    files = S.magika_files("eval", 30)
    feeds = zoo.get("magika").samples("eval", 30)
    hits = [labels[int(ref.run(f)[0].argmax())] == expected[p.suffix]
            for p, f in zip(files, feeds, strict=True) if p.suffix in expected]
    assert len(hits) >= 5 and np.mean(hits) >= 0.8


def test_minilm_export_embeds_similar_sentences_closer():
    entry = zoo.get("minilm-l6")
    ref = Reference(load(entry.path()))
    assert ref.output_names == ["last_hidden_state", "sentence_embedding"]
    feeds = entry.samples("eval", 6)
    hidden, emb = ref.run(feeds[0])
    assert hidden.shape == (1, 128, 384) and emb.shape == (1, 384)
    mask = feeds[0]["attention_mask"][0].astype(bool)
    np.testing.assert_allclose(emb[0], hidden[0, mask].mean(0), atol=1e-5)  # mask mean pooling, not normalized
    assert feeds[0]["input_ids"][0, 0] == 101 and feeds[0]["input_ids"].dtype == np.int64


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("EFFC_CACHE_DIR", str(tmp_path / "cache"))
    assert zoo.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("EFFC_CACHE_DIR")
    assert zoo.cache_dir().name == "effc"


def test_sentences_are_many_and_distinct():
    sentences = S.sentences()
    assert len(sentences) >= 160 and len(set(sentences)) == len(sentences)
    calib, evals = S.split_sentences("calibration", 200), S.split_sentences("eval", 200)
    assert len(calib) == 200 and not set(calib) & set(evals)
    distinct = len(sentences[0::2])
    assert distinct >= 700 and len(set(S.split_sentences("calibration", distinct))) == distinct
    with pytest.raises(DataError, match="distinct calibration sentences"):
        S.split_sentences("calibration", (1 + S.PAIR_ROUNDS) * distinct + 1)


def test_magika_splits_share_no_file_content():
    import hashlib

    from effc.data.samples import magika_files

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    calibration = {digest(p) for p in magika_files("calibration", 300)}
    held_out = {digest(p) for p in magika_files("eval", 300)}
    assert not calibration & held_out


def test_decoder_entry_refuses_feed_samples_and_names_its_tokenizer():
    entry = zoo.get("zoo:smollm2-135m")
    assert entry.is_decoder and entry.output_kind == "logits"
    with pytest.raises(EffcError, match="token windows"):
        entry.samples("calibration", 2)
    with pytest.raises(EffcError, match="not a decoder"):
        zoo.get("magika").decoder_graph(64)
