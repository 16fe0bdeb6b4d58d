"""Benchmark the instrument twin (issue 3), both measurements in one run.

1. ``twin.calibrate.calibrate`` on one 2048x2048 synthetic SEM image (all estimates: photon
   transfer, lag, line jitter, PSF, vignetting), median and best of ``--repeats`` runs after a
   warm-up (target: under 2 s on 2 cores).
2. The per-sample cost of generation with the complete detector + scan chain (saturation, fixed
   pattern, lag, random-walk drift, mains, scan nonlinearity, Lorentzian-tailed PSF following the
   scan lines, vignetting) against the foundation pipeline (``generic-sem``), both measured here,
   printed as a ratio.  A middle row isolates the PSF that follows the scan lines (Gaussian).

Usage::

    python bench/calibrate.py [--size 2048] [--repeats 5] [--gen-size 512] [--samples 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twin.calibrate import calibrate  # noqa: E402
from twin.instrument import load_instrument, parse_instrument  # noqa: E402
from twin.pipeline import SEMGrainPipeline  # noqa: E402
from twin.recipe import parse_recipe  # noqa: E402

FULL = {
    "name": "bench-full", "kind": "sem",
    "detector": {"gain": 4.0, "readout_sigma": 6.0, "offset": 200.0, "bit_depth": 16,
                 "saturation": 60000, "fixed_pattern": {"row_sigma": 1.0, "col_sigma": 0.5},
                 "lag_px": 0.6},
    "scan": {"drift_px": 1.5, "line_jitter_px": 0.3, "drift_walk_px": 1.0, "dwell_time_s": 1e-6,
             "flyback_s": 1e-4, "mains": {"frequency_hz": 50, "amplitude_px": [0.3, 0.1]},
             "fast_nonlinearity": {"amplitude_px": 1.5, "decay_px": 20}},
    "optics": {"psf_sigma_px": [0.6, 1.2], "psf_kind": "lorentzian", "psf_tail_fraction": 0.1,
               "psf_tail_gamma_px": 2.0, "psf_follows_scan": True,
               "vignetting": {"xx": -0.1, "yy": -0.1}},
}


def recipe(size: int, n: int, grains: tuple[int, int] = (80, 300)):
    return parse_recipe(f"name: bench\nsize: [{size}, {size}]\nsamples: {n}\nspecimens: 1\n"
                        f"seed: 3\nspecimen: {{grains_per_field: [{grains[0]}, {grains[1]}]}}\n")


def time_generation(inst, size: int, n: int) -> float:
    pipe = SEMGrainPipeline(recipe(size, n + 1), inst)
    pipe.generate(0)  # warm-up: JIT caches, specimen
    t = time.perf_counter()
    for i in range(1, n + 1):
        pipe.generate(i)
    return (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen-size", type=int, default=512)
    ap.add_argument("--samples", type=int, default=12)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; numpy {np.__version__}")

    # 1. calibration time
    full = parse_instrument(yaml.safe_dump(FULL))
    scale = (args.size / 512) ** 2  # the grain size in px of the 512² recipe
    img = SEMGrainPipeline(recipe(args.size, 1, (int(80 * scale), int(300 * scale))),
                           full).generate(0).image
    calibrate([img[:256, :256]])  # warm-up (imports, FFT plans)
    ts = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        cal = calibrate([img])
        ts.append(time.perf_counter() - t)
    n = cal.noise
    print(f"\ncalibration of one {args.size}x{args.size} image ({args.repeats} runs): "
          f"median {statistics.median(ts):.2f} s, best {min(ts):.2f} s  (target < 2 s)")
    print(f"  estimates: gain {n.gain:.3g} ± {n.gain_stderr:.2g} (true 4), "
          f"lag {n.lag.lag_px:.2g} px (true 0.6), jitter {cal.jitter.sigma_px:.3g} ± "
          f"{cal.jitter.stderr:.2g} px (true 0.3), "
          f"PSF {cal.psf.sigma_px:.3g} ± {cal.psf.stderr:.2g} px [{cal.psf.method}; drawn in "
          "0.6-1.2]")

    # 2. generation cost of the complete chain vs the foundation
    base, _ = load_instrument("generic-sem")
    gauss_follow = parse_instrument(yaml.safe_dump(
        {**base.model_dump(mode="json", exclude_none=True),
         "optics": {"psf_sigma_px": [0.6, 1.2], "psf_follows_scan": True}}))
    rows = [("foundation (generic-sem)", base), ("+ PSF following the scan lines", gauss_follow),
            ("complete detector + scan chain", full)]
    res = [(name, time_generation(inst, args.gen_size, args.samples)) for name, inst in rows]
    ref = res[0][1]
    print(f"\ngeneration, {args.gen_size}x{args.gen_size}, {args.samples} samples each "
          "(per sample, after warm-up):")
    print(f"  {'pipeline':34s} {'ms/sample':>10s} {'ratio':>7s}")
    for name, t in res:
        print(f"  {name:34s} {1e3 * t:10.1f} {t / ref:7.2f}")


if __name__ == "__main__":
    main()
