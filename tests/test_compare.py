"""The comparator fails for every kind of difference and names each one."""

import numpy as np

from attnserve.compare import compare_outputs
from attnserve.spec import Tolerance

TOL = Tolerance(atol=1e-4, rtol=1e-3)


def test_equal_within_tolerance_passes():
    a = {"y": np.linspace(-5, 5, 40, dtype=np.float32).reshape(4, 10)}
    b = {"y": a["y"] + 5e-5}
    report = compare_outputs(a, b, TOL, classes_last_axis=True)
    assert report.passed and report.outputs[0].top1_agreement == 1.0
    assert 4e-5 < report.outputs[0].max_abs_error < 6e-5


def test_difference_beyond_tolerance_fails_and_says_by_how_much():
    a = {"y": np.zeros((2, 3), np.float32)}
    b = {"y": np.array([[0, 0, 1e-3], [0, 0, 0]], np.float32)}
    report = compare_outputs(a, b, TOL)
    assert not report.passed
    assert "y: max abs error 0.001 exceeds atol 0.0001" in report.failures()[0]


def test_relative_tolerance_scales_with_magnitude():
    a = {"y": np.array([1000.0], np.float32)}
    assert compare_outputs(a, {"y": np.array([1000.5], np.float32)}, TOL).passed
    assert not compare_outputs(a, {"y": np.array([1002.0], np.float32)}, TOL).passed


def test_nan_shape_and_missing_outputs_fail_together():
    a = {"y": np.zeros(3), "z": np.zeros(2), "w": np.zeros(1)}
    b = {"y": np.array([0, np.nan, 0]), "z": np.zeros(3)}
    failures = compare_outputs(a, b, TOL).failures()
    assert failures == [
        "y: 1 non-finite values (NaN or inf)",
        "z: shape (3,), expected (2,)",
        "w: missing from the outputs",
    ]


def test_top1_agreement_counts_rows():
    a = {"y": np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)}
    b = {"y": np.array([[1, 0], [0, 1], [0, 1], [1, 0]], np.float32)}
    assert compare_outputs(a, b, TOL, classes_last_axis=True).outputs[0].top1_agreement == 0.5


def test_matching_infinities_are_equal_and_mismatched_ones_fail():
    a = {"bias": np.array([0.0, -np.inf, 1.0])}
    assert compare_outputs(a, {"bias": np.array([0.0, -np.inf, 1.0])}, TOL).passed
    assert not compare_outputs(a, {"bias": np.array([0.0, 0.0, 1.0])}, TOL).passed
    assert not compare_outputs(a, {"bias": np.array([0.0, np.inf, 1.0])}, TOL).passed
