"""Cost of grain-growth and 3D-section specimens against the plain Voronoi tessellation, one run.

Prints, for one ``--size`` field (specimen ``--scale`` fields wide):

* specimen draw time: ``VoronoiGrains.sample`` (baseline), ``PottsGrains.sample`` (Voronoi start +
  ``--steps`` Monte-Carlo steps, paid once per specimen) and ``Section3DGrains.sample``;
* ``label()`` time of one (slightly jittered) field at ``max_distance=--cap`` and at ``inf`` for
  each specimen, best of ``--repeat``, with the ratio to the Voronoi label.

Usage::

    python bench/potts.py [--size 512] [--grains 200] [--steps 100] [--scale 2] [--cap 8]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from generators.grains import VoronoiGrains
from generators.potts import PottsGrains
from generators.section3d import Section3DGrains


def _best(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--grains", type=int, default=200)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--cap", type=float, default=8.0)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    field = (a.size, a.size)
    g = (a.grains, a.grains)
    stages = {
        "voronoi": VoronoiGrains(field, grains_per_field=g, specimen_scale=a.scale),
        "potts": PottsGrains(field, grains_per_field=g, steps=(a.steps, a.steps),
                             specimen_scale=a.scale),
        "section3d": Section3DGrains(field, grains_per_field=g, specimen_scale=a.scale,
                                     tilt=(0.0, 30.0)),
    }
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: a.size, : a.size].astype(np.float64)
    x = xx + 17.3 + rng.normal(0, 0.3, xx.shape)
    y = yy + 5.1 + rng.normal(0, 0.3, yy.shape)
    for stage in stages.values():  # warm-up: Numba compilation
        spec, _ = stage.sample(np.random.default_rng(1))
        spec.label(x[:8, :8], y[:8, :8], max_distance=a.cap)
        spec.label(x[:8, :8], y[:8, :8])
    rows = {}
    for name, stage in stages.items():
        t0 = time.perf_counter()
        spec, params = stage.sample(np.random.default_rng(2))
        t_sample = time.perf_counter() - t0
        t0 = time.perf_counter()
        spec.label(x, y, max_distance=a.cap)  # first call: lazy per-specimen tables
        t_first = time.perf_counter() - t0
        t_cap = _best(lambda: spec.label(x, y, max_distance=a.cap), a.repeat)
        t_inf = _best(lambda: spec.label(x, y), a.repeat)
        rows[name] = (t_sample, t_first, t_cap, t_inf, params)
    base = rows["voronoi"]
    print(f"field {a.size}x{a.size} px, specimen x{a.scale:g}, {a.grains} grains/field, "
          f"Potts {a.steps} MCS, cap {a.cap:g} px")
    print(f"{'specimen':10s} {'sample s':>9s} {'1st label s':>11s} {'label(cap) ms':>14s} "
          f"{'ratio':>6s} {'label(inf) ms':>14s} {'ratio':>6s}")
    for name, (ts, tf, tc, ti, _) in rows.items():
        print(f"{name:10s} {ts:9.3f} {tf:11.3f} {1e3 * tc:14.1f} {tc / base[2]:6.2f} "
              f"{1e3 * ti:14.1f} {ti / base[3]:6.2f}")
    p = rows["potts"][4]
    print(f"potts: {p['n_grains']} start grains -> {p['surviving_grains']} after {p['steps']} MCS "
          f"on a {p['raster_shape'][0]}x{p['raster_shape'][1]} raster")


if __name__ == "__main__":
    main()
