"""Handwritten digits on a Cortex-M: train an MLP and a small CNN on sklearn's digits (8x8), compile to C, run in QEMU.

Run: ``python examples/digits_mcu.py [--target cortex-m4] [--int8 | --int8-act]``. Needs arm-none-eabi-gcc and
qemu-system-arm. The models are built directly as ONNX from the trained weights (batch 1, input ``pixels``, output
``logits``); ``--int8`` stores the weights as int8 with per-output-channel scales behind ``DequantizeLinear`` (QDQ,
fp32 activations); ``--int8-act`` quantizes weights and activations statically with onnxruntime (QDQ), which effc
lowers to its int8 micro-kernels.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def digits_split(seed: int = 0):
    """``(x_train, x_test, y_train, y_test)``: sklearn digits scaled to [0, 1], float32, 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    return train_test_split(x, data.target, test_size=0.2, random_state=seed, stratify=data.target)


def _model(nodes, inits, in_shape, name) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def _fit(net, x, y, epochs: int, lr: float) -> dict[str, np.ndarray]:
    """Full-batch Adam on one thread (deterministic, a few seconds); returns the float32 state dict."""
    import torch

    torch.set_num_threads(1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(np.asarray(y, dtype=np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    return {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}


def train_mlp(x_train, y_train, hidden: int = 32, seed: int = 0, epochs: int = 150) -> ir.Model:
    """A 64 -> hidden -> 10 ReLU MLP (torch, full batch) as ONNX: pixels (1, 64) -> logits (1, 10)."""
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))
    p = _fit(net, x_train, y_train, epochs, lr=0.01)
    nodes = [
        helper.make_node("MatMul", ["pixels", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["o"]),
        helper.make_node("Add", ["o", "b2"], ["logits"]),
    ]
    inits = {"w1": p["0.weight"].T, "b1": p["0.bias"], "w2": p["2.weight"].T, "b2": p["2.bias"]}
    return _model(nodes, inits, [1, 64], "digits_mlp")


def train_cnn(x_train, y_train, seed: int = 0, epochs: int = 30) -> ir.Model:
    """Conv(1->8,3x3)-ReLU-MaxPool-Conv(8->16,3x3)-ReLU-MaxPool-Gemm(64->10) (torch, full batch).

    ONNX: pixels (1, 1, 8, 8) -> logits (1, 10).
    """
    import torch

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64, 10),
    )  # fmt: skip
    p = _fit(net, x_train.reshape(-1, 1, 8, 8), y_train, epochs, lr=0.02)
    inits = {"c1w": p["0.weight"], "c1b": p["0.bias"], "c2w": p["3.weight"], "c2b": p["3.bias"],
             "fw": p["7.weight"], "fb": p["7.bias"], "shape": np.array([1, 64], dtype=np.int64)}  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["pixels", "c1w", "c1b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2w", "c2b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p2", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], transB=1),
    ]
    return _model(nodes, inits, [1, 1, 8, 8], "digits_cnn")


