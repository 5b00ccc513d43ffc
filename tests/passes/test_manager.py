"""Pass manager: records and timing, verify-each, IR dumps, and crash replay files."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.errors import CalibrationError, PassError, UnsupportedOpError
from effc.passes import EffcPass, PassManager, parse_pipeline


def chain_model() -> ir.Model:
    """x → Identity → Identity → Add c → Relu → y, plus one dead Neg node."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["i1"], name="id1"),
            helper.make_node("Identity", ["i1"], ["i2"], name="id2"),
            helper.make_node("Add", ["i2", "c"], ["a"], name="add"),
            helper.make_node("Neg", ["a"], ["dead"], name="dead"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ones((2, 3), np.float32), "c")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


class BoomPass(EffcPass):
    name = "boom"
    summary = "raises"

    def call(self, model):
        raise RuntimeError("kaboom")


class BreakTypesPass(EffcPass):
    """Adds an int64 initializer to a float Add: invalid ONNX that only the checker notices."""

    name = "break-types"
    summary = "makes the model invalid"

    def call(self, model):
        bad = ir.Value(name="bad", const_value=ir.tensor(np.ones((2, 3), np.int64), name="bad"))
        model.graph.register_initializer(bad)
        add = next(n for n in model.graph if n.op_type == "Add")
        add.replace_input_with(1, bad)
        return ir.passes.PassResult(model, modified=True)


class NeedsTwoInputsPass(EffcPass):
    name = "needs-two"
    summary = "precondition fails on one-input models"

    def requires(self, model):
        if len(model.graph.inputs) != 2:
            raise ValueError("expected two graph inputs")

    def call(self, model):  # pragma: no cover - precondition fails first
        return ir.passes.PassResult(model, modified=False)


def test_records_name_text_seconds_modified_stats_and_timing_log(caplog):
    model = chain_model()
    manager = PassManager("identity-elim,cse(size_limit=4),dce,dce")
    with caplog.at_level(logging.INFO, logger="effc.passes.manager"):
        result = manager.run(model)
    assert result.model is model and result.modified
    assert [r.name for r in result.records] == ["identity-elim", "cse", "dce", "dce"]
    assert [r.text for r in result.records] == ["identity-elim", "cse(size_limit=4)", "dce", "dce"]
    assert [r.modified for r in result.records] == [True, False, True, False]
    assert result.records[2].stats["nodes_removed"] == 1 and result.records[0].stats["nodes_removed"] == 2
    assert all(r.seconds >= 0 for r in result.records)
    assert [n.op_type for n in model.graph] == ["Add", "Relu"]
    timing = [m for m in caplog.messages if re.fullmatch(r"pass \S+: \d+\.\d{3} s, modified=(True|False)", m)]
    assert len(timing) == 4
    assert result.records[0].to_dict()["text"] == "identity-elim"


def test_stats_are_copies_not_shared_with_the_pass():
    pipeline = parse_pipeline("dce")
    result = PassManager(pipeline).run(chain_model())
    pipeline[0].stats["nodes_removed"] = 99
    assert result.records[0].stats["nodes_removed"] == 1


def test_dump_ir_writes_numbered_models(tmp_path):
    PassManager("identity-elim,dce", dump_ir=tmp_path / "ir").run(chain_model())
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00_input.onnx", "01_identity-elim.onnx", "02_dce.onnx"]
    counts = [len(onnx.load(str(tmp_path / "ir" / f)).graph.node) for f in files]
    assert counts == [5, 3, 2]


def test_verify_each_names_the_pass_that_broke_the_model():
    with pytest.raises(PassError) as info:
        PassManager([*parse_pipeline("dce"), BreakTypesPass()], verify_each=True, save_replay=False).run(chain_model())
    assert str(info.value).startswith("pass 'break-types' produced an invalid model (verify-each, after [dce])")
    # without verification the same pipeline "succeeds"
    result = PassManager([BreakTypesPass()]).run(chain_model())
    assert result.records[0].modified


