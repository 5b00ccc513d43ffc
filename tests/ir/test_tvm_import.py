"""Every canonicalized zoo model imports into TVM's Relax ONNX frontend (effc.ir itself never imports TVM)."""

import onnx_ir as ir
import pytest

from effc import zoo

tvm = pytest.importorskip("tvm")


@pytest.mark.parametrize("name", [n for n in zoo.names() if not zoo.get(n).is_decoder])  # decoders: tests/decoder
def test_canonical_zoo_model_imports_into_tvm(zoo_models, name):
    from tvm.relax.frontend.onnx import from_onnx

    _, _, canonical = zoo_models.get(name)
    mod = from_onnx(ir.to_proto(canonical), keep_params_in_input=False)
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]


def test_effc_ir_does_not_import_tvm():
    import subprocess
    import sys

    code = ("import sys, effc.ir.model, effc.ir.canonicalize, effc.ir.reference, effc.ir.calibration, effc.ir.data, "
            "effc.ir.queries, effc.ir.capture, effc.zoo; print('tvm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
