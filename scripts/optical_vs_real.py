"""docs/optical_vs_real.png: `twin preview` of recipes/optical_grains_color.yaml beside real crops.

Generates 4 samples of the optical recipe, renders them with :func:`twin.preview.preview_montage`
(the `twin preview` montage: images, then images with label overlays) and adds a row of 4 real
crops from ``../shared/data/real/tbm-grains`` (read in place, never copied).  Prints grain count
(connected components of non-boundary pixels), Heyn intercept (20 horizontal lines on the
skeletonised boundary map) and boundary fraction for the synthetic labels and the real masks.

Usage: python scripts/optical_vs_real.py [--real DIR] [--out docs/optical_vs_real.png] [-n 12]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.morphology import skeletonize

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real" / "tbm-grains"


def heyn_intercept(boundary: np.ndarray, lines: int = 20) -> float:
    """Mean distance (px) between boundary hits along ``lines`` horizontal lines (Heyn)."""
    sk = skeletonize(boundary.astype(bool))
    rows = np.linspace(0, sk.shape[0] - 1, lines + 2)[1:-1].astype(int)
    gaps = []
    for r in rows:
        hits = np.nonzero(sk[r, 1:] & ~sk[r, :-1])[0]
        if len(hits) >= 2:
            gaps.append(np.diff(hits).mean())
    return float(np.mean(gaps)) if gaps else float("nan")


def stats(boundaries) -> str:
    h = [heyn_intercept(b) for b in boundaries]
    g = [ndimage.label(~b.astype(bool))[1] for b in boundaries]
    f = [b.mean() for b in boundaries]
    return (f"grains/crop median {np.median(g):.0f}, Heyn intercept median {np.nanmedian(h):.1f} px, "
            f"boundary fraction median {np.median(f):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "optical_grains_color.yaml"))
    ap.add_argument("--real", default=str(REAL))
    ap.add_argument("--out", default=str(ROOT / "docs" / "optical_vs_real.png"))
    ap.add_argument("-n", type=int, default=12, help="synthetic samples for the statistics")
    args = ap.parse_args()

    from twin.generate import generate_dataset
    from twin.dataset import open_dataset
    from twin.preview import preview_montage

    real = Path(args.real)
    names = sorted(p.name for p in (real / "images").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        ds_path = generate_dataset(args.recipe, Path(tmp) / "optical.h5", n=max(4, args.n),
                                   workers=1, progress=False)
        montage = Image.open(preview_montage(ds_path, Path(tmp) / "preview.png", n=4, tile=256))
        montage.load()
        with open_dataset(ds_path) as ds:
            syn = [ds[i]["labels"]["boundary"] for i in range(len(ds))]
    masks = [np.asarray(Image.open(real / "masks" / n).convert("L")) > 128 for n in names]
    print(f"synthetic ({len(syn)}): {stats(syn)}")
    print(f"real      ({len(masks)}): {stats(masks)}")

    # 4 real crops from different micrographs
    picked, seen = [], set()
    for n in names:
        if n.split("-")[0] not in seen:
            seen.add(n.split("-")[0])
            picked.append(n)
        if len(picked) == 4:
            break
    tile, pad, label_h = 256, 4, 18
    w, h = montage.size
    canvas = Image.new("RGB", (w, h + tile + pad + 2 * label_h), (30, 30, 30))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 3), "synthetic: twin preview of recipes/optical_grains_color.yaml "
                      "(row 2: grain_id outlines cyan, 3.4 px boundary band red)", fill=(230, 230, 230))
    canvas.paste(montage, (0, label_h))
    y0 = label_h + h
    draw.text((6, y0 + 3), "real: ../shared/data/real/tbm-grains/images (" + ", ".join(picked) + ")",
              fill=(230, 230, 230))
    for k, n in enumerate(picked):
        im = Image.open(real / "images" / n).convert("RGB").resize((tile, tile))
        canvas.paste(im, (pad + k * (tile + pad), y0 + label_h))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
