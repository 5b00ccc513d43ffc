"""effc vs onnxruntime on single conv nodes taken from the zoo's slowest kernels (PP-OCR det/rec, Magika).

    python benchmarks/conv_kernels.py                         # every shape, 1 thread, 30 runs
    python benchmarks/conv_kernels.py --threads 2 --shapes det_c38 magika

Each shape is one ONNX node (``Conv`` or ``ConvTranspose`` with constant weight and bias, optionally followed by
the activation the zoo model fuses into it), compiled by ``effc.codegen.cpu.compile_cpu`` (templates + fast-math,
the conv rewrites included) and run by onnxruntime in the same process, interleaved run by run. With 1 thread
both are timed with the thread's CPU clock (``time.thread_time``), which a busy shared machine disturbs far less
than wall time; with more threads, wall time. Prints min and median ms, their ratio, max abs diff and compile s.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# (op, input NCHW, weight, strides, pads, group, activation): the zoo layers behind the top kernels of
# docs/BENCHMARKS.md "CPU codegen".
SHAPES: dict[str, tuple] = {
    "det_c38": ("Conv", (1, 96, 80, 80), (24, 96, 3, 3), (1, 1), (1, 1, 1, 1), 1, None),
    "det_c_40": ("Conv", (1, 96, 40, 40), (24, 96, 3, 3), (1, 1), (1, 1, 1, 1), 1, None),
    "det_stem": ("Conv", (1, 3, 320, 320), (16, 3, 3, 3), (2, 2), (1, 1, 1, 1), 1, "HardSwish"),
    "det_convT_k2_c1": ("ConvTranspose", (1, 24, 160, 160), (24, 1, 2, 2), (2, 2), (0, 0, 0, 0), 1, "Sigmoid"),
    "det_convT_k2_c24": ("ConvTranspose", (1, 24, 80, 80), (24, 24, 2, 2), (2, 2), (0, 0, 0, 0), 1, None),
    "det_pw_192_20x20": ("Conv", (1, 192, 20, 20), (192, 192, 1, 1), (1, 1), (0, 0, 0, 0), 1, "HardSwish"),
    "det_pw_384_10x10": ("Conv", (1, 384, 10, 10), (384, 384, 1, 1), (1, 1), (0, 0, 0, 0), 1, "HardSwish"),
    "det_pw_16_160x160": ("Conv", (1, 16, 160, 160), (32, 16, 1, 1), (1, 1), (0, 0, 0, 0), 1, "HardSwish"),
    "det_dw5_192": ("Conv", (1, 192, 20, 20), (192, 1, 5, 5), (1, 1), (2, 2, 2, 2), 192, "HardSwish"),
    "rec_pw_240": ("Conv", (1, 240, 12, 80), (240, 240, 1, 1), (1, 1), (0, 0, 0, 0), 1, "HardSwish"),
    "rec_pw_480": ("Conv", (1, 480, 6, 80), (480, 480, 1, 1), (1, 1), (0, 0, 0, 0), 1, "HardSwish"),
    "rec_dw5_240": ("Conv", (1, 240, 12, 80), (240, 1, 5, 5), (1, 1), (2, 2, 2, 2), 240, "HardSwish"),
    "rec_1x3_960": ("Conv", (1, 960, 1, 40), (60, 960, 1, 3), (1, 1), (0, 1, 0, 1), 1, None),
    "magika": ("Conv", (1, 256, 512, 1), (512, 256, 5, 1), (1, 1), (0, 0, 0, 0), 1, None),
}


def make_model(op: str, x_shape, w_shape, strides, pads, group: int, act: str | None):
    """One ``op`` node with constant weight/bias (seeded), plus ``act`` when given; opset 17."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal(w_shape) * 0.1).astype(np.float32)
    cout = w_shape[0] if op == "Conv" else w_shape[1] * group
    bias = rng.standard_normal(cout).astype(np.float32)
    nodes = [helper.make_node(op, ["x", "w", "b"], ["y0" if act else "y"], strides=list(strides), pads=list(pads),
                              group=group)]
    if act:
        nodes.append(helper.make_node(act, ["y0"], ["y"]))
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def run_shape(name: str, threads: int, runs: int) -> dict:
    """Compile and time one shape; returns min/median ms of both runtimes, max abs diff and compile seconds."""
    import onnx_ir as ir
    import onnxruntime as ort
    import tvm

    from effc.codegen.cpu import compile_cpu
    from effc.codegen.frontend import to_relax

    op, x_shape, w_shape, strides, pads, group, act = SHAPES[name]
    model = make_model(op, x_shape, w_shape, strides, pads, group, act)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    expected = sess.run(None, {"x": x})[0]
    target = tvm.target.Target({"kind": "llvm", "mcpu": str(tvm.target.codegen.llvm_get_system_cpu()),
                                "num-cores": threads})
    start = time.perf_counter()
    executable, _ = compile_cpu(to_relax(ir.from_proto(model)), target, {"fast_math": True})
    compile_s = time.perf_counter() - start
    vm = tvm.relax.VirtualMachine(executable, tvm.cpu())
    xt = tvm.runtime.tensor(x)
    got = vm["main"](xt)
    got = got.numpy() if hasattr(got, "numpy") else got[0].numpy()
    clock = time.thread_time if threads == 1 else time.perf_counter
    effc_ms, ort_ms = [], []
    for _ in range(3):
        vm["main"](xt)
        sess.run(None, {"x": x})
    for _ in range(runs):
        t = clock()
        vm["main"](xt)
        effc_ms.append((clock() - t) * 1e3)
        t = clock()
        sess.run(None, {"x": x})
        ort_ms.append((clock() - t) * 1e3)
    return {
        "effc": (min(effc_ms), float(np.median(effc_ms))),
        "ort": (min(ort_ms), float(np.median(ort_ms))),
        "max_abs_diff": float(np.abs(got - expected).max()),
        "compile_s": compile_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read by TVM's thread pool at its first use
    print(f"threads {args.threads}, {args.runs} interleaved runs, load average {os.getloadavg()[0]:.1f}")
    print("| shape | effc ms min (med) | ORT ms min (med) | ratio min (med) | max abs diff | compile s |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes:
        r = run_shape(name, args.threads, args.runs)
        (e_min, e_med), (o_min, o_med) = r["effc"], r["ort"]
        print(f"| {name} | {e_min:.3f} ({e_med:.3f}) | {o_min:.3f} ({o_med:.3f}) | {e_min / o_min:.2f} "
              f"({e_med / o_med:.2f}) | {r['max_abs_diff']:.1e} | {r['compile_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
