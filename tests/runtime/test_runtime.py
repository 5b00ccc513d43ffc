"""effc.runtime: manifest hashing, tamper detection before loading, feed validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import effc.runtime
from effc.errors import ArtifactError, DataError
from effc.runtime.manifest import read_manifest, sha256_of, verify_files, write_manifest
from tests.runtime.helpers import build_artifact, mlp, ort_run, random_feeds


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    return build_artifact(mlp(), tmp_path_factory.mktemp("mlp") / "out", {"threads": 1})


def _copy(src, dst):
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).write_bytes(item.read_bytes())
    return dst


def test_manifest_round_trip_hashes_listed_files(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("x")
    write_manifest(tmp_path, {"effc_version": "1", "target": {"name": "cpu"}}, ["a.bin", "sub/b.txt"])
    manifest = read_manifest(tmp_path)
    assert manifest["effc_version"] == "1"
    assert manifest["files"] == {
        "a.bin": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",  # sha256("abc")
        "sub/b.txt": sha256_of(tmp_path / "sub" / "b.txt"),
    }
    verify_files(tmp_path, manifest)  # unchanged: passes
    (tmp_path / "sub" / "b.txt").write_text("y")
    with pytest.raises(ArtifactError, match=r"'sub/b.txt'.*modified.*fix: recompile"):
        verify_files(tmp_path, manifest)


def test_write_manifest_rejects_missing_and_escaping_files(tmp_path):
    with pytest.raises(ArtifactError, match="missing"):
        write_manifest(tmp_path, {}, ["nope.so"])
    with pytest.raises(ArtifactError, match="outside"):
        write_manifest(tmp_path, {}, ["../x"])


def test_read_manifest_errors(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json.*fix"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON.*fix: recompile"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="JSON object"):
        read_manifest(tmp_path)


def test_load_runs_and_exposes_signature(mlp_artifact):
    compiled = effc.runtime.load(mlp_artifact)
    assert compiled.inputs == [{"name": "x", "shape": [2, 16], "dtype": "float32"}]
    assert compiled.outputs[0]["name"] == "y"
    feeds = random_feeds(mlp(), 5)
    np.testing.assert_allclose(compiled.run(feeds)[0], ort_run(mlp(), feeds)[0], atol=1e-5, rtol=1e-5)
    # float64 data is converted to the compiled float32
    np.testing.assert_allclose(compiled.run({"x": feeds["x"].astype(np.float64)})[0], ort_run(mlp(), feeds)[0],
                               atol=1e-5, rtol=1e-5)


def test_tampered_library_is_rejected_before_loading(mlp_artifact, tmp_path, monkeypatch):
    out = _copy(mlp_artifact, tmp_path / "copy")
    data = bytearray((out / "model.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "model.so").write_bytes(bytes(data))
    loaded = []
    monkeypatch.setattr("effc.codegen.build.load_vm", lambda *a: loaded.append(a))
    with pytest.raises(ArtifactError, match=r"'model.so'.*sha256.*fix: recompile"):
        effc.runtime.load(out)
    assert loaded == []


def test_missing_library_is_an_artifact_error(mlp_artifact, tmp_path):
    out = _copy(mlp_artifact, tmp_path / "copy")
    (out / "model.so").unlink()
    with pytest.raises(ArtifactError, match="'model.so' is missing"):
        effc.runtime.load(out)


def test_library_dropped_from_manifest_is_not_loaded(mlp_artifact, tmp_path, monkeypatch):
    # removing model.so's entry used to skip its hash check and load whatever library lay there
    out = _copy(mlp_artifact, tmp_path / "copy")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["model.so"]
    (out / "extra.txt").write_text("listed")
    manifest["files"]["extra.txt"] = sha256_of(out / "extra.txt")
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "model.so").write_bytes(b"not the compiled library")
    loaded = []
    monkeypatch.setattr("effc.codegen.build.load_vm", lambda *a: loaded.append(a))
    with pytest.raises(ArtifactError, match="model.so is not listed"):
        effc.runtime.load(out)
    assert loaded == []


def test_manifest_without_target_is_an_artifact_error(mlp_artifact, tmp_path):
    out = _copy(mlp_artifact, tmp_path / "copy")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["target"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="names no target"):
        effc.runtime.load(out)


def test_bad_feeds_raise_data_error(mlp_artifact):
    compiled = effc.runtime.load(mlp_artifact)
    with pytest.raises(DataError, match=r"input 'x' has shape \[1, 16\].*expects \[2, 16\].*x=2x16"):
        compiled.run({"x": np.zeros((1, 16), np.float32)})
    with pytest.raises(DataError, match=r"missing \['x'\].*unknown \['z'\]"):
        compiled.run({"z": np.zeros((2, 16), np.float32)})
    with pytest.raises(DataError, match="dtype int64.*float32"):
        compiled.run({"x": np.zeros((2, 16), np.int64)})


def test_token_ids_outside_the_embedding_table_raise_instead_of_reading_out_of_bounds(tmp_path):
    """Gather indices are checked against the table's rows (TVM's fast-mode take would read out of bounds)."""
    from onnx import TensorProto, helper

    from tests.runtime.helpers import _model

    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    model = _model([helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4])], {"table": table})
    loaded = effc.runtime.load(build_artifact(model, tmp_path / "a"))
    assert [(c["op"], c["node"], c["low"], c["high"]) for c in loaded.inputs[0]["index_checks"]] == [
        ("Gather", "embed", [-10], [10])]
    ids = np.array([[0, 9, -3]], dtype=np.int64)  # negative ids count from the end (ONNX Gather)
    np.testing.assert_array_equal(loaded.run({"ids": ids})[0], table[ids])
    for bad in (10, -11, 10**12):
        with pytest.raises(DataError, match=rf"input 'ids' holds {bad} at \[0, 1\], outside the valid range -10\.\.9: "
                           r"it is an index of Gather 'embed' into axis 0 of size 10"):
            loaded.run({"ids": np.array([[0, bad, 3]], dtype=np.int64)})


def test_kernel_profile_counts_every_kernel_call_per_inference(mlp_artifact):
    import tvm

    from effc.codegen import build

    vm = build.load_vm(mlp_artifact / "model.so", tvm.cpu())
    x = build.to_tvm_tensor(np.ones((2, 16), np.float32), tvm.cpu())
    kernels = build.kernel_profile(vm, [x], reps=3)
    assert kernels and all(k["ms"] >= 0 and k["calls"] >= 1 for k in kernels)
    assert [k["ms"] for k in kernels] == sorted((k["ms"] for k in kernels), reverse=True)
    assert any(k["name"].startswith("fused_") or "matmul" in k["name"] for k in kernels)
