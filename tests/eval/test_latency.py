import time

import numpy as np
import pytest

from effc.errors import DataError, EffcError
from effc.eval.latency import (
    BASELINE_ORIGINAL,
    BASELINE_REWRITTEN,
    measure,
    measure_interleaved,
    ort_latency,
    paired_latency,
)
from tests.conftest import make_mlp


def test_measure_cycles_feeds_and_times():
    seen = []

    def run(feed):
        seen.append(feed["k"])
        time.sleep(0.002)

    result = measure(run, [{"k": 0}, {"k": 1}, {"k": 2}], warmup=2, repeat=5)
    assert seen == [0, 1, 0, 1, 2, 0, 1]
    assert result["runs"] == 5
    assert 2.0 <= result["min_ms"] <= result["median_ms"] <= result["max_ms"] < 500
    assert result["min_ms"] <= result["mean_ms"] <= result["max_ms"]


def test_measure_rejects_bad_arguments():
    with pytest.raises(DataError):
        measure(lambda f: None, [], repeat=1)
    with pytest.raises(EffcError, match="repeat"):
        measure(lambda f: None, {"x": 1}, repeat=0)


def test_ort_latency_on_mlp(mlp_path):
    feeds = [{"x": np.ones((1, 16), np.float32), "unused": np.zeros(1)}]
    result = ort_latency(mlp_path, feeds, threads=1, warmup=1, repeat=5)
    assert result["threads"] == 1 and result["runs"] == 5
    assert 0 < result["min_ms"] <= result["median_ms"] < 1000
    assert result["runtime"].startswith("onnxruntime")
    from_bytes = ort_latency(make_mlp().SerializeToString(), feeds[0], repeat=2, warmup=0)
    assert from_bytes["runs"] == 2
    with pytest.raises(DataError, match="'x'"):
        ort_latency(mlp_path, [{"y": np.ones((1, 16), np.float32)}], repeat=1)


def test_interleaved_timing_shares_a_load_change_between_sides():
    # timed one after the other, a slowdown that starts halfway made the second side look 5x slower
    order, clock = [], {"n": 0}

    def side(name):
        def run(feed):
            order.append((name, feed["k"]))
            clock["n"] += 1
            time.sleep(0.005 if clock["n"] > 12 else 0.001)  # the machine gets busy after 12 calls

        return run

    timed = measure_interleaved({"a": (side("a"), [{"k": 0}, {"k": 1}]), "b": (side("b"), [{"k": 0}, {"k": 1}])},
                                warmup=1, repeat=10)
    assert order[:4] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert timed["a"]["runs"] == timed["b"]["runs"] == 10
    assert 0.5 < timed["a"]["median_ms"] / timed["b"]["median_ms"] < 2
    sequential_a = measure(side("a"), [{"k": 0}], warmup=1, repeat=10)
    assert sequential_a["median_ms"] > 2  # (the load now stays high: sequential timing would not have shared it)
    with pytest.raises(EffcError, match="repeat"):
        measure_interleaved({"a": (side("a"), [{"k": 0}])}, repeat=0)


def test_paired_latency_on_mlp(mlp_path):
    x = np.zeros((1, 16), np.float32)
    ort_side, other = paired_latency(str(mlp_path), [{"x": x, "extra": 1}], lambda f: None, [{"x": x}], repeat=3)
    assert ort_side["runs"] == other["runs"] == 3 and ort_side["threads"] == 1
    assert ort_side["runtime"].startswith("onnxruntime")
    assert "baseline" not in ort_side  # not recorded unless the caller says which model onnxruntime ran
    with pytest.raises(DataError, match="lacks model input"):
        paired_latency(str(mlp_path), [{"y": x}], lambda f: None, [{"x": x}], repeat=1)


@pytest.mark.parametrize("baseline", [BASELINE_ORIGINAL, BASELINE_REWRITTEN])
def test_paired_latency_records_its_baseline(mlp_path, baseline):
    x = np.zeros((1, 16), np.float32)
    ort_side, other = paired_latency(str(mlp_path), [{"x": x}], lambda f: None, [{"x": x}], repeat=2,
                                     baseline=baseline)
    assert ort_side["baseline"] == baseline and "baseline" not in other
