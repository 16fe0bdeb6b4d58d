"""TEM twin speed (issue 5): HRTEM with exit-wave reuse, and (bench/tem_bf.py) mesoscale BF-TEM.

HRTEM: seconds per image for a 10 x 10 nm field with one ~3 nm Au particle on 2 nm of amorphous
carbon, simulated at <= 0.05 Å (256 x 256 px image at 0.39 Å, 2048 x 2048 simulation grid):

- **direct**: a direct per-image abTEM call (abTEM's default settings, after one untimed
  warm-up image), as a user writes it — Potential, PlaneWave
  multislice, CTF (new defocus per image), intensity, computed — on the same atoms, repeated;
- **emtwin**: ``AtomicTEMPipeline.generate`` over K = 10 samples of one specimen (one exit wave
  serves the K draws of defocus, Cs and dose, plus camera MTF and detector noise per image).

It prints both and their ratio (target ≥ 5x more images per second), then calls
``bench_bf()`` from ``bench/tem_bf.py`` when that module is importable.

Usage::

    python bench/tem.py [--quick] [--direct-n 2] [--k 10] [--no-bf]

``--quick`` halves the field side (5 x 5 nm, 1024² grid) for a fast look; the issue's numbers are
the full-size ones.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RECIPE = """
name: bench-hrtem
size: [{n}, {n}]
pixel_size: {{value: 0.390625, unit: Å}}
samples: {k}
specimens: 1
seed: 11
specimen:
  kind: atomic-nanoparticles
  element: Au
  shapes: {{octahedron: 1, decahedron: 0, icosahedron: 0}}
  diameter_nm: [{d}, {d}]
  particles_per_field: [1, 1]
  support: {{thickness_nm: [2.0, 2.0]}}
imaging: {{mode: hrtem, sampling_a: 0.05, slice_thickness_a: 2.0, fft: {fft}}}
"""


def bench_hrtem(quick: bool = False, k: int = 10, direct_n: int = 2) -> dict:
    """Seconds per HRTEM image: direct abTEM per image vs emtwin with exit-wave reuse (K=k)."""
    import abtem
    import numpy as np

    from twin.instrument import load_instrument
    from twin.pipeline_tem import AtomicTEMPipeline
    from twin.recipe import parse_recipe

    n = 128 if quick else 256
    d = 2.0 if quick else 3.0
    recipe = parse_recipe(RECIPE.format(n=n, k=k, d=d, fft="numpy"))
    inst, _ = load_instrument(recipe.instrument)
    pipe = AtomicTEMPipeline(recipe, inst)
    spec = pipe.spec.sample(np.random.default_rng(0))  # atoms for the direct call
    atoms = spec.to_ase()
    f = pipe.factor
    gpts = (n * f, n * f)
    print(f"HRTEM field {n * pipe.pixel_size_a / 10:.1f} nm, {len(atoms)} atoms "
          f"({spec.params['particles'][0]['n_atoms']} Au, "
          f"{spec.params['particles'][0]['diameter_a'] / 10:.2f} nm), grid {gpts[0]}², "
          f"sampling {pipe.sampling_a:.4f} Å, {pipe.factor}x{pipe.factor} binning")

    rng = np.random.default_rng(1)

    def direct_image():
        pot = abtem.Potential(atoms, gpts=gpts, slice_thickness=2.0, projection="infinite",
                              parametrization="lobato")
        ctf = abtem.CTF(defocus=float(rng.uniform(-100, 100)), Cs=1.2e7, focal_spread=42.4,
                        angular_spread=0.5, energy=300e3)
        img = abtem.PlaneWave(energy=300e3).multislice(pot).apply_ctf(ctf).intensity().compute()
        _ = np.asarray(img.array).reshape(n, f, n, f).mean(axis=(1, 3))
        del pot, img

    direct = {}
    # abTEM's default FFT (FFTW, timed plans) and NumPy's FFT, which emtwin uses for bit-identical
    # datasets whatever the worker count (generators/tem/hrtem.py ABTEM_SETTINGS)
    for backend in ("fftw", "numpy"):
        with abtem.config.set({"diagnostics.progress_bar": False, "fft": backend}):
            direct_image()  # warm-up (FFT plans, caches): not timed
            t0 = time.perf_counter()
            for _ in range(direct_n):
                direct_image()
            direct[backend] = (time.perf_counter() - t0) / direct_n

    def emtwin(fft: str) -> tuple[float, float, float]:
        p = AtomicTEMPipeline(parse_recipe(RECIPE.format(n=n, k=k, d=d, fft=fft)), inst)
        t0 = time.perf_counter()
        first = None
        for i in range(k):
            p.generate(i)
            if i == 0:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        return first, (total - first) / max(k - 1, 1), total / k

    res = {}
    for fft in ("numpy", "fftw"):
        first, reuse, per = emtwin(fft)
        res[fft] = {"first_s": first, "reuse_s": reuse, "per_s": per, "ratio": direct[fft] / per}
        name = "NumPy FFT, bit-identical across processes (default)" if fft == "numpy" else "FFTW (imaging.fft: fftw)"
        print(f"emtwin, {name}:")
        print(f"  direct abTEM per image, same FFT: {direct[fft]:8.3f} s  ({direct_n} images)")
        print(f"  exit wave + first image:          {first:8.3f} s")
        print(f"  each further draw:                {reuse:8.3f} s")
        print(f"  per image at K={k}:               {per:8.3f} s")
        print(f"  ratio (images/s emtwin / direct): {direct[fft] / per:8.2f}x  (target >= 5x)"
              + ("  [--quick: 5 x 5 nm field]" if quick else ""))
    print(f"default emtwin vs abTEM's default (FFTW) direct call: {direct['fftw'] / res['numpy']['per_s']:.2f}x")
    return {"direct_s": direct, "emtwin": res, "k": k, "quick": quick}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 x 5 nm field instead of 10 x 10 nm")
    ap.add_argument("--k", type=int, default=10, help="samples per exit wave")
    ap.add_argument("--direct-n", type=int, default=2, help="direct abTEM images to time")
    ap.add_argument("--no-bf", action="store_true", help="skip the BF-TEM part")
    a = ap.parse_args(argv)
    bench_hrtem(quick=a.quick, k=a.k, direct_n=a.direct_n)
    if not a.no_bf:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        try:
            from tem_bf import bench_bf
        except ImportError as exc:  # F's part not there
            print(f"BF-TEM bench not available: {exc}")
        else:
            print()
            bench_bf()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
