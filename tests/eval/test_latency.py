import time

import numpy as np
import pytest

from effc.errors import DataError, EffcError
from effc.eval.latency import measure, ort_latency
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
