"""Preview montage: images (percentile-stretched) with their label overlays, as a PNG."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from twin.dataset import open_dataset

__all__ = ["preview_montage", "stretch"]


def stretch(image: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> np.ndarray:
    """Percentile stretch of an image (H, W) or (H, W, C) to uint8."""
    im = np.asarray(image, dtype=np.float64)
    a, b = np.percentile(im, [lo, hi])
    if b <= a:
        b = a + 1.0
    return (np.clip((im - a) / (b - a), 0, 1) * 255).astype(np.uint8)


def _outlines(grain_id: np.ndarray) -> np.ndarray:
    edge = np.zeros(grain_id.shape, dtype=bool)
    edge[:, 1:] |= grain_id[:, 1:] != grain_id[:, :-1]
    edge[1:, :] |= grain_id[1:, :] != grain_id[:-1, :]
    return edge


def preview_montage(path: str | Path, out: str | Path, n: int = 4, tile: int = 256) -> Path:
    """Write a montage: row 1 the images, row 2 the images with labels overlaid.

    Boundary labels are drawn in red, grain-id outlines (4-neighbour changes) in cyan.

    Parameters
    ----------
    path : dataset file
    out : PNG file
    n : number of samples shown (first ``n``)
    tile : side of each tile in px (images are resampled to it)
    """
    with open_dataset(path) as ds:
        n = max(1, min(n, len(ds)))
        canvas = Image.new("RGB", (n * tile + (n + 1) * 4, 2 * tile + 12), (30, 30, 30))
        for k in range(n):
            s = ds[k]
            img = s["image"]
            grey = stretch(img if img.ndim == 2 else img.mean(axis=-1))
            rgb = np.repeat(grey[..., None], 3, axis=-1) if img.ndim == 2 else stretch(img)
            over = rgb.copy()
            labels = s["labels"]
            if "grain_id" in labels:
                over[_outlines(labels["grain_id"])] = (0, 220, 255)
            if "boundary" in labels:
                m = labels["boundary"].astype(bool)
                over[m] = (0.45 * over[m] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
            for row, arr in enumerate((rgb, over)):
                im = Image.fromarray(arr).resize((tile, tile), Image.Resampling.NEAREST)
                canvas.paste(im, (4 + k * (tile + 4), 4 + row * (tile + 4)))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.png")
    try:
        canvas.save(tmp, format="PNG")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
