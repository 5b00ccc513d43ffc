import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from effc.errors import DataError
from effc.eval.fidelity import compare


def test_known_cosine_rel_l2_and_abs():
    a = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    b = np.array([1.0, 1.0, 0.0, 0.0], np.float32)
    r = compare([[a]], [[b]], ["y"])
    out = r["outputs"]["y"]
    assert out["cosine"] == pytest.approx(1 / np.sqrt(2))
    assert out["rel_l2"] == pytest.approx(1.0)
    assert out["max_abs"] == pytest.approx(1.0)
    assert out["mean_abs"] == pytest.approx(0.25)
    assert out["kind"] == "float" and out["top1_agreement"] is None  # 1-D: not class scores
    assert r["samples"] == 1 and r["summary"]["worst_output"] == "y"


def test_cosine_is_mean_over_samples_and_rel_l2_over_all():
    ref = [[np.array([3.0, 4.0])], [np.array([1.0, 0.0])]]
    cand = [[np.array([3.0, 4.0])], [np.array([0.0, 1.0])]]
    out = compare(ref, cand, ["y"])["outputs"]["y"]
    assert out["cosine"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert out["rel_l2"] == pytest.approx(np.sqrt(2) / np.sqrt(26))


def test_zero_vectors():
    z = np.zeros(3)
    assert compare([[z]], [[z]], ["y"])["outputs"]["y"]["cosine"] == 1.0
    out = compare([[z]], [[np.ones(3)]], ["y"])["outputs"]["y"]
    assert out["cosine"] == 0.0 and out["rel_l2"] == float("inf")
    assert compare([[z]], [[z]], ["y"])["outputs"]["y"]["rel_l2"] == 0.0


def test_top1_agreement_class_scores_heuristic_and_forced():
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], np.float32)
    cand = np.array([[0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.9, 0.1]], np.float32)
    r = compare([[ref]], [[cand]], ["logits"])
    assert r["outputs"]["logits"]["kind"] == "class_scores"
    assert r["outputs"]["logits"]["top1_agreement"] == pytest.approx(0.75)
    # explicit other kind switches the heuristic off
    off = compare([[ref]], [[cand]], ["logits"], output_kind="embedding")
    assert off["outputs"]["logits"]["top1_agreement"] is None
    # forced on a 3-D output: rows along the last axis over all samples
    r3 = compare([[ref[None]], [ref[None]]], [[cand[None]], [ref[None]]], ["s"], output_kind={"s": "class_scores"})
    assert r3["outputs"]["s"]["top1_agreement"] == pytest.approx(7 / 8)


def test_int_and_bool_outputs_exact_match():
    ref = [[np.array([1, 2, 3, 4], np.int64), np.array([True, False])]]
    cand = [[np.array([1, 2, 0, 4], np.int64), np.array([True, True])]]
    r = compare(ref, cand, ["ids", "mask"])
    assert r["outputs"]["ids"]["exact_match"] == pytest.approx(0.75)
    assert r["outputs"]["ids"]["max_abs"] == 3.0 and r["outputs"]["ids"]["cosine"] is None
    assert r["outputs"]["mask"]["kind"] == "bool" and r["outputs"]["mask"]["exact_match"] == 0.5
    assert r["summary"]["exact_match"] == 0.5 and r["summary"]["cosine"] is None


def test_summary_is_worst_over_outputs():
    a = np.array([[1.0, 2.0, 3.0]])
    ref = [[a, a]]
    cand = [[a + 0.01, -a]]
    r = compare(ref, cand, ["good", "bad"], output_kind="embedding")
    assert r["summary"]["cosine"] == pytest.approx(-1.0)
    assert r["summary"]["max_abs"] == pytest.approx(6.0)
    assert r["summary"]["worst_output"] == "bad"


def test_nonfinite_counted():
    r = compare([[np.ones(4)]], [[np.array([1.0, np.nan, 1.0, np.inf])]], ["y"])
    assert r["outputs"]["y"]["nonfinite"] == 2 and r["summary"]["nonfinite"] == 2


def test_nonfinite_at_the_same_places_match_and_metrics_use_the_finite_rest():
    ref = np.array([1.0, np.nan, 2.0, np.inf, -np.inf])
    same = compare([[ref]], [[np.array([1.5, np.nan, 2.0, np.inf, -np.inf])]], ["y"])["outputs"]["y"]
    assert same["nonfinite"] == 0 and same["max_abs"] == pytest.approx(0.5)
    flipped = compare([[ref]], [[np.array([1.0, 0.0, 2.0, -np.inf, -np.inf])]], ["y"])["outputs"]["y"]
    assert flipped["nonfinite"] == 2  # NaN lost, inf sign flipped
    # a misplaced NaN/inf fails every metric: never cosine 1.0 / max abs 0 from the finite rest
    assert flipped["max_abs"] == np.inf and flipped["rel_l2"] == np.inf and np.isnan(flipped["cosine"])


def test_relu_nan_to_zero_is_reported_as_failure_in_summary():
    ref = [[np.array([[np.nan, 1.0]]), np.array([[0.5, 0.5]])]]
    cand = [[np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]])]]
    s = compare(ref, cand, ["a", "b"], output_kind="float")["summary"]
    assert np.isnan(s["cosine"]) and s["max_abs"] == np.inf and s["worst_output"] == "a"


def test_mismatches_raise_data_error_naming_output():
    a = np.zeros((2, 3))
    with pytest.raises(DataError, match="'logits'"):
        compare([[a]], [[np.zeros((3, 2))]], ["logits"])
    with pytest.raises(DataError, match="1 sample"):
        compare([[a]], [[a], [a]], ["y"])
    with pytest.raises(DataError, match="output name"):
        compare([[a, a]], [[a, a]], ["y"])
    with pytest.raises(DataError, match="no samples"):
        compare([], [], ["y"])


@settings(max_examples=25, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(2, 6)),
              elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False)))
def test_identical_outputs_are_perfect(x):
    r = compare([[x], [x * 2]], [[x.copy()], [x * 2]], ["scores"])
    out = r["outputs"]["scores"]
    assert out["max_abs"] == 0.0 and out["rel_l2"] == 0.0
    assert out["cosine"] == pytest.approx(1.0, abs=1e-9) and out["top1_agreement"] == 1.0
    # scaling the candidate keeps cosine and top-1 but not rel_l2
    scaled = compare([[x]], [[x * 3]], ["scores"])["outputs"]["scores"]
    assert scaled["top1_agreement"] == 1.0
    if np.any(x != 0):
        assert scaled["rel_l2"] == pytest.approx(2.0, rel=1e-5)


def test_ml_dtypes_floats_are_floats_with_nan_matching_nan():
    import ml_dtypes

    ref = np.array([1.0, np.nan, -2.0], np.float32).astype(ml_dtypes.bfloat16)
    r = compare([[ref]], [[ref.copy()]], ["y"], output_kind="float")["outputs"]["y"]
    assert r["kind"] == "float" and r["max_abs"] == 0.0 and r["nonfinite"] == 0
    off = compare([[ref]], [[np.array([1.0, np.nan, -2.5], np.float32).astype(ml_dtypes.bfloat16)]], ["y"],
                  output_kind="float")["outputs"]["y"]
    assert off["max_abs"] == pytest.approx(0.5)
