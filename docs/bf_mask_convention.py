"""How well can exact particle labels match Gaussian + Otsu masks?  Measured on synthetic BF-TEM frames.

The masks of ../shared/data/real/tem-nanoparticles look algorithmic (a Gaussian filter of σ ≈ 5 px and an
Otsu threshold reproduce them).  This script applies that rule to synthetic frames of
``recipes/tem_bf_nanoparticles.yaml`` and scores, by IoU against the rule's masks, the exact labels and
rules computed from the geometry alone: the exact mask blurred (σ px) and cut at 0.5, projected-thickness
cuts, and contours of the noise-free particle absorption contrast ``1 − exp(−t/λ)`` (blurred, cut at the
frame's Otsu level, at half the frame's maximum, or at a fraction of each particle's own peak).  It prints
mean and minimum IoU and the area ratio (rule / Gaussian + Otsu) of each.  Quoted in the README ("Zero
labels" on BF-TEM).

Usage::

    python docs/bf_mask_convention.py [--n 40] [--sigma 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "tem_bf_nanoparticles.yaml"


def gauss_otsu(img: np.ndarray, sigma: float) -> np.ndarray:
    """Dark particles: Gaussian filter (``sigma`` px), below the Otsu threshold."""
    g = ndimage.gaussian_filter(img.astype(float), sigma)
    return g < threshold_otsu(g)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def candidate_rules(exact: np.ndarray, t_a: np.ndarray, inst: np.ndarray, mfp_a: float) -> dict[str, np.ndarray]:
    """Masks from the geometry of one frame: exact (H, W) bool, thickness t_a (Å), instance ids."""
    out = {"exact (t > 0)": exact}
    for s in (3, 5):
        out[f"exact blurred σ{s}, > 0.5"] = ndimage.gaussian_filter(exact.astype(float), s) >= 0.5
    for t_nm in (2, 4):
        out[f"thickness > {t_nm} nm"] = t_a > 10 * t_nm
    c = 1.0 - np.exp(-t_a / mfp_a)
    for s in (3, 5):
        g = ndimage.gaussian_filter(c, s)
        out[f"contrast σ{s}, Otsu"] = g > threshold_otsu(g)
        out[f"contrast σ{s}, half max"] = g > 0.5 * g.max()
    near = inst[tuple(ndimage.distance_transform_edt(inst == 0, return_distances=False, return_indices=True))]
    g = ndimage.gaussian_filter(c, 1.5)
    peak = np.asarray(ndimage.maximum(g, near, index=np.arange(near.max() + 1)))
    for fr in (0.35, 0.5):
        out[f"contrast σ1.5, {fr} × particle peak"] = g > fr * peak[near]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="synthetic frames (default 40)")
    ap.add_argument("--sigma", type=float, default=5.0, help="Gaussian of the mask rule, px (default 5)")
    args = ap.parse_args()

    from twin.generate import build_pipeline
    from twin.recipe import load_recipe

    pipe = build_pipeline(load_recipe(RECIPE)[0], RECIPE.parent)[0]
    scores: dict[str, list[tuple[float, float]]] = {}
    step = max(1, pipe.recipe.samples // args.n)
    for i in range(0, step * args.n, step):
        s = pipe.generate(i)
        spec = pipe.specimen_of(pipe.specimen_id(i))
        ox, oy = s.params["view"]["offset_px"]
        h, w = s.image.shape
        t_a = spec.t_particle_a[oy:oy + h, ox:ox + w]
        exact = s.labels["particle"].astype(bool)
        if not np.array_equal(t_a > 0, exact):
            raise RuntimeError("thickness window does not match the label")
        ref = gauss_otsu(s.image, args.sigma)
        for name, m in candidate_rules(exact, t_a, spec.instance[oy:oy + h, ox:ox + w], spec.mfp_particle_a).items():
            scores.setdefault(name, []).append((iou(m, ref), m.sum() / max(ref.sum(), 1)))
    print(f"{args.n} synthetic frames; reference: Gaussian σ {args.sigma:g} + Otsu of each frame")
    print(f"{'rule':40s} {'IoU mean':>9s} {'IoU min':>8s} {'area ratio':>11s}")
    for name, v in scores.items():
        a = np.array(v)
        print(f"{name:40s} {a[:, 0].mean():9.3f} {a[:, 0].min():8.3f} {a[:, 1].mean():11.3f}")


if __name__ == "__main__":
    main()
