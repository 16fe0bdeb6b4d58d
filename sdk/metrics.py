"""Segmentation metrics for microstructures: overlap, boundaries, grain size, instances.

NumPy arrays or torch tensors in; Python floats, dicts and NumPy arrays out.

- :func:`iou`, :func:`dice`: per class, per image and aggregated over a batch.
- :func:`boundary_f1`: precision/recall/F1 of thinned (skeletonised) boundaries matched within a
  pixel tolerance.
- :func:`heyn_intercept`, :func:`grain_size_error`: mean lineal intercept (grain size) on the
  thinned boundary map, the method of the TBM evaluation, and its relative error.
- :func:`match_instances`: one-to-one matching of particles (Hungarian on IoU) with
  TP/FP/FN, precision, recall, F1 and the mean IoU of the matches.

Thinning uses :func:`skimage.morphology.skeletonize` (scikit-image, in the ``sdk`` extra);
distances use :func:`scipy.ndimage.distance_transform_edt`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["Scores", "confusion_counts", "iou", "dice", "skeleton", "boundary_f1",
           "heyn_intercept", "grain_size_error", "match_instances"]


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


# --------------------------------------------------------------------------------------------
# IoU and Dice
# --------------------------------------------------------------------------------------------


class Scores(float):
    """A score that is a float (the headline value) and carries its breakdown.

    ``float(s)`` is the aggregated value: the foreground score in binary mode, the mean over
    classes (NaN classes skipped) otherwise, both from counts summed over all images.

    Attributes
    ----------
    per_class : ndarray (K,)
        Score of every class from counts summed over all images; NaN where a class is absent
        from both prediction and target.
    per_image : ndarray (N, K)
        Score of every class in every image (N = 1 for a single (H, W) input).
    image_scores : ndarray (N,)
        Headline value of every image (1.0 in binary mode for an image where both masks are
        empty; NaN in multi-class mode when every class is absent).
    mean_of_images : float
        Mean of ``image_scores`` (NaN skipped): the per-image ("macro") aggregate, next to the
        pooled ("micro") ``float(self)``.
    """

    per_class: np.ndarray
    per_image: np.ndarray
    image_scores: np.ndarray

    def __new__(cls, value: float, per_class: np.ndarray, per_image: np.ndarray,
                image_scores: np.ndarray) -> "Scores":
        obj = super().__new__(cls, float(value))
        obj.per_class = per_class
        obj.per_image = per_image
        obj.image_scores = image_scores
        return obj

    @property
    def mean_of_images(self) -> float:
        s = self.image_scores[np.isfinite(self.image_scores)]
        return float(s.mean()) if s.size else float("nan")

    def __reduce__(self):
        return (Scores, (float(self), self.per_class, self.per_image, self.image_scores))

    def __repr__(self) -> str:
        return f"Scores({float(self):.4f}, per_class={np.round(self.per_class, 4).tolist()})"


def _prepare(pred: Any, target: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    p, t = _np(pred), _np(target)
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}")
    if p.ndim == 2:
        p, t = p[None], t[None]
    if p.ndim != 3:
        raise ValueError(f"expected label maps (H, W) or (N, H, W), got shape {p.shape}")
    if num_classes is None:
        return (p != 0).astype(np.int64), (t != 0).astype(np.int64), 2
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
    for name, a in (("pred", p), ("target", t)):
        if a.dtype.kind == "f" and not np.all(a == np.round(a)):
            raise ValueError(f"{name} must hold class indices (integers), not scores or "
                             "probabilities: take argmax first")
    return p.astype(np.int64), t.astype(np.int64), int(num_classes)


def confusion_counts(pred: Any, target: Any, num_classes: int | None = None, *,
                     ignore_index: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image, per-class intersection and the two areas.

    Parameters
    ----------
    pred, target : (H, W) or (N, H, W) class maps (array or tensor)
        ``num_classes=None``: binary mode, nonzero is foreground.
    num_classes : int, optional
    ignore_index : int, optional
        Target value whose pixels are left out.

    Returns
    -------
    inter, area_pred, area_target : ndarray (N, K) int64
        ``|P_k ∩ T_k|``, ``|P_k|``, ``|T_k|`` per image ``n`` and class ``k`` (pixels with a
        value outside ``0..K-1`` belong to no class).
    """
    raw_t = _np(target)
    p, t, k = _prepare(pred, target, num_classes)
    valid = np.ones(t.shape, dtype=bool)
    if ignore_index is not None:
        rt = raw_t[None] if raw_t.ndim == 2 else raw_t
        valid = rt != ignore_index
    n = p.shape[0]
    inter = np.zeros((n, k), dtype=np.int64)
    ap = np.zeros((n, k), dtype=np.int64)
    at = np.zeros((n, k), dtype=np.int64)
    for i in range(n):
        pi, ti = p[i][valid[i]], t[i][valid[i]]
        okp = (pi >= 0) & (pi < k)
        okt = (ti >= 0) & (ti < k)
        ap[i] = np.bincount(pi[okp], minlength=k)[:k]
        at[i] = np.bincount(ti[okt], minlength=k)[:k]
        same = okp & okt & (pi == ti)
        inter[i] = np.bincount(pi[same], minlength=k)[:k]
    return inter, ap, at


