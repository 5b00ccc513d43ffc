"""PP-OCR mobile text-direction classifier (zoo:ppocr-cls) with int8 weights on Cortex-M7 (2 MB flash), in QEMU.

Slow (lowering 53 convolutions takes minutes on a loaded machine): marked ``slow``. The same C is then run on the
M4F and M3 boards by re-labelling the artifact (the C does not depend on the core; only the flags do).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from effc.targets import get_target
from effc.targets.cortex_m import firmware
from effc.targets.cortex_m.verify import reference_session, verify_artifact

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not firmware.have_toolchain(), reason="arm-none-eabi-gcc/qemu-system-arm missing"),
]


def _digits():
    spec = importlib.util.spec_from_file_location("digits_mcu", ROOT / "examples" / "digits_mcu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ppocr(quantize, tmp_path):
    """Quantize PP-OCR cls, build the M7 artifact (2 MB flash/RAM) and write its model and manifest."""
    from effc import zoo
    from effc.ir.canonicalize import canonicalize
    from effc.runtime.manifest import write_manifest

    entry = zoo.get("ppocr-cls")
    model = quantize(canonicalize(ir.load(str(entry.path())), input_shapes=entry.input_shapes), entry)
    out = tmp_path / "m7"
    out.mkdir()
    options = {"flash": "2M", "ram": "2M"}
    result = get_target("cortex-m7").build(model, out, options)
    ir.save(model, out / "model.onnx")
    io = {
        "inputs": [{"name": "x", "shape": [1, 3, 48, 192], "dtype": "float32"}],
        "outputs": [
            {"name": v.name, "shape": [int(d) for d in v.shape.numpy()], "dtype": "float32"}
            for v in model.graph.outputs
        ],  # fmt: skip
    }
    manifest = {"target": {"name": "cortex-m7", "options": options, "info": result.info}, **io}
    write_manifest(out, manifest)
    return entry, out, manifest, result.info


def _check_cores(entry, out, manifest, tmp_path, cores):
    """Verify the M7 artifact on each core (same C, relabelled) and compare the class with onnxruntime."""
    from effc.runtime.manifest import write_manifest

    feeds = entry.samples("eval", 2)
    session = reference_session(out / "model.onnx")
    for core in cores:
        art = out if core == "cortex-m7" else tmp_path / core
        if core != "cortex-m7":
            shutil.copytree(out, art)
            write_manifest(art, {**manifest, "target": {**manifest["target"], "name": core}})
        check = verify_artifact(art, feeds_list=feeds[:1] if core == "cortex-m3" else feeds)
        assert check.ok, check.summary()
        for f, got in zip(feeds, check.outputs, strict=False):
            assert int(session.run(None, f)[0].argmax()) == int(got[0].argmax())
    return check


def test_ppocr_cls_int8_on_m7_m4_m3(tmp_path):
    entry, out, manifest, info = _ppocr(lambda m, _: _digits().int8_weights(m), tmp_path)
    conv_weights = sum(int(np.prod(w["shape"])) for w in info["weights"] if w["dtype"] == "int8")
    assert conv_weights > 100_000  # every conv/matmul weight stayed int8 in flash
    assert info["flash"]["total_bytes"] < 2 * 1024 * 1024
    check = _check_cores(entry, out, manifest, tmp_path, ("cortex-m7", "cortex-m4", "cortex-m3"))
    json.dumps(check.to_dict())


def test_ppocr_cls_int8_activations_on_m7_m4(tmp_path):
    """Static int8 QDQ (onnxruntime ``quantize_static``, 16 calibration images): dense and depthwise convs run on
    effc's int8 kernels; the firmware matches onnxruntime within one quantization step, same class."""
    entry, out, manifest, info = _ppocr(lambda m, e: _digits().int8_static(m, e.samples("calibration", 16)), tmp_path)
    calls = {"effc-s8-dsp": 0, "effc-s8-c": 0}
    for k in info["kernels"]:
        if k["schedule"] in calls:
            calls[k["schedule"]] += k["calls"]
    assert calls == {"effc-s8-dsp": 43, "effc-s8-c": 11}  # 42 dense convs + the Gemm (DSP), 11 depthwise convs
    _check_cores(entry, out, manifest, tmp_path, ("cortex-m7", "cortex-m4"))
