"""sdk.threshold: decision thresholds tuned for the pixel metric or for the Heyn grain size."""

from __future__ import annotations

import numpy as np
import pytest

from sdk.metrics import grain_size_error, iou
from sdk.threshold import DEFAULT_THRESHOLDS, tune_threshold


def test_metric_objective_finds_the_cut_that_made_the_mask():
    # truth = p > 0.42; of the candidates 0.40 gives IoU 0.58/0.60 = 0.967, 0.45 gives 0.55/0.58 = 0.948
    rng = np.random.default_rng(0)
    p = [rng.uniform(0, 1, (64, 64)) for _ in range(4)]
    m = [q > 0.42 for q in p]
    th = tune_threshold(p, m, objective="metric", task="particle")
    assert th == pytest.approx(0.40)
    assert iou(p[0] > th, m[0]) > iou(p[0] > 0.5, m[0])


def _stripes(n=128, period=16, strong=0.7, faint=0.35, background=0.02):
    """Vertical boundary lines every ``period`` px; every other line only faintly predicted."""
    truth = np.zeros((n, n), bool)
    prob = np.full((n, n), background)
    for j, c in enumerate(range(period // 2, n, period)):
        truth[:, c] = True
        prob[:, c] = strong if j % 2 == 0 else faint
    return prob, truth


def test_grain_size_objective_recovers_faint_boundaries():
    prob, truth = _stripes()
    # argmax misses the faint lines: the intercept doubles (error +1.0 analytically)
    assert grain_size_error(prob > 0.5, truth, signed=True) == pytest.approx(1.0, abs=0.02)
    th = tune_threshold([prob], [truth], objective="grain_size")
    # every candidate in [background, faint) gives the exact size; ties go to the one nearest 0.5
    assert th == pytest.approx(0.30)
    assert grain_size_error(prob > th, truth) == pytest.approx(0.0, abs=1e-9)


def test_undefined_objective_falls_back_to_half():
    blank = np.zeros((32, 32))
    assert tune_threshold([blank], [np.zeros((32, 32), bool)], objective="grain_size") == 0.5


def test_bad_input_is_named():
    p, m = np.zeros((8, 8)), np.zeros((8, 8), bool)
    with pytest.raises(ValueError, match="task='boundary'"):
        tune_threshold([p], [m], objective="grain_size", task="particle")
    with pytest.raises(ValueError, match="as many"):
        tune_threshold([p, p], [m])
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        tune_threshold([p], [np.zeros((8, 9), bool)])
    with pytest.raises(ValueError, match="inside"):
        tune_threshold([p], [m], thresholds=[0.0, 0.5])
    with pytest.raises(ValueError, match="objective"):
        tune_threshold([p], [m], objective="f2")
    assert DEFAULT_THRESHOLDS[0] == 0.05 and DEFAULT_THRESHOLDS[-1] == 0.95 and len(DEFAULT_THRESHOLDS) == 19
