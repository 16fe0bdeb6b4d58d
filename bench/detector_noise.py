"""Benchmark the detector kernel (Poisson shot noise + Gaussian readout + quantisation).

Times, in one run, the kernel before issue 2 (kept below as the baseline: one sequential SplitMix64
stream per row, Poisson by multiplication below λ = 10 and PTRS above with constants recomputed per
pixel, normal pairs by Marsaglia's polar method) against :func:`generators.detector.detect`
(counter-based numbers per pixel: a branch-free, vectorised first PTRS attempt and Ziggurat step
over a row, then a scalar pass over the few items not accepted at once), on
the expected signal of a real ``recipes/sem_voronoi_grains.yaml`` sample, at the recipe's dose
range (50–200 e⁻/px) and the generic-sem detector (gain 4, readout 6 counts, offset 200).
Prints ns/pixel (wall clock and CPU) of both, and their ratio, for 1 thread and all Numba threads.

Usage::

    python bench/detector_noise.py [--size 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange, uint64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generators._rng import stream_start  # noqa: E402  (unchanged by issue 2)
from generators.detector import detect  # noqa: E402

# ------------------------------------------------------------------ baseline (before issue 2)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_INV53 = 1.0 / 9007199254740992.0


@njit(inline="always")
def _old_mix(z):
    z = (z ^ (z >> uint64(30))) * _M1
    z = (z ^ (z >> uint64(27))) * _M2
    return z ^ (z >> uint64(31))


@njit(inline="always")
def _old_uniform(state):
    state = state + _GOLDEN
    z = _old_mix(state)
    return float(np.int64(z >> uint64(11))) * _INV53, state


@njit(inline="always")
def _old_normal_pair(state):
    while True:
        u, state = _old_uniform(state)
        v, state = _old_uniform(state)
        u = 2.0 * u - 1.0
        v = 2.0 * v - 1.0
        q = u * u + v * v
        if 0.0 < q < 1.0:
            f = math.sqrt(-2.0 * math.log(q) / q)
            return u * f, v * f, state


@njit
def _old_poisson(state, lam):
    if lam <= 0.0:
        return 0, state
    if lam < 10.0:
        limit = math.exp(-lam)
        k = 0
        prod, state = _old_uniform(state)
        while prod > limit:
            k += 1
            u, state = _old_uniform(state)
            prod *= u
        return k, state
    slam = math.sqrt(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u, state = _old_uniform(state)
        v, state = _old_uniform(state)
        u -= 0.5
        us = 0.5 - abs(u)
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return int(k), state
        if k < 0.0 or (us < 0.013 and v > us):
            continue
        loglam = math.log(lam)
        invalpha = 1.1239 + 1.1328 / (b - 3.4)
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)) <= (
            -lam + k * loglam - math.lgamma(k + 1.0)
        ):
            return int(k), state


@njit(parallel=True)
def _old_detect_full_kernel(signal, dose, gain, readout, offset, vmax, key, row_off, col_off,
                            lag_a, out):
    h, w = signal.shape
    b = 1.0 - lag_a
    for r in prange(h):
        st = stream_start(key, r)
        z1 = 0.0
        y = dose * signal[r, 0]
        o_r = offset + row_off[r]
        for c in range(w):
            lam = dose * signal[r, c]
            ne, st = _old_poisson(st, lam)
            if lag_a > 0.0:
                y = lag_a * y + b * ne
            else:
                y = float(ne)
            v = gain * y + (o_r + col_off[c])
            if readout > 0.0:
                if c % 2 == 0:
                    z0, z1, st = _old_normal_pair(st)
                    v += readout * z0
                else:
                    v += readout * z1
            v = np.floor(v + 0.5)
            if v < 0.0:
                v = 0.0
            elif v > vmax:
                v = vmax
            out[r, c] = np.uint16(v)


def old_detect(signal, *, dose, gain, readout_sigma, offset, bit_depth, noise_key):
    """The baseline kernel with the arguments of :func:`generators.detector.detect`."""
    out = np.empty(signal.shape, dtype=np.uint16)
    h, w = signal.shape
    _old_detect_full_kernel(signal, float(dose), float(gain), float(readout_sigma), float(offset),
                            float(2**bit_depth - 1), np.uint64(noise_key), np.zeros(h),
                            np.zeros(w), 0.0, out)
    return out


# ------------------------------------------------------------------ signal and timing
def pipeline_signal(size: int) -> np.ndarray:
    """Expected signal (float32, after the PSF) of sample 0 of recipes/sem_voronoi_grains.yaml."""
    import generators.detector as det
    from twin.generate import build_pipeline
    from twin.recipe import parse_recipe

    root = Path(__file__).resolve().parents[1]
    text = (root / "recipes" / "sem_voronoi_grains.yaml").read_text(encoding="utf-8")
    text = text.replace("size: [512, 512]", f"size: [{size}, {size}]")
    captured = []
    orig = det.Detector.apply

    def capture(self, signal, params):
        captured.append(np.array(signal))
        return orig(self, signal, params)

    det.Detector.apply = capture
    try:
        build_pipeline(parse_recipe(text), None)[0].generate(0)
    finally:
        det.Detector.apply = orig
    return captured[0]


def ns_per_px(fn, signal, kw, repeats, block_s: float = 0.2):
    """Median wall-clock and CPU (all threads of the process) time per pixel, ns.

    Each of the ``repeats`` measurements times a block of calls lasting at least ``block_s``:
    Linux accounts another thread's CPU time to the process clock only at scheduler ticks, so
    timing one short multi-threaded call (~1 ms) undercounts its CPU time.
    """
    fn(signal, **kw)  # compile
    t = time.perf_counter()
    fn(signal, **kw)
    calls = max(1, int(block_s / max(time.perf_counter() - t, 1e-6)))
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn(signal, **kw)
        wall.append((time.perf_counter() - t) / calls)
        cpu.append((time.process_time() - c) / calls)
    return (statistics.median(wall) / signal.size * 1e9,
            statistics.median(cpu) / signal.size * 1e9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512, help="image side in px (default 512)")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls (median)")
    args = ap.parse_args()
    sig = pipeline_signal(args.size)
    print(f"signal: {sig.shape} {sig.dtype}, min/median/max {sig.min():.3f}/"
          f"{np.median(sig):.3f}/{sig.max():.3f}; equal to its left neighbour: "
          f"{np.mean(sig[:, 1:] == sig[:, :-1]):.0%}")
    old_threads = numba.get_num_threads()
    print("ns/pixel, wall clock and CPU (summed over threads); old/new: ratio of the CPU times")
    print(f"{'dose e-/px':>10} {'threads':>7} {'old wall':>9} {'new wall':>9} {'old cpu':>8} "
          f"{'new cpu':>8} {'old/new':>8}")
    try:
        for dose in (50.0, 100.0, 200.0):
            kw = dict(dose=dose, gain=4.0, readout_sigma=6.0, offset=200.0, bit_depth=16,
                      noise_key=12345)
            for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
                numba.set_num_threads(threads)
                w_old, c_old = ns_per_px(old_detect, sig, kw, args.repeats)
                w_new, c_new = ns_per_px(detect, sig, kw, args.repeats)
                print(f"{dose:10.0f} {threads:7d} {w_old:9.1f} {w_new:9.1f} {c_old:8.1f} "
                      f"{c_new:8.1f} {c_old / c_new:8.2f}")
    finally:
        numba.set_num_threads(old_threads)


if __name__ == "__main__":
    main()
