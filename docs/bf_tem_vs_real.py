"""Make docs/bf_tem_vs_real.png: `twin preview` of the BF-TEM recipe above real BF-TEM frames.

Top: ``twin preview`` (twin.preview.preview_montage) of 4 samples of
``recipes/tem_bf_nanoparticles.yaml`` (one per specimen; row 2 with the exact ``instance`` outlines
in cyan).  Bottom: 4 frames of ../shared/data/real/tem-nanoparticles (CC-BY-4.0, msa-em/
microscopy-seg-track; "Deep Learning Applications in Microscopy: Segmentation and Tracking",
Elemental Microscopy, DOI 10.69761/HDTA8338), same stretch, their mask outlines in cyan.
Whole 512x512 frames are resized to the tiles, so both sets are shown at the same scale.
Also prints the statistics quoted in the recipe's comments (real vs synthetic).

Usage::

    python docs/bf_tem_vs_real.py [--n-stats 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real" / "tem-nanoparticles"
RECIPE = ROOT / "recipes" / "tem_bf_nanoparticles.yaml"
TILE, N = 224, 4


def _outline(mask: np.ndarray) -> np.ndarray:
    e = np.zeros(mask.shape, bool)
    e[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    e[1:, :] |= mask[1:, :] != mask[:-1, :]
    return e


def _block(images, masks) -> Image.Image:
    from twin.preview import stretch

    canvas = Image.new("RGB", (N * TILE + (N + 1) * 4, 2 * TILE + 12), (30, 30, 30))
    for k, (img, m) in enumerate(zip(images, masks)):
        g = np.repeat(stretch(img)[..., None], 3, axis=-1)
        o = g.copy()
        o[_outline(m)] = (0, 220, 255)
        for row, arr in enumerate((g, o)):
            canvas.paste(Image.fromarray(arr).resize((TILE, TILE), Image.Resampling.BILINEAR),
                         (4 + k * (TILE + 4), 4 + row * (TILE + 4)))
    return canvas


def background_stats(im: np.ndarray, mask: np.ndarray) -> dict:
    """Coverage, background contrast, particle/background ratio and the background PSD profile."""
    im = im.astype(np.float64)
    bg = ~ndimage.binary_dilation(mask, iterations=8)
    x = im - ndimage.gaussian_filter(im, 20)
    win = np.hanning(64)[:, None] * np.hanning(64)[None]
    acc, n = 0.0, 0
    for r in range(0, im.shape[0] - 64, 32):
        for c in range(0, im.shape[1] - 64, 32):
            if bg[r:r + 64, c:c + 64].all():
                p = x[r:r + 64, c:c + 64]
                acc = acc + np.abs(np.fft.fft2((p - p.mean()) * win)) ** 2
                n += 1
    k = np.hypot(np.fft.fftfreq(64)[:, None], np.fft.fftfreq(64)[None])
    edges = [0.0, 0.03, 0.06, 0.1, 0.15, 0.2, 0.3, 0.5]
    idx = np.digitize(k.ravel(), edges)
    psd = np.array([np.ravel(acc)[idx == j].mean() if n else 0.0 for j in range(1, len(edges))])
    lab, nc = ndimage.label(mask)
    diam = 2 * np.sqrt(np.bincount(lab.ravel())[1:] / np.pi)
    return {"coverage": mask.mean(), "n_particles": nc, "diam": diam,
            "bg_cv": im[bg].std() / im[bg].mean(), "particle_rel": im[mask].mean() / im[bg].mean(),
            "psd": psd / max(psd.max(), 1e-30)}


def _summary(rows) -> str:
    d = np.concatenate([r["diam"] for r in rows])
    return (f"coverage {np.mean([r['coverage'] for r in rows]):.3f}, particles/frame "
            f"{np.mean([r['n_particles'] for r in rows]):.1f}, diameter px p10/25/50/75/90 "
            f"{np.round(np.percentile(d, [10, 25, 50, 75, 90])).astype(int).tolist()}, "
            f"bg std/mean {np.mean([r['bg_cv'] for r in rows]):.3f}, particle/bg "
            f"{np.mean([r['particle_rel'] for r in rows]):.3f}, PSD "
            f"{np.round(np.mean([r['psd'] for r in rows], axis=0), 3).tolist()}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-stats", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bf_tem_vs_real.png"))
    a = ap.parse_args(argv)

    from twin.dataset import open_dataset
    from twin.generate import build_pipeline, generate_dataset
    from twin.preview import preview_montage
    from twin.recipe import load_recipe

    recipe, _ = load_recipe(RECIPE)
    pipe, _ = build_pipeline(recipe, RECIPE.parent)
    step = recipe.samples_per_specimen
    with tempfile.TemporaryDirectory() as d:
        h5 = generate_dataset(RECIPE, Path(d) / "bf.h5", n=N, workers=1, progress=False)
        preview = Image.open(preview_montage(h5, Path(d) / "preview.png", n=N, tile=TILE))
        preview.load()
        with open_dataset(h5) as ds:
            masks = [ds[k]["labels"]["instance"] for k in range(N)]
    # `twin preview` draws grain_id/boundary overlays; draw the instance outlines on its row 2
    syn = np.array(preview.convert("RGB"))
    for k, m in enumerate(masks):
        edge = np.array(Image.fromarray(_outline(m).astype(np.uint8) * 255).resize(
            (TILE, TILE), Image.Resampling.BILINEAR)) > 60
        tile = syn[TILE + 8:2 * TILE + 8, 4 + k * (TILE + 4):4 + k * (TILE + 4) + TILE]
        tile[edge] = (0, 220, 255)
    syn_img = Image.fromarray(syn)

    names = [0, 5, 10, 15]
    real_im = [np.array(Image.open(REAL / "images" / f"image_{i}.png"))[..., 0] for i in names]
    real_m = [np.array(Image.open(REAL / "masks" / f"image_{i}.png"))[..., 0] > 127 for i in names]
    real_img = _block(real_im, real_m)

    bar = 22
    fig = Image.new("RGB", (syn_img.width, syn_img.height + real_img.height + 2 * bar),
                    (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    draw.text((6, 5), "synthetic: twin preview of recipes/tem_bf_nanoparticles.yaml "
                      "(row 2: exact instance outlines)", fill=(0, 0, 0))
    fig.paste(syn_img, (0, bar))
    draw.text((6, syn_img.height + bar + 5), "real: shared/data/real/tem-nanoparticles "
              "images 0, 5, 10, 15 (CC-BY-4.0, DOI 10.69761/HDTA8338; row 2: mask outlines)",
              fill=(0, 0, 0))
    fig.paste(real_img, (0, syn_img.height + 2 * bar))
    fig.convert("P", palette=Image.Palette.ADAPTIVE, colors=96).save(a.out, optimize=True)
    print(f"wrote {a.out}")

    real_rows = []
    for i in range(20):
        im = np.array(Image.open(REAL / "images" / f"image_{i}.png"))[..., 0]
        m = np.array(Image.open(REAL / "masks" / f"image_{i}.png"))[..., 0] > 127
        real_rows.append(background_stats(im, m))
    syn_rows = []
    for k in range(a.n_stats):
        s = pipe.generate(k * step)  # one sample per specimen
        img = s.image.astype(np.float64) - pipe.instrument.detector.offset
        syn_rows.append(background_stats(img, s.labels["particle"].astype(bool)))
    print("real:     ", _summary(real_rows))
    print("synthetic:", _summary(syn_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
