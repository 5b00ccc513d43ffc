import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from effc.errors import DataError
from effc.ir.data import SYNTHETIC_INT_HIGH, conform_feeds, input_ranks, load_data, synthetic_feeds

RANKS = {"x": 4, "ids": 2}


def test_npz_round_trip_with_sample_axis(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1, 3, 8, 8)).astype(np.float32)
    ids = rng.integers(0, 100, (5, 1, 16))
    np.savez(tmp_path / "d.npz", x=x, ids=ids, extra=np.zeros(3))
    feeds = load_data(tmp_path / "d.npz", ["x", "ids"], ranks=RANKS)
    assert len(feeds) == 5 and sorted(feeds[0]) == ["ids", "x"]
    np.testing.assert_array_equal(feeds[3]["x"], x[3])
    np.testing.assert_array_equal(feeds[4]["ids"], ids[4])


def test_folder_of_single_samples(tmp_path):
    for k in range(3):
        np.savez(tmp_path / f"{k:02d}.npz", x=np.full((1, 3, 2, 2), k, np.float32), ids=np.zeros((1, 4), np.int64))
    feeds = load_data(tmp_path, ["x", "ids"], ranks=RANKS)
    assert [float(f["x"][0, 0, 0, 0]) for f in feeds] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("arrays,match", [
    ({"x": np.zeros((1, 3, 2, 2), np.float32)}, "lacks input"),
    ({"x": np.zeros((3, 2, 2), np.float32), "ids": np.zeros((1, 4))}, "rank 3"),
    ({"x": np.zeros((2, 1, 3, 2, 2), np.float32), "ids": np.zeros((3, 1, 4))}, "different sample counts"),
])
def test_data_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=match):
        load_data(tmp_path / "d.npz", ["x", "ids"], ranks=RANKS)


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_data(tmp_path / "bad.npz", ["x"])
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "none.npz", ["x"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .npz"):
        load_data(tmp_path / "empty", ["x"])


def _model(dynamic=False):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N" if dynamic else 2, 3]),
              helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 7]),
              helper.make_tensor_value_info("m", TensorProto.BOOL, [1, 7])]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return ir.from_proto(helper.make_model(graph))


def test_synthetic_feeds_dtypes_and_ranges():
    model = _model()
    feeds = synthetic_feeds(model, 3, seed=0)
    assert len(feeds) == 3 and input_ranks(model) == {"x": 2, "ids": 2, "m": 2}
    assert feeds[0]["x"].dtype == np.float32 and feeds[0]["x"].shape == (2, 3)
    ids = np.concatenate([f["ids"] for f in feeds])
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < SYNTHETIC_INT_HIGH
    assert feeds[1]["m"].all()
    np.testing.assert_array_equal(synthetic_feeds(model, 1, seed=0)[0]["x"], feeds[0]["x"])
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])
    with pytest.raises(DataError, match="no static shape"):
        synthetic_feeds(_model(dynamic=True), 1)


def test_conform_feeds_casts_same_kind_and_rejects_wrong_shape_or_kind():
    model = _model()
    good = {"x": np.ones((2, 3)), "ids": np.zeros((1, 7), np.int32), "m": np.ones((1, 7), bool), "extra": 1}
    (fed,) = conform_feeds(model, [good])
    assert sorted(fed) == ["ids", "m", "x"]
    assert fed["x"].dtype == np.float32 and fed["ids"].dtype == np.int64
    with pytest.raises(DataError, match=r"input 'x' of sample 0 has shape \[2, 4\], the model expects \[2, 3\]"):
        conform_feeds(model, [{**good, "x": np.ones((2, 4))}])
    with pytest.raises(DataError, match="input 'x' of sample 1 has dtype int64, the model expects float32"):
        conform_feeds(model, [good, {**good, "x": np.ones((2, 3), np.int64)}])
    with pytest.raises(DataError, match=r"sample 0 lacks input\(s\) \['m'\]"):
        conform_feeds(model, [{"x": good["x"], "ids": good["ids"]}])


def test_npy_and_junk_files_are_named_clearly(tmp_path):
    # a .npy used to crash with TypeError (no context manager); junk read as "contains pickled (object) data"
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(DataError, match="single .npy array, not an .npz"):
        load_data(tmp_path / "x.npy", ["x"])
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="not an .npz archive"):
        load_data(tmp_path / "junk.npz", ["x"])


def test_synthetic_indices_stay_inside_the_gathered_table():
    # token_type_ids-style input: indexes a 2-row table (through a Cast); out-of-range ids crash onnxruntime.
    from onnx import numpy_helper

    from effc.ir.reference import Reference

    table = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 4), "table")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
         helper.make_node("Gather", ["table", "ids64"], ["out"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, [1, 64])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 64, 4])], [table])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = synthetic_feeds(model, 3)
    ids = np.stack([f["ids"] for f in feeds])
    assert ids.min() >= 0 and ids.max() <= 1 and len(np.unique(ids)) == 2
    assert Reference(model).run(feeds[0])[0].shape == (1, 64, 4)
