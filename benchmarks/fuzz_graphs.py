"""Graph fuzzing: random small ONNX graphs of ops effc supports, compiled for cpu and checked against onnxruntime.

    nice -n 10 python benchmarks/fuzz_graphs.py --examples 300          # the long mode (minutes)
    python benchmarks/fuzz_graphs.py --examples 20 --seed 7

Each example is a chain of 1-5 ops (element-wise unary and binary ops, Clip, reductions, ArgMax/ArgMin and
Softmax over the last axis, a float -> int64 Cast; integer results are cast back to float32) on two float32
inputs of one random static shape (0-sized dims included), fed with values drawn to include ±0, subnormals, ±inf
and NaN. ``effc.compile`` runs its agreement gate on exactly those feeds, so an example fails
when the compile raises :class:`effc.errors.MismatchError` (a wrong answer: dtype, shape, NaN/inf placement or
values) or any exception that is not an :class:`effc.errors.EffcError` (a raw crash). A clean refusal passes.
The test suite runs a bounded number of examples (``tests/codegen/test_fuzz_graphs.py``); hypothesis prints the
falsifying graph, and the seeds that found bugs become regression tests there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UNARY = ("Relu", "Abs", "Neg", "Sigmoid", "Tanh", "Exp", "Floor", "Ceil", "Sqrt", "Reciprocal", "Softmax",
         "Clip", "HardSigmoid", "Elu", "Selu", "Sign", "Erf", "ThresholdedRelu", "LeakyRelu")
BINARY = ("Add", "Sub", "Mul", "Div", "Max", "Min")
REDUCE = ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean")
#: Steps with an int64 result, cast back to float32: arg-reductions over the last axis, a float → int64 cast.
TO_INT = ("ArgMax", "ArgMin", "CastInt64")

SPECIAL = (0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38, -3.4e38, 1.0, -1.0)


@st.composite
def graphs(draw: Any, allow_empty: bool = True) -> tuple[Any, dict[str, np.ndarray]]:
    """A random ``(onnx.ModelProto, feeds)``: inputs ``x``, ``y`` of one static shape, a chain of ops, output ``z``."""
    import onnx
    from onnx import TensorProto, helper

    rank = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(0 if allow_empty else 1, 4), min_size=rank, max_size=rank))
    steps = draw(st.lists(st.sampled_from(UNARY + BINARY + REDUCE + TO_INT), min_size=1, max_size=5))
    nodes, current = [], "x"
    for k, op in enumerate(steps):
        out = f"t{k}"
        if op in TO_INT:
            node = (helper.make_node("Cast", [current], [f"i{k}"], to=TensorProto.INT64) if op == "CastInt64" else
                    helper.make_node(op, [current], [f"i{k}"], axis=-1, keepdims=1,
                                     select_last_index=draw(st.integers(0, 1))))
            nodes += [node, helper.make_node("Cast", [f"i{k}"], [out], to=TensorProto.FLOAT)]
        elif op == "Clip":
            bounds = [helper.make_tensor(f"{b}{k}", TensorProto.FLOAT, [], [v]) for b, v in (("lo", -1.0), ("hi", 2.0))]
            nodes += [helper.make_node("Constant", [], [t.name], value=t) for t in bounds]
            present = draw(st.sampled_from([(1, 1), (1, 0), (0, 1)]))  # a missing bound is the type's extreme
            names = [t.name if p else "" for t, p in zip(bounds, present, strict=True)]
            nodes.append(helper.make_node(op, [current, *names], [out], name=f"n{k}_{op}"))
        elif op in BINARY:
            nodes.append(helper.make_node(op, [current, "y"], [out], name=f"n{k}_{op}"))
        elif op in REDUCE:
            axes = helper.make_tensor(f"axes{k}", TensorProto.INT64, [1], [-1])
            nodes.append(helper.make_node("Constant", [], [f"axes{k}"], value=axes))
            nodes.append(helper.make_node(op, [current, f"axes{k}"], [out], name=f"n{k}_{op}", keepdims=1))
        elif op == "Softmax":
            nodes.append(helper.make_node(op, [current], [out], name=f"n{k}_{op}", axis=-1))
        else:
            nodes.append(helper.make_node(op, [current], [out], name=f"n{k}_{op}"))
        current = out
    nodes.append(helper.make_node("Add", [current, "y"], ["z"], name="out"))  # keeps the output shape of x
    value = st.one_of(st.sampled_from(SPECIAL), st.floats(width=32, allow_nan=True, allow_infinity=True,
                                                          allow_subnormal=True))
    size = int(np.prod(shape))
    feeds = {name: np.array(draw(st.lists(value, min_size=size, max_size=size)), np.float32).reshape(shape)
             for name in ("x", "y")}
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "fuzz", io, [helper.make_tensor_value_info("z", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model, feeds


def check(model: Any, feeds: dict[str, np.ndarray]) -> str:
    """Compile ``model`` for cpu with the agreement gate on ``feeds``.

    Returns:
        ``"agree"`` (compiled and equal to onnxruntime) or ``"refused: ..."`` (a clean EffcError other than a
        mismatch).

    Raises:
        MismatchError: the compiled outputs disagree with onnxruntime (a wrong answer).
        Exception: anything that is not an EffcError (a raw crash).
    """
    import effc
    from effc.errors import EffcError, MismatchError

    with tempfile.TemporaryDirectory(prefix="effc-fuzz-") as work:
        try:
            effc.compile(model, out_dir=Path(work) / "out", data=[feeds], eval_samples=1, measure_latency=False)
        except MismatchError:
            raise
        except EffcError as exc:
            return f"refused: {exc.message[:200]}"
    return "agree"


def main(argv: list[str] | None = None) -> int:
    """Run ``--examples`` random graphs; prints each outcome, exits 1 on the first wrong answer or crash."""
    import logging

    from hypothesis import HealthCheck, given, seed, settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    outcomes: dict[str, int] = {}

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(graphs())
    def run(example: tuple[Any, dict[str, np.ndarray]]) -> None:
        result = check(*example)
        key = result.split(":")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
        print(f"{sum(outcomes.values())}: {' -> '.join(n.op_type for n in example[0].graph.node)}: {result[:120]}",
              flush=True)

    run()
    print(f"{args.examples} examples: {outcomes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
