import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.errors import LoadError
from effc.ir.model import io_signature, load, save, sha256_file


def _tiny(weight=None):
    w = weight if weight is not None else np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _with_external(tmp_path, location):
    proto = _tiny(np.ones((64, 4), dtype=np.float32))
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(proto, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    if location != "m.data":
        saved = onnx.load(folder / "m.onnx", load_external_data=False)
        for entry in saved.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(saved, folder / "m.onnx")
    return folder / "m.onnx"


def test_load_valid_external_data_is_loaded_into_memory(tmp_path):
    model = load(_with_external(tmp_path, "m.data"))
    weight = model.graph.initializers["w"].const_value
    assert not isinstance(weight, ir.ExternalTensor)
    np.testing.assert_array_equal(weight.numpy(), np.ones((64, 4), dtype=np.float32))


def test_load_missing_file(tmp_path):
    with pytest.raises(LoadError, match="does not exist") as info:
        load(tmp_path / "nope.onnx")
    assert info.value.hint


@pytest.mark.parametrize("payload", [b"just some text\nnot a model\n", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
                                     b""])
def test_load_not_onnx(tmp_path, payload):
    path = tmp_path / "bad.onnx"
    path.write_bytes(payload)
    with pytest.raises(LoadError, match="not a readable ONNX model"):
        load(path)


def test_load_truncated_real_model(tmp_path):
    from effc import zoo

    data = zoo.get("ppocr-cls").path().read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match="truncated"):
        load(path)


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../secret.bin"])
def test_load_rejects_external_data_escaping_folder(tmp_path, location):
    path = _with_external(tmp_path, location)
    with pytest.raises(LoadError, match="outside the model's folder") as info:
        load(path)
    assert location in str(info.value)


def test_load_missing_external_file(tmp_path):
    path = _with_external(tmp_path, "m.data")
    (path.parent / "m.data").unlink()
    with pytest.raises(LoadError, match="missing"):
        load(path)


def test_save_is_self_contained_and_round_trips(tmp_path):
    model = load(_with_external(tmp_path, "m.data"))
    out = tmp_path / "out" / "copy.onnx"
    save(model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["copy.onnx"]
    proto = onnx.load(out, load_external_data=False)
    assert not onnx.external_data_helper.uses_external_data(proto.graph.initializer[0])
    again = load(out)
    np.testing.assert_array_equal(again.graph.initializers["w"].const_value.numpy(), np.ones((64, 4), np.float32))
    assert len(sha256_file(out)) == 64
    assert sha256_file(out) != sha256_file(tmp_path / "model" / "m.onnx")


def test_io_signature():
    sig = io_signature(ir.from_proto(_tiny()))
    assert sig == {"inputs": [{"name": "x", "shape": ["N", 3], "dtype": "float32"}],
                   "outputs": [{"name": "y", "shape": ["N", 4], "dtype": "float32"}]}


def test_canonical_zoo_model_survives_save_and_load(zoo_models, tmp_path):
    from effc.ir.reference import Reference

    entry, _, canonical = zoo_models.get("silero-vad")
    save(canonical, tmp_path / "silero.onnx")
    again = load(tmp_path / "silero.onnx")
    assert io_signature(again) == io_signature(canonical)
    assert io_signature(again)["inputs"] == [{"name": "input", "shape": [1, 576], "dtype": "float32"},
                                             {"name": "state", "shape": [2, 1, 128], "dtype": "float32"}]
    feed = entry.samples("eval", 3)[2]
    for a, b in zip(Reference(canonical).run(feed), Reference(again).run(feed), strict=True):
        np.testing.assert_array_equal(a, b)