def _overlap(kind: str, pred: Any, target: Any, num_classes: int | None,
             ignore_index: int | None) -> Scores:
    inter, ap, at = confusion_counts(pred, target, num_classes, ignore_index=ignore_index)

    def score(i: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        i, a, b = (np.asarray(x, dtype=np.float64) for x in (i, a, b))
        den = a + b - i if kind == "iou" else a + b
        num = i if kind == "iou" else 2 * i
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    per_image = score(inter, ap, at)
    per_class = score(inter.sum(0), ap.sum(0), at.sum(0))
    if num_classes is None:  # binary: the foreground; agreement on an empty mask counts as 1
        value = 1.0 if np.isnan(per_class[1]) else float(per_class[1])
        image_scores = np.where(np.isnan(per_image[:, 1]), 1.0, per_image[:, 1])
    else:
        value = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
        with np.errstate(invalid="ignore"):
            finite = np.isfinite(per_image)
            sums = np.where(finite, per_image, 0).sum(1)
            cnt = finite.sum(1)
            image_scores = np.where(cnt > 0, sums / np.maximum(cnt, 1), np.nan)
    return Scores(value, per_class, per_image, image_scores)


def iou(pred: Any, target: Any, num_classes: int | None = None, *,
        ignore_index: int | None = None) -> Scores:
    """Intersection over union (Jaccard index).

    Parameters
    ----------
    pred, target : (H, W) or (N, H, W) class maps (NumPy or torch; ints or bools)
    num_classes : int, optional
        None (binary mode): nonzero is foreground and ``float(result)`` is the foreground IoU
        (1.0 when both are empty). An int K: classes ``0..K-1`` and ``float(result)`` is the mean
        over classes present in prediction or target (mIoU).
    ignore_index : int, optional
        Target value to leave out.

    Returns
    -------
    Scores
        A float with ``per_class`` (K,), ``per_image`` (N, K), ``image_scores`` (N,) and
        ``mean_of_images``; pooled over the batch (intersections and unions summed).
    """
    return _overlap("iou", pred, target, num_classes, ignore_index)


def dice(pred: Any, target: Any, num_classes: int | None = None, *,
         ignore_index: int | None = None) -> Scores:
    """Dice coefficient (F1 of pixels): ``2|P ∩ T| / (|P| + |T|)``; arguments as :func:`iou`."""
    return _overlap("dice", pred, target, num_classes, ignore_index)


# --------------------------------------------------------------------------------------------
# Boundaries
# --------------------------------------------------------------------------------------------


def skeleton(boundary: Any) -> np.ndarray:
    """One-pixel-wide (8-connected) thinning of a boundary mask (H, W) -> bool (H, W)."""
    from skimage.morphology import skeletonize

    b = _np(boundary)
    if b.ndim != 2:
        raise ValueError(f"expected a boundary mask (H, W), got shape {b.shape}")
    b = b != 0
    return skeletonize(b) if b.any() else b


def boundary_f1(pred_boundary: Any, true_boundary: Any, tolerance: float = 2, *,
                thin: bool = True) -> dict[str, float]:
    """Boundary precision, recall and F1 with a distance tolerance.

    Both masks are thinned to one-pixel skeletons; a predicted skeleton pixel is correct when a
    true skeleton pixel lies within ``tolerance`` px (Euclidean), and a true one is found when a
    predicted one lies within ``tolerance``.

    Parameters
    ----------
    pred_boundary, true_boundary : (H, W) masks (nonzero = boundary)
    tolerance : float
        Pixels.
    thin : bool
        Skeletonise first (default); False for masks that are already thin.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f1`` (floats). Both empty: all 1.0; one empty: all 0.0
        (nothing right to count).
    """
    from scipy import ndimage

    p, t = _np(pred_boundary), _np(true_boundary)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"expected two boundary masks of one shape (H, W), got {p.shape} and {t.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 px, got {tolerance}")
    p = skeleton(p) if thin else p != 0
    t = skeleton(t) if thin else t != 0
    if not p.any() and not t.any():
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    if not p.any() or not t.any():
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    d_to_true = ndimage.distance_transform_edt(~t)
    d_to_pred = ndimage.distance_transform_edt(~p)
    precision = float(np.mean(d_to_true[p] <= tolerance))
    recall = float(np.mean(d_to_pred[t] <= tolerance))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": float(f1)}