def int8_weights(model: ir.Model) -> ir.Model:
    """Weight-only int8 QDQ: every MatMul/Conv/Gemm weight becomes ``DequantizeLinear(int8, scale[, axis])``.

    Symmetric, per output channel (axis 0 for Conv/Gemm-transB, axis 1 for MatMul; per tensor below opset 13, which
    has no ``axis``), zero point 0; activations stay float32. The rewritten model runs in onnxruntime unchanged (it
    is the reference).
    """
    proto = ir.to_proto(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    per_channel = opset >= 13  # DequantizeLinear's axis attribute exists from opset 13; per-tensor before
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    new_inits, nodes = [], []
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Conv", "Gemm") and node.input[1] in inits:
            w = inits[node.input[1]]
            axis = 1 if node.op_type == "MatMul" else 0
            red = tuple(i for i in range(w.ndim) if i != axis or not per_channel)
            scale = np.atleast_1d(np.abs(w).max(axis=red) / 127.0).astype(np.float32)
            scale[scale == 0] = 1.0
            shape = [1] * w.ndim
            if per_channel:
                shape[axis] = -1
            else:
                scale = scale.reshape(())
            q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            base = node.input[1]
            new_inits += [numpy_helper.from_array(q, base + "_q"), numpy_helper.from_array(scale, base + "_s")]
            attrs = {"axis": axis} if per_channel else {}
            nodes.append(helper.make_node("DequantizeLinear", [base + "_q", base + "_s"], [base + "_dq"], **attrs))
            node.input[1] = base + "_dq"
        nodes.append(node)
    used = {i for n in nodes for i in n.input}
    keep = [t for t in proto.graph.initializer if t.name in used] + new_inits
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def int8_static(model: ir.Model, calibration: np.ndarray | list[dict[str, np.ndarray]]) -> ir.Model:
    """Full int8 (weights and activations) in onnxruntime's QDQ format, static scales from calibration samples.

    ``onnxruntime.quantization.quant_pre_process`` (shape inference, MatMul+Add -> Gemm) then ``quantize_static``:
    int8 activations with per-tensor scales and zero points (min/max calibration over ``calibration``, rows of
    pixels), symmetric per-output-channel int8 weights, int32 biases at scale ``sx * sw``. A ReLU whose output is
    quantized with its zero point at the range minimum is dropped by the quantizer (the clamp of QuantizeLinear
    does it). The result runs in onnxruntime (it is the reference) and effc lowers each
    ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` to an int8 micro-kernel.

    Args:
        model: fp32 model (opset below 13 is upgraded to 13: per-channel ``DequantizeLinear`` needs ``axis``).
        calibration: feed dicts, or float32 samples of the single input, shape (S, features), each reshaped to the
            model's input shape.

    Returns:
        The QDQ model.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    first = model.graph.inputs[0]
    shape = [int(d) for d in first.shape.numpy()]
    feeds = calibration if isinstance(calibration, list) else [{first.name: x.reshape(shape)} for x in calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.samples = iter(feeds)

        def get_next(self):
            return next(self.samples, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = (str(Path(tmp) / n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        proto = ir.to_proto(model)
        if next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), OPSET) < 13:
            proto = onnx.version_converter.convert_version(proto, 13)
        onnx.save(proto, src)
        quant_pre_process(src, pre)
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})  # fmt: skip
        return ir.load(dst)


def int8_layer(
    op: str, x_shape: list[int], n: int, kernel: int = 3, seed: int = 0, depthwise: bool = False
) -> ir.Model:
    """One int8 QDQ layer with int8 input and output: ``xq -> DQ -> Conv|Gemm(DQ W, DQ b) -> Relu -> Q -> yq``.

    For measuring the int8 micro-kernel alone (instructions per MAC): no float at either end. Random int8 weights
    (per-channel scales), int32 bias at scale ``sx * sw``; the output scale spans about 4 standard deviations
    of the accumulator so few outputs saturate.

    Args:
        op: ``"Conv"`` (x (1, C, H, W), 3x3-style kernel, padding kernel//2) or ``"Gemm"`` (x (M, K), transB=1).
        x_shape: input shape.
        n: output channels / features.
        kernel: conv kernel size.
        seed: random seed.
        depthwise: conv with ``group = channels`` (``n`` must equal the input channels).

    Returns:
        The model (input ``xq`` int8, output ``yq`` int8).
    """
    rng = np.random.default_rng(seed)
    cin = 1 if depthwise else x_shape[1]
    k = cin * kernel * kernel if op == "Conv" else x_shape[1]
    w_shape = [n, cin, kernel, kernel] if op == "Conv" else [n, k]
    wq = rng.integers(-127, 128, size=w_shape, dtype=np.int8)
    sx, sw = np.float32(0.02), (rng.uniform(0.5, 1.5, n) * 0.01).astype(np.float32)
    bq = rng.integers(-2000, 2000, size=n, dtype=np.int32)
    sy = np.float32(4 * 74 * 74 * np.sqrt(k) * sx * sw.mean() / 127)
    inits = {"sx": sx, "zx": np.int8(-3), "wq": wq, "sw": sw, "bq": bq, "sb": (sx * sw).astype(np.float32),
             "sy": sy, "zy": np.int8(-128)}  # fmt: skip
    attrs = {"pads": [kernel // 2] * 4, "group": n if depthwise else 1} if op == "Conv" else {"transB": 1}
    nodes = [
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["x"]),
        helper.make_node("DequantizeLinear", ["wq", "sw"], ["w"], axis=0),
        helper.make_node("DequantizeLinear", ["bq", "sb"], ["b"], axis=0),
        helper.make_node(op, ["x", "w", "b"], ["y"], **attrs),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"]),
    ]
    out_shape = [1, n, x_shape[2], x_shape[3]] if op == "Conv" else [x_shape[0], n]
    graph = helper.make_graph(
        nodes,
        f"int8_{op.lower()}",
        [helper.make_tensor_value_info("xq", TensorProto.INT8, x_shape)],
        [helper.make_tensor_value_info("yq", TensorProto.INT8, out_shape)],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", default="cortex-m4")
    parser.add_argument("--int8", action="store_true", help="weight-only int8")
    parser.add_argument("--int8-act", action="store_true", help="int8 weights and activations (static QDQ)")
    parser.add_argument("--samples", type=int, default=360)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("digits_mcu")

    from effc.runtime.manifest import write_manifest
    from effc.targets import get_target
    from effc.targets.cortex_m.verify import reference_session, verify_artifact

    x_train, x_test, y_train, y_test = digits_split()
    for kind, model in (("mlp", train_mlp(x_train, y_train)), ("cnn", train_cnn(x_train, y_train))):
        if args.int8:
            model = int8_weights(model)
        elif args.int8_act:
            model = int8_static(model, x_train[:200])
        shape = (1, 64) if kind == "mlp" else (1, 1, 8, 8)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            result = get_target(args.target).build(model, out, {})
            ir.save(model, out / "model.onnx")
            io = [{"name": "pixels", "shape": list(shape), "dtype": "float32"}]
            write_manifest(out, {"target": {"name": args.target, "options": {}, "info": result.info}, "inputs": io,
                                 "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]})  # fmt: skip
            feeds = [{"pixels": x.reshape(shape)} for x in x_test[: args.samples]]
            check = verify_artifact(out, feeds_list=feeds)  # QDQ logits: within one quantization step
            sess = reference_session(out / "model.onnx")
            ort_pred = np.array([sess.run(None, f)[0].argmax() for f in feeds])
            fw_pred = np.array([o[0].argmax() for o in check.outputs])
            y = y_test[: len(feeds)]
            variant = "int8" if args.int8 else "int8 activations" if args.int8_act else "fp32"
            log.info("%s %s: %s", kind, variant, check.summary())
            log.info("  accuracy onnxruntime %.4f, firmware %.4f", (ort_pred == y).mean(), (fw_pred == y).mean())


if __name__ == "__main__":
    main()
