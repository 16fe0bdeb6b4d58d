"""Decision thresholds tuned on labelled images: for the pixel metric, or for the grain size.

A segmentation network's class-1 probability is usually cut at 0.5 (argmax).  When the training
labels were few, the network's calibration drifts — a U-Net fine-tuned on 8 real crops is
precision-biased: it misses faint boundaries, every missed boundary lengthens the Heyn intercepts,
and the grain size comes out too large.  :func:`tune_threshold` picks the cut on labelled images
(the training images themselves when nothing else is labelled):

``"metric"``      the threshold with the best mean boundary F1 (``task="boundary"``) or IoU
                  (``task="particle"``) over the images;
``"grain_size"``  the threshold whose predictions give the images' Heyn grain size: the mean signed
                  relative intercept error ``(H(pred) − H(true)) / H(true)`` closest to zero
                  (boundary task only; :func:`sdk.metrics.grain_size_error`).

Ties go to the threshold nearest 0.5.  Nothing here trains or sees unlabelled test images.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np

__all__ = ["DEFAULT_THRESHOLDS", "tune_threshold"]

#: candidate thresholds (class-1 probability) tried by default: 0.05, 0.10, ..., 0.95
DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _objective(probs: Sequence[np.ndarray], masks: Sequence[np.ndarray], th: float, objective: str,
               task: str, tolerance: int) -> float:
    """Loss to minimise at one threshold (NaN when undefined on every image)."""
    from sdk import metrics

    vals = []
    for p, m in zip(probs, masks):
        pred = p > th
        if objective == "grain_size":
            vals.append(metrics.grain_size_error(pred, m, signed=True))
        elif task == "boundary":
            vals.append(-float(metrics.boundary_f1(pred, m, tolerance=tolerance)["f1"]))
        else:
            vals.append(-float(metrics.iou(pred, m)))
    v = np.asarray(vals, dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return math.nan
    return abs(float(v.mean())) if objective == "grain_size" else float(v.mean())


def tune_threshold(probabilities: Sequence[np.ndarray], masks: Sequence[np.ndarray], *,
                   objective: Literal["metric", "grain_size"] = "metric",
                   task: Literal["boundary", "particle"] = "boundary", tolerance: int = 2,
                   thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> float:
    """Class-1 probability threshold that best fits labelled images.

    Parameters
    ----------
    probabilities : sequence of (H, W) float arrays
        Class-1 probabilities in [0, 1] (e.g. ``sdk.trainer.predict_tiled(...)[1]``).
    masks : sequence of (H, W) bool/int arrays
        The labels of the same images (boundary or particle masks, nonzero = class 1).
    objective : {"metric", "grain_size"}
        Maximise the mean boundary F1 / IoU, or match the Heyn grain size (mean signed relative
        error closest to 0; ``task="boundary"`` only).
    task : {"boundary", "particle"}
        Which metric ``"metric"`` means: boundary F1 with ``tolerance`` px, or IoU.
    tolerance : int
        Boundary F1 tolerance, px.
    thresholds : sequence of float
        Candidates in (0, 1).

    Returns
    -------
    float
        The chosen threshold; 0.5 when the objective is undefined at every candidate (e.g. no
        image has two boundary hits on a test line).

    Raises
    ------
    ValueError
        Empty or mismatched inputs, shapes that differ, candidates outside (0, 1), an unknown
        objective or task, or ``grain_size`` with the particle task.
    """
    if objective not in ("metric", "grain_size"):
        raise ValueError(f"objective must be 'metric' or 'grain_size', got {objective!r}")
    if task not in ("boundary", "particle"):
        raise ValueError(f"task must be 'boundary' or 'particle', got {task!r}")
    if objective == "grain_size" and task != "boundary":
        raise ValueError("objective 'grain_size' needs boundary maps (task='boundary')")
    probs = [np.asarray(p, dtype=float) for p in probabilities]
    ms = [np.asarray(m) for m in masks]
    if not probs or len(probs) != len(ms):
        raise ValueError(f"need as many probability maps as masks (>= 1), got {len(probs)} and {len(ms)}")
    for p, m in zip(probs, ms):
        if p.ndim != 2 or p.shape != m.shape:
            raise ValueError(f"probability map {p.shape} and mask {m.shape} must be equal 2-D shapes")
    cands = [float(t) for t in thresholds]
    if not cands or any(not 0.0 < t < 1.0 for t in cands):
        raise ValueError(f"thresholds must be non-empty and inside (0, 1), got {list(thresholds)!r}")
    losses = [_objective(probs, ms, t, objective, task, tolerance) for t in cands]
    finite = [(loss, abs(t - 0.5), t) for loss, t in zip(losses, cands) if math.isfinite(loss)]
    if not finite:
        return 0.5
    return min(finite)[2]