def _line_hits(line: np.ndarray) -> np.ndarray:
    """Centres (px) of the runs of boundary pixels along one line."""
    x = np.concatenate(([False], line, [False])).astype(np.int8)
    d = np.diff(x)
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1) - 1
    return (starts + ends) / 2.0


def heyn_intercept(boundary: Any, n_lines: int = 20, *, direction: str = "horizontal",
                   thin: bool = True) -> float:
    """Grain size by the Heyn (mean lineal) intercept method, in px.

    ``n_lines`` test lines are laid across the thinned boundary map at the centres of equal
    bands (rows ``(k + 0.5)·H/n_lines``); every run of consecutive boundary pixels on a line is
    one hit at its centre; the result is the mean distance between consecutive hits on the same
    line, over all lines.

    Parameters
    ----------
    boundary : (H, W) mask (nonzero = boundary)
    n_lines : int
        Number of test lines.
    direction : {"horizontal", "vertical", "both"}
        Rows, columns, or both (``n_lines`` each, all gaps pooled).
    thin : bool
        Skeletonise first (default).

    Returns
    -------
    float
        Mean intercept length in px; NaN when no line has two hits (grains larger than the
        field).
    """
    b = _np(boundary)
    if b.ndim != 2:
        raise ValueError(f"expected a boundary mask (H, W), got shape {b.shape}")
    if isinstance(n_lines, bool) or int(n_lines) != n_lines or n_lines < 1:
        raise ValueError(f"n_lines must be a positive int, got {n_lines!r}")
    if direction not in ("horizontal", "vertical", "both"):
        raise ValueError(f"direction must be 'horizontal', 'vertical' or 'both', got {direction!r}")
    s = skeleton(b) if thin else b != 0
    gaps: list[np.ndarray] = []
    views = {"horizontal": [s], "vertical": [s.T], "both": [s, s.T]}[direction]
    for v in views:
        rows = ((np.arange(n_lines) + 0.5) * v.shape[0] / n_lines).astype(int)
        for r in rows:
            hits = _line_hits(v[min(r, v.shape[0] - 1)])
            if hits.size >= 2:
                gaps.append(np.diff(hits))
    if not gaps:
        return float("nan")
    return float(np.concatenate(gaps).mean())


