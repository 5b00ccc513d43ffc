"""Files the CLI cannot write or read, and sizes that cannot fit, end in one clean line, never "internal error"."""

from __future__ import annotations

import tempfile
import zipfile

import onnx_ir as ir
import pytest
from click.testing import CliRunner

from effc.cli import INTERNAL_ERROR_EXIT, cli
from effc.errors import ShapeError
from effc.ir.data import check_input_sizes
from effc.ir.model import load
from tests.conftest import make_mlp


def _run(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def _one_line_error(result, needle):
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error: ") and needle in text and "internal error" not in text
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    make_mlp(root / "mlp.onnx")
    assert _run("compile", root / "mlp.onnx", "-o", root / "out", "--no-latency", "--eval-samples", "1").exit_code == 0
    return root / "out"


def test_dump_ir_where_nothing_can_be_written(tmp_path, mlp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    result = _run("compile", mlp_path, "-o", out, "--dump-ir", blocker / "ir", "--no-latency")
    _one_line_error(result, f"cannot write the --dump-ir model {blocker / 'ir' / '00_input.onnx'}: Not a directory")
    assert not out.exists()


def test_run_output_where_nothing_can_be_written(tmp_path, artifact):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = _run("run", artifact, "-o", blocker / "out.npz")
    _one_line_error(result, f"cannot write the outputs to {blocker / 'out.npz'}: {tmp_path / 'a_file'} is a file")
    missing = tmp_path / "nowhere" / "out.npz"
    _one_line_error(_run("run", artifact, "-o", missing), f"folder {missing.parent} does not exist")


def test_npz_member_that_is_not_npy(tmp_path, artifact):
    data = tmp_path / "odd.npz"
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("x.npy", "plain text, not the .npy format")
    _one_line_error(_run("run", artifact, "--data", data),
                    f"member 'x' of data file '{data}' is not a .npy array (31 bytes without the .npy header)")


def test_input_shape_larger_than_memory_is_refused_before_any_sample(tmp_path):
    model_path = tmp_path / "dyn.onnx"
    make_mlp(model_path, dynamic_batch=True)
    result = _run("compile", model_path, "-o", tmp_path / "out", "--input-shape", "x=1000000000000x16")
    _one_line_error(result, "input 'x' of shape 1000000000000x16 takes 6.4e+04 GB per sample (float32), more "
                            "than this machine's")
    model = load(model_path)
    model.graph.inputs[0].shape = ir.Shape([1000, 16])
    check_input_sizes(model, memory_bytes=64000)  # 64000 bytes: fits exactly
    with pytest.raises(ShapeError, match=r"takes 6\.4e-05 GB per sample"):
        check_input_sizes(model, memory_bytes=63999)


def test_memory_error_is_a_clean_error(tmp_path, mlp_path, monkeypatch):
    import effc.compiler

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.16 TiB for an array")

    monkeypatch.setattr(effc.compiler, "compile_model", exhausted)
    result = CliRunner().invoke(cli, ["compile", str(mlp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code not in (0, INTERNAL_ERROR_EXIT)
    _one_line_error(result, "out of memory: Unable to allocate 1.16 TiB")


def test_user_error_inside_a_pass_leaves_no_replay_folder(tmp_path, monkeypatch):
    """`reconstruct=model` on a conv net is a user error: one line, no effc-replay-* in the temp folder."""
    from effc.ir.model import save
    from tests.runtime.helpers import conv_pool

    save(conv_pool(), tmp_path / "conv.onnx")
    temp = tmp_path / "systemp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    result = _run("compile", tmp_path / "conv.onnx", "-o", tmp_path / "out", "--no-latency",
                  "--passes", "prune(sparsity=0.5,min_params=0,reconstruct=model)")
    _one_line_error(result, "reconstruct=model evaluates the graph in torch, which lacks op(s) Conv")
    assert list(temp.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv.onnx", "systemp"]
