"""Benchmark the SDK's DataLoader: HDF5 crops with augmentation vs the same images from PNG files.

In one run it

1. generates ``--n`` samples of the shipped SEM grain recipe (``--size``² px, default 512²) into an
   emtwin HDF5 file (or takes ``--dataset``),
2. writes the same images as 16-bit grey PNGs and the boundary labels as 8-bit PNG masks,
3. times ``DataLoader(batch_size=--batch, shuffle=True, num_workers=--workers)`` over
   ``sdk.data.SyntheticDataset`` (HDF5) and ``sdk.data.RealDataset`` (PNG folders), both with
   ``--crop``² random crops, percentile normalisation and the same ``sdk.augment`` pipeline
   (default physics, medium strength, the file's instrument noise model), and the same two without
   augmentation,
4. times training steps of a ~2 M-parameter U-Net (``sdk.models``) at the same crop size, so the
   loader rate can be read against what it has to feed.

Rates are samples/s over ``--items`` samples per epoch, median of ``--repeats`` epochs; "steady"
leaves out the first batch (worker start-up and first file opening), "epoch" includes it.

Usage::

    python bench/loader.py [--n 32] [--size 512] [--crop 256] [--workers 2] [--batch 8]
                           [--items 256] [--repeats 3] [--dataset FILE] [--no-unet]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from sdk.augment import Physics, build_pipeline  # noqa: E402
from sdk.data import RealDataset, SyntheticDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def make_dataset(out: Path, n: int, size: int) -> Path:
    """The shipped recipe at ``size``² px, ``n`` samples."""
    import re

    from twin.generate import generate_dataset

    text = (ROOT / "recipes" / "sem_voronoi_grains.yaml").read_text()
    text = re.sub(r"^size: .*$", f"size: [{size}, {size}]", text, flags=re.M)
    recipe = out.parent / "bench_recipe.yaml"
    recipe.write_text(text)
    return generate_dataset(recipe, out, n=n, progress=False)


def export_png(h5: Path, folder: Path) -> Path:
    """Images as 16-bit grey PNG, boundary masks as 0/255 8-bit PNG, ``<specimen>-<i>.png``."""
    from PIL import Image

    from twin.dataset import open_dataset

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    with open_dataset(h5) as ds:
        groups = ds.specimen_ids()
        for i in range(len(ds)):
            name = f"{groups[i]}-{i:04d}.png"
            Image.fromarray(ds.image(i).astype(np.uint16)).save(folder / "images" / name)
            Image.fromarray((ds.label("boundary", i) > 0).astype(np.uint8) * 255).save(folder / "masks" / name)
    return folder


def time_loader(dataset, items: int, batch: int, workers: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median samples/s over ``repeats`` epochs of ``items`` samples (fresh workers each epoch)."""
    idx = (np.arange(items) % len(dataset)).tolist()
    sub = Subset(dataset, idx)
    steady, whole = [], []
    for r in range(repeats):
        loader = DataLoader(sub, batch_size=batch, shuffle=True, num_workers=workers,
                            generator=torch.Generator().manual_seed(seed + r))
        t0 = time.perf_counter()
        t1 = None
        n_after = 0
        for k, (x, y) in enumerate(loader):
            if k == 0:
                t1 = time.perf_counter()
            else:
                n_after += len(x)
        t2 = time.perf_counter()
        whole.append(items / (t2 - t0))
        steady.append(n_after / (t2 - t1) if n_after else float("nan"))
    return {"steady": statistics.median(steady), "epoch": statistics.median(whole)}


def unet_rate(crop: int, batch: int, steps: int = 3) -> tuple[float, int] | None:
    """Training samples/s of a ~2 M-parameter U-Net (sdk.models), or None if unavailable."""
    try:
        from sdk.models import build_model, count_parameters, unet_config
    except ImportError:
        return None
    torch.manual_seed(0)
    model = build_model(unet_config(in_channels=1, num_classes=2, depth=4, width=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch, 1, crop, crop)
    y = torch.randint(0, 2, (batch, crop, crop))
    times = []
    for s in range(steps + 1):
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s:  # the first step warms up allocations
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times), count_parameters(model)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="samples to generate (default 32)")
    ap.add_argument("--size", type=int, default=512, help="generated image size, px (default 512)")
    ap.add_argument("--crop", type=int, default=256, help="crop size, px (default 256)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    ap.add_argument("--items", type=int, default=256, help="samples per timed epoch (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs; the median is shown")
    ap.add_argument("--dataset", help="use this emtwin HDF5 file instead of generating one")
    ap.add_argument("--no-unet", action="store_true", help="skip the U-Net training-rate reference")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="emtwin-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        h5 = Path(args.dataset) if args.dataset else make_dataset(tmp / "bench.h5", args.n, args.size)
        png = export_png(h5, tmp / "png")
        setup = time.perf_counter() - t0
        transform = build_pipeline(Physics(), strength="medium", noise_model=str(h5))
        common = dict(crop=args.crop, channels=1, normalize="percentile")
        cases = [
            ("HDF5 + augment", SyntheticDataset(h5, label="boundary", transform=transform, **common)),
            ("PNG  + augment", RealDataset(png, transform=transform, **common)),
            ("HDF5, no augment", SyntheticDataset(h5, label="boundary", **common)),
            ("PNG,  no augment", RealDataset(png, **common)),
        ]
        n_img = len(cases[0][1])
        print(f"# bench/loader.py: {n_img} images of {args.size}x{args.size} px -> random {args.crop}x"
              f"{args.crop} crops, batch {args.batch}, {args.workers} workers, {args.items} samples per "
              f"epoch, median of {args.repeats} (setup {setup:.1f} s)")
        print(f"# augmentation: {' -> '.join(type(t).__name__ for t in transform.transforms)}")
        rates = {}
        for name, ds in cases:
            rates[name] = time_loader(ds, args.items, args.batch, args.workers, args.repeats)
        print(f"{'loader':<18} {'samples/s (steady)':>19} {'samples/s (epoch)':>18} {'x PNG':>6}")
        for name, r in rates.items():
            ref = rates["PNG  + augment" if "augment" in name and "no" not in name else "PNG,  no augment"]
            print(f"{name:<18} {r['steady']:>19.1f} {r['epoch']:>18.1f} {r['steady'] / ref['steady']:>6.2f}")
        if not args.no_unet:
            res = unet_rate(args.crop, args.batch)
            if res is None:
                print("U-Net reference: sdk.models not available")
            else:
                rate, n_par = res
                feed = rates["HDF5 + augment"]["steady"]
                print(f"U-Net training ({n_par / 1e6:.2f} M parameters, {args.crop}^2, batch {args.batch}, "
                      f"main process): {rate:.1f} samples/s -> the HDF5 loader delivers {feed / rate:.0f}x "
                      "what training consumes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