def test_verify_each_passes_on_valid_passes_and_rejects_invalid_input():
    assert len(PassManager("cleanup", verify_each=True).run(chain_model()).records) == 1
    model = BreakTypesPass()(chain_model()).model
    with pytest.raises(PassError, match="input model is not valid ONNX before any pass"):
        PassManager("dce", verify_each=True).run(model)


def test_crash_becomes_pass_error_with_replay_files_in_a_temp_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system temp folder, as far as effc knows
    pipeline = [*parse_pipeline("identity-elim,dce"), BoomPass()]
    with pytest.raises(PassError) as info:
        PassManager(pipeline).run(chain_model())
    err = info.value
    assert err.message == "pass 'boom' failed after [identity-elim, dce]: RuntimeError: kaboom"
    assert isinstance(err.__cause__, RuntimeError)
    folder = Path(re.search(r"saved for replay in (\S+):", err.hint).group(1))
    assert folder.parent == tmp_path and folder.name.startswith("effc-replay-")
    assert (folder / "replay_pipeline.txt").read_text().strip() == "identity-elim,dce,boom"
    replay = onnx.load(str(folder / "replay_input.onnx"))
    assert len(replay.graph.node) == 5  # the pipeline's input, before identity-elim and dce ran


def test_crash_replay_goes_to_dump_dir(tmp_path):
    with pytest.raises(PassError) as info:
        PassManager([BoomPass()], dump_ir=tmp_path).run(chain_model())
    assert "failed (the first pass)" in info.value.message and str(tmp_path) in info.value.hint
    assert {"00_input.onnx", "replay_input.onnx", "replay_pipeline.txt"} <= {p.name for p in tmp_path.iterdir()}


def test_effc_error_from_a_pass_keeps_its_class_and_gets_context():
    with pytest.raises(CalibrationError) as info:
        PassManager("dce,prune(method=wanda,min_params=0)", save_replay=False).run(_matmul_model())
    err = info.value
    assert err.message.startswith("pass 'prune' failed after [dce]: prune(method=wanda) scores weights")
    assert "method=magnitude" in err.hint and str(err).startswith(err.message)


def test_precondition_failure_is_a_pass_error_with_its_cause():
    with pytest.raises(PassError,
                       match=r"pass 'needs-two' failed \(the first pass\): PreconditionError: .*expected two"):
        PassManager([NeedsTwoInputsPass()], save_replay=False).run(chain_model())


class NeedsCalibrationPass(EffcPass):
    name = "needs-cal"
    summary = "precondition raises an effc error"

    def requires(self, model):
        raise CalibrationError("needs-cal needs calibration data", "give --data")

    def call(self, model):  # pragma: no cover - precondition fails first
        return ir.passes.PassResult(model, modified=False)


def test_effc_error_in_precondition_is_unwrapped():
    with pytest.raises(CalibrationError) as info:
        PassManager([*parse_pipeline("dce"), NeedsCalibrationPass()], save_replay=False).run(chain_model())
    assert info.value.message == "pass 'needs-cal' failed after [dce]: needs-cal needs calibration data"
    assert info.value.hint == "give --data"


class UnsupportedPass(EffcPass):
    name = "unsupported"
    summary = "raises an error subclass with its own constructor"

    def call(self, model):
        raise UnsupportedOpError({"Foo": ["n1", "n2"]}, where="pass 'unsupported'")


def test_effc_error_with_custom_constructor_keeps_its_fields():
    with pytest.raises(UnsupportedOpError) as info:
        PassManager([UnsupportedPass()], save_replay=False).run(chain_model())
    err = info.value
    assert err.ops == {"Foo": ["n1", "n2"]}
    assert err.message.startswith(
        "pass 'unsupported' failed (the first pass): 1 operator type(s) not supported by pass")
    assert str(err).endswith("fix: rewrite or remove these nodes before compiling, or open an issue with the model "
                             "attached")


def test_user_error_inside_a_pass_saves_no_replay_files(tmp_path, monkeypatch):
    """An EffcError is anticipated and carries its own fix: no effc-replay-* folder (those are for crashes)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(CalibrationError) as info:
        PassManager("dce,prune(method=wanda,min_params=0)").run(_matmul_model())
    assert "replay" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def _matmul_model() -> ir.Model:
    w = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(w, "w")],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