def grain_size_error(pred_boundary: Any, true_boundary: Any, n_lines: int = 20, *,
                     signed: bool = False, thin: bool = True) -> float:
    """Relative error of the Heyn grain size: ``|H(pred) − H(true)| / H(true)``.

    Parameters
    ----------
    pred_boundary, true_boundary : (H, W) masks
    n_lines : int
        Test lines of :func:`heyn_intercept`.
    signed : bool
        Return ``(H(pred) − H(true)) / H(true)`` (positive: grains predicted too large).
    thin : bool
        Skeletonise first.

    Returns
    -------
    float
        NaN when either intercept is undefined.
    """
    hp = heyn_intercept(pred_boundary, n_lines, thin=thin)
    ht = heyn_intercept(true_boundary, n_lines, thin=thin)
    if not (math.isfinite(hp) and math.isfinite(ht)) or ht == 0:
        return float("nan")
    err = (hp - ht) / ht
    return float(err if signed else abs(err))


# --------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------


def _instances(a: Any) -> np.ndarray:
    x = _np(a)
    if x.ndim != 2:
        raise ValueError(f"expected an instance map or mask (H, W), got shape {x.shape}")
    if x.dtype == bool:
        from scipy import ndimage

        lab, _ = ndimage.label(x)
        return lab.astype(np.int64)
    if x.dtype.kind == "f" and not np.all(x == np.round(x)):
        raise ValueError("instance maps must hold integer ids (0 = background); threshold "
                         "probabilities and label connected components first")
    return x.astype(np.int64)


def match_instances(pred_labels: Any, true_labels: Any, iou_threshold: float = 0.5) -> dict[str, Any]:
    """Match predicted to true instances one-to-one by IoU.

    Pairs are chosen by the Hungarian algorithm maximising the total IoU among pairs with
    ``IoU >= iou_threshold`` (for thresholds above 0.5 every instance has at most one such
    partner, so this equals greedy matching).

    Parameters
    ----------
    pred_labels, true_labels : (H, W)
        Instance maps (int ids, 0 = background) or boolean masks (instances = 4-connected
        components).
    iou_threshold : float
        Minimum IoU of a match, in (0, 1].

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (int), ``precision``, ``recall``, ``f1``, ``mean_iou`` (float;
        mean IoU of the matched pairs, NaN with none), ``matches`` (list of
        ``(pred_id, true_id, iou)``). No instances on either side: precision, recall and F1 1.0.
    """
    from scipy.optimize import linear_sum_assignment

    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    p, t = _instances(pred_labels), _instances(true_labels)
    if p.shape != t.shape:
        raise ValueError(f"pred and true shapes differ: {p.shape} vs {t.shape}")
    p_ids, p_inv, p_area = np.unique(p, return_inverse=True, return_counts=True)
    t_ids, t_inv, t_area = np.unique(t, return_inverse=True, return_counts=True)
    p_inv, t_inv = p_inv.reshape(-1), t_inv.reshape(-1)
    # contingency table of (pred id, true id) pixel counts, background rows/cols dropped below
    pair = p_inv.astype(np.int64) * len(t_ids) + t_inv
    cont = np.bincount(pair, minlength=len(p_ids) * len(t_ids)).reshape(len(p_ids), len(t_ids))
    pk = p_ids != 0
    tk = t_ids != 0
    inter = cont[np.ix_(pk, tk)].astype(np.float64)
    union = p_area[pk][:, None] + t_area[tk][None, :] - inter
    ious = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    n_pred, n_true = int(pk.sum()), int(tk.sum())
    matches: list[tuple[int, int, float]] = []
    if n_pred and n_true:
        weight = np.where(ious >= iou_threshold, ious, 0.0)
        rows, cols = linear_sum_assignment(weight, maximize=True)
        for r, c in zip(rows, cols):
            if ious[r, c] >= iou_threshold and ious[r, c] > 0:
                matches.append((int(p_ids[pk][r]), int(t_ids[tk][c]), float(ious[r, c])))
    tp = len(matches)
    fp, fn = n_pred - tp, n_true - tp
    if n_pred == 0 and n_true == 0:
        precision = recall = f1 = 1.0
    else:
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * tp / (n_pred + n_true)
    mean_iou = float(np.mean([m[2] for m in matches])) if matches else float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "precision": float(precision), "recall": float(recall),
            "f1": float(f1), "mean_iou": mean_iou, "matches": matches}
