"""Benchmark the dataset file's compression options (twin.dataset.COMPRESSIONS).

Writes N synthetic-looking samples -- a 512x512 uint16 image with Poisson noise over
piecewise-constant grains, an int32 ``grain_id`` label and a uint8 ``boundary`` label -- with
:class:`twin.dataset.DatasetWriter` for each compression, reads them all back with
:func:`twin.dataset.open_dataset`, and prints samples/s, MB per sample and the ratio against gzip
measured in the same run.

"read" reads from the page cache (the file was just written); "cold read" first asks the kernel to
drop the file's cached pages (``posix_fadvise(DONTNEED)``, Linux), which is closer to reading a
dataset larger than memory.

Usage::

    python bench/compression.py [--n 64] [--size 512] [--repeats 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twin.dataset import COMPRESSIONS, DatasetWriter, LabelSpec, open_dataset  # noqa: E402

LABELS = {
    "grain_id": LabelSpec("int32", "instance", description="Voronoi grain index"),
    "boundary": LabelSpec("uint8", "boundary", classes=("interior", "boundary")),
}


def make_sample(seed: int, index: int, size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One synthetic micrograph: Voronoi grains, dark boundaries, blur and shot noise."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    n_grains = int(rng.integers(80, 300))
    seeds = rng.uniform(0, size, (n_grains, 2))
    yy, xx = np.mgrid[0:size, 0:size]
    _, grain = cKDTree(seeds).query(np.column_stack([yy.ravel(), xx.ravel()]), workers=-1)
    grain = grain.reshape(size, size).astype(np.int32)
    boundary = np.zeros((size, size), dtype=bool)
    boundary[:, 1:] |= grain[:, 1:] != grain[:, :-1]
    boundary[1:, :] |= grain[1:, :] != grain[:-1, :]
    level = rng.uniform(300.0, 3000.0, n_grains)
    signal = level[grain] * np.where(boundary, 0.6, 1.0)
    signal = ndimage.gaussian_filter(signal, 1.2)
    image = np.clip(rng.poisson(signal) + rng.normal(100.0, 8.0, signal.shape), 0, 65535)
    return image.astype(np.uint16), {"grain_id": grain, "boundary": boundary.astype(np.uint8)}


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (best effort, Linux only)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write(path: Path, samples, n: int, size: int, compression: str) -> float:
    t0 = time.perf_counter()
    with DatasetWriter(path, n_samples=n, image_shape=(size, size), image_dtype=np.uint16,
                       labels=LABELS, attrs={"bench": "compression"},
                       compression=compression) as w:
        for i in range(n):
            image, labels = samples[i % len(samples)]
            w.write(i, image, labels, specimen_id=i // 4, index=i, params={"i": i})
    return time.perf_counter() - t0


def read(path: Path) -> float:
    t0 = time.perf_counter()
    with open_dataset(path) as ds:
        total = 0
        for i in range(len(ds)):
            total += ds.image(i).nbytes
            for name in ds.label_names:
                total += ds.label(name, i).nbytes
    assert total > 0
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="samples per file (default 64)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    ap.add_argument("--distinct", type=int, default=8,
                    help="distinct synthetic samples, cycled to fill N (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per compression; median kept")
    ap.add_argument("--dir", default=None, help="where to write the files (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    samples = [make_sample(args.seed, k, args.size) for k in range(min(args.distinct, args.n))]
    print(f"generated {len(samples)} distinct {args.size}x{args.size} samples in "
          f"{time.perf_counter() - t0:.1f} s; N={args.n}, repeats={args.repeats}, "
          f"cpus={os.cpu_count()}")
    raw = sum(a.nbytes for a in (samples[0][0], *samples[0][1].values())) / 1e6

    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for _ in range(args.repeats):  # interleave compressions so drift hits all alike
            for comp in COMPRESSIONS:
                path = Path(tmp) / f"bench-{comp}.h5"
                tw = write(path, samples, args.n, args.size, comp)
                tr = read(path)
                drop_cache(path)
                tc = read(path)
                mb = path.stat().st_size / args.n / 1e6
                # check the bytes survived
                with open_dataset(path) as ds:
                    np.testing.assert_array_equal(ds.image(1), samples[1 % len(samples)][0])
                    np.testing.assert_array_equal(ds.label("grain_id", 1),
                                                  samples[1 % len(samples)][1]["grain_id"])
                r = results.setdefault(comp, {"write": [], "read": [], "cold": [], "mb": mb})
                r["write"].append(args.n / tw)
                r["read"].append(args.n / tr)
                r["cold"].append(args.n / tc)
                path.unlink()

    med = {c: {k: (statistics.median(v) if isinstance(v, list) else v) for k, v in r.items()}
           for c, r in results.items()}
    base = med["gzip"]
    print(f"uncompressed payload: {raw:.2f} MB/sample (image + grain_id + boundary)\n")
    head = (f"{'compression':<12}{'write/s':>9}{'read/s':>9}{'cold read/s':>13}{'MB/sample':>11}"
            f"{'write x gzip':>14}{'read x gzip':>13}{'cold x gzip':>13}{'size x gzip':>13}")
    print(head)
    print("-" * len(head))
    for comp in COMPRESSIONS:
        m = med[comp]
        print(f"{comp:<12}{m['write']:>9.0f}{m['read']:>9.0f}{m['cold']:>13.0f}{m['mb']:>11.3f}"
              f"{m['write'] / base['write']:>14.2f}{m['read'] / base['read']:>13.2f}"
              f"{m['cold'] / base['cold']:>13.2f}{m['mb'] / base['mb']:>13.2f}")


if __name__ == "__main__":
    main()
