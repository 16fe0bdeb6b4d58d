"""sdk.metrics against hand-computed cases, SciPy/scikit-image references and stereology."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sdk import metrics as M

skimage = pytest.importorskip("skimage")


# ------------------------------------------------------------------ IoU / Dice


def test_binary_iou_dice_hand_case():
    pred = np.zeros((10, 10), int)
    true = np.zeros((10, 10), int)
    pred[:5] = 1  # 50 px
    true[:3] = 1  # 30 px, all inside pred
    i, d = M.iou(pred, true), M.dice(pred, true)
    assert float(i) == pytest.approx(30 / 50) and float(d) == pytest.approx(60 / 80)
    np.testing.assert_allclose(i.per_class, [50 / 70, 30 / 50])
    np.testing.assert_allclose(d.per_class, [100 / 120, 60 / 80])
    assert isinstance(i, float) and i.per_image.shape == (1, 2)


def test_multiclass_hand_case():
    pred = np.array([[0, 1, 2], [2, 2, 1]])
    true = np.array([[0, 1, 1], [2, 0, 1]])
    i = M.iou(pred, true, num_classes=3)
    np.testing.assert_allclose(i.per_class, [1 / 2, 2 / 3, 1 / 3])
    assert float(i) == pytest.approx(0.5)
    d = M.dice(pred, true, 3)
    np.testing.assert_allclose(d.per_class, [2 / 3, 4 / 5, 2 / 4])
    assert float(d) == pytest.approx((2 / 3 + 4 / 5 + 1 / 2) / 3)
    # a class absent from both is NaN and left out of the mean
    i4 = M.iou(pred, true, num_classes=4)
    assert np.isnan(i4.per_class[3]) and float(i4) == pytest.approx(0.5)


def test_per_image_and_pooled_aggregation():
    pred = np.zeros((2, 20, 20), bool)
    true = np.zeros((2, 20, 20), bool)
    pred[0, :10, :10] = true[0, :10, :10] = True  # image 0: 100 px, perfect
    true[1, :2, :5] = True  # image 1: 10 px, missed entirely
    i = M.iou(pred, true)
    np.testing.assert_allclose(i.image_scores, [1.0, 0.0])
    assert i.mean_of_images == pytest.approx(0.5)
    assert float(i) == pytest.approx(100 / 110)  # pooled over the batch
    both_empty = M.iou(np.zeros((4, 4)), np.zeros((4, 4)))
    assert float(both_empty) == 1.0 and np.isnan(both_empty.per_class[1])


def test_iou_dice_match_scipy():
    from scipy.spatial import distance

    rng = np.random.default_rng(1)
    for _ in range(5):
        p = rng.random((37, 41)) < 0.3
        t = rng.random((37, 41)) < 0.4
        assert float(M.iou(p, t)) == pytest.approx(1 - distance.jaccard(p.ravel(), t.ravel()))
        assert float(M.dice(p, t)) == pytest.approx(1 - distance.dice(p.ravel(), t.ravel()))


def test_ignore_index_tensors_and_errors():
    torch = pytest.importorskip("torch")
    pred = torch.tensor([[1, 1, 0, 0]])
    true = torch.tensor([[1, 255, 0, 1]])
    i = M.iou(pred, true, num_classes=2, ignore_index=255)
    np.testing.assert_allclose(i.per_class, [1 / 2, 1 / 2])
    with pytest.raises(ValueError, match="argmax"):
        M.iou(np.full((2, 2), 0.3), np.zeros((2, 2)), num_classes=2)
    with pytest.raises(ValueError, match="shapes differ"):
        M.dice(np.zeros((2, 2)), np.zeros((2, 3)))
    inter, ap, at = M.confusion_counts(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]), 2)
    np.testing.assert_array_equal(inter, [[1, 2]])
    np.testing.assert_array_equal(ap, [[1, 3]])
    np.testing.assert_array_equal(at, [[2, 2]])


# ------------------------------------------------------------------ boundary F1


def vlines(shape=(64, 64), cols=(10, 30, 50), width=1):
    b = np.zeros(shape, bool)
    for c in cols:
        b[:, c:c + width] = True
    return b


def test_boundary_f1_hand_cases():
    t = vlines()
    assert M.boundary_f1(t, t) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert M.boundary_f1(vlines(cols=(11, 31, 51)), t, tolerance=2)["f1"] == 1.0  # 1 px off
    far = M.boundary_f1(vlines(cols=(13, 33, 53)), t, tolerance=2)  # 3 px off
    assert far["f1"] == 0.0
    assert M.boundary_f1(vlines(cols=(13, 33, 53)), t, tolerance=3)["f1"] == 1.0
    half = M.boundary_f1(vlines(cols=(10,)), vlines(cols=(10, 50)))
    assert half["precision"] == 1.0 and half["recall"] == pytest.approx(0.5)
    assert half["f1"] == pytest.approx(2 / 3)
    # a 5-px band is thinned to its centre line before matching
    band = vlines(cols=(8, 28, 48), width=5)
    thinned = M.boundary_f1(band, t, tolerance=0)
    assert thinned["precision"] > 0.9  # skeleton on the centre line (spurs at the image edge)
    assert thinned["recall"] > 0.9  # (thinning shortens the band ends by 2 px)
    assert M.boundary_f1(band, t, tolerance=2)["f1"] == 1.0
    assert M.boundary_f1(band, t, tolerance=0, thin=False)["precision"] == pytest.approx(0.2)
    empty = np.zeros((64, 64), bool)
    assert M.boundary_f1(empty, empty)["f1"] == 1.0
    assert M.boundary_f1(empty, t) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_boundary_f1_matches_a_kdtree_reference():
    from scipy.ndimage import gaussian_filter
    from scipy.spatial import cKDTree

    from sdk.data import boundary_from_instances

    rng = np.random.default_rng(7)
    field = gaussian_filter(rng.normal(size=(96, 96)), 4)
    true = boundary_from_instances((field > 0).astype(int) + (field > 0.05))
    pred = boundary_from_instances((np.roll(field, 2, axis=1) > 0.01).astype(int))
    for tol in (0, 1, 2, 3.5):
        ours = M.boundary_f1(pred, true, tolerance=tol)
        sp, st = np.argwhere(M.skeleton(pred)), np.argwhere(M.skeleton(true))
        p = np.mean(cKDTree(st).query(sp)[0] <= tol)
        r = np.mean(cKDTree(sp).query(st)[0] <= tol)
        assert ours["precision"] == pytest.approx(p) and ours["recall"] == pytest.approx(r)
        assert ours["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)


# ------------------------------------------------------------------ Heyn intercept


def test_heyn_hand_cases():
    assert M.heyn_intercept(vlines((100, 100), cols=range(5, 100, 10))) == pytest.approx(10.0)
    assert M.heyn_intercept(vlines((96, 96), cols=range(4, 96, 16), width=3)) == pytest.approx(16.0)
    # vertical test lines see the horizontal spacing of a grid; "both" pools the two
    grid = np.zeros((120, 120), bool)
    grid[:, 5::10] = True
    grid[7::20, :] = True
    assert M.heyn_intercept(grid.T, 20, direction="vertical") == pytest.approx(10.0)
    assert np.isnan(M.heyn_intercept(np.zeros((50, 50), bool)))
    assert np.isnan(M.heyn_intercept(vlines((50, 50), cols=(25,))))  # one hit per line: no gap


def test_heyn_matches_poisson_voronoi_stereology():
    # Poisson–Voronoi cells of intensity lam: boundary length per area L_A = 2 sqrt(lam), hits per
    # unit test line P_L = 2 L_A / pi, so the mean intercept is pi / (4 sqrt(lam)).
    from scipy.spatial import cKDTree

    from sdk.data import boundary_from_instances

    rng = np.random.default_rng(3)
    size, n = 512, 400
    seeds = rng.uniform(0, size, (n, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    _, ids = cKDTree(seeds).query(np.column_stack([yy.ravel(), xx.ravel()]))
    b = boundary_from_instances(ids.reshape(size, size), width=2)
    expect = np.pi / (4 * np.sqrt(n / size**2))
    got = M.heyn_intercept(b, n_lines=64, direction="both")
    assert got == pytest.approx(expect, rel=0.07)


def test_grain_size_error():
    true = vlines((100, 100), cols=range(5, 100, 10))
    pred = vlines((100, 100), cols=range(5, 100, 12))
    assert M.grain_size_error(pred, true) == pytest.approx(0.2)
    assert M.grain_size_error(true, pred, signed=True) == pytest.approx(-1 / 6)
    assert M.grain_size_error(true, true) == 0.0
    assert np.isnan(M.grain_size_error(np.zeros((100, 100)), true))


# ------------------------------------------------------------------ instances


def squares(spec, shape=(60, 60)):
    out = np.zeros(shape, np.int64)
    for k, (y, x, h, w) in spec.items():
        out[y:y + h, x:x + w] = k
    return out


def test_match_instances_hand_case():
    true = squares({1: (0, 0, 10, 10), 2: (20, 20, 10, 10), 3: (40, 40, 10, 10)})
    # pred 7 = true 1 exactly; pred 5 = true 2 shifted by 2 px (IoU 80/120); pred 9 is spurious
    pred = squares({7: (0, 0, 10, 10), 5: (20, 22, 10, 10), 9: (45, 5, 8, 8)})
    r = M.match_instances(pred, true)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    assert r["mean_iou"] == pytest.approx((1 + 80 / 120) / 2)
    assert sorted(r["matches"])[0][:2] == (5, 2) and sorted(r["matches"])[1][:2] == (7, 1)
    strict = M.match_instances(pred, true, iou_threshold=0.7)
    assert strict["tp"] == 1
    # boolean masks: instances are connected components
    rb = M.match_instances(pred > 0, true > 0)
    assert (rb["tp"], rb["fp"], rb["fn"]) == (2, 1, 1)
    none = M.match_instances(np.zeros((5, 5), int), np.zeros((5, 5), int))
    assert none["f1"] == 1.0 and none["tp"] == 0 and np.isnan(none["mean_iou"])
    with pytest.raises(ValueError):
        M.match_instances(pred, true, iou_threshold=0)


def test_match_instances_against_brute_force():
    rng = np.random.default_rng(11)
    for _ in range(6):
        true = squares({k + 1: (*rng.integers(0, 40, 2), *rng.integers(5, 15, 2)) for k in range(4)})
        pred = squares({k + 1: (*rng.integers(0, 40, 2), *rng.integers(5, 15, 2)) for k in range(4)})
        tids = [t for t in np.unique(true) if t]
        pids = [p for p in np.unique(pred) if p]
        iou = np.array([[np.logical_and(pred == p, true == t).sum() / np.logical_or(pred == p, true == t).sum()
                         for t in tids] for p in pids])
        thr = 0.2
        best = 0.0
        for perm in itertools.permutations(range(max(len(pids), len(tids)))):
            s = sum(iou[i, j] for i, j in enumerate(perm)
                    if i < len(pids) and j < len(tids) and iou[i, j] >= thr)
            best = max(best, s)
        r = M.match_instances(pred, true, iou_threshold=thr)
        assert sum(m[2] for m in r["matches"]) == pytest.approx(best)
        for p, t, v in r["matches"]:
            assert v == pytest.approx(iou[pids.index(p), tids.index(t)])
