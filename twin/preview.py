"""Preview montage: images (percentile-stretched) with their label overlays, as a PNG."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from twin.dataset import open_dataset

__all__ = ["preview_montage", "stretch"]


def stretch(image: np.ndarray, lo: float = 0.5, hi: float = 99.5, rows: int | None = None
            ) -> np.ndarray:
    """Percentile stretch of an image (H, W) or (H, W, C) to uint8 (percentiles of its first
    ``rows`` rows when given, e.g. the micrograph above a data bar)."""
    im = np.asarray(image, dtype=np.float64)
    a, b = np.percentile(im[:rows] if rows else im, [lo, hi])
    if b <= a:
        b = a + 1.0
    return (np.clip((im - a) / (b - a), 0, 1) * 255).astype(np.uint8)


def _outlines(grain_id: np.ndarray) -> np.ndarray:
    edge = np.zeros(grain_id.shape, dtype=bool)
    edge[:, 1:] |= grain_id[:, 1:] != grain_id[:, :-1]
    edge[1:, :] |= grain_id[1:, :] != grain_id[:-1, :]
    return edge


def _micrograph_rows(params: dict, height: int) -> int | None:
    """Rows above the sample's data bar (None: no bar): the stretch ignores the bar, drawn at
    fractions of the full count range while a micrograph may use a small part of it."""
    bar = ((params.get("features") or {}).get("artefacts") or {}).get("data_bar")
    if not isinstance(bar, dict) or not bar.get("rows"):
        return None
    return max(1, height - int(bar["rows"]))


_PHASE_COLOURS = ((40, 220, 60), (255, 150, 0), (60, 120, 255), (200, 200, 200))


def _tint(rgb: np.ndarray, mask: np.ndarray, colour, alpha: float) -> None:
    """Blend ``colour`` into ``rgb`` (H, W, 3 uint8) where ``mask``, in place."""
    if mask.any():
        rgb[mask] = ((1 - alpha) * rgb[mask] + alpha * np.array(colour)).astype(np.uint8)


def preview_montage(path: str | Path, out: str | Path, n: int = 4, tile: int = 256) -> Path:
    """Write a montage: row 1 the images, row 2 the images with labels overlaid.

    RGB images (H, W, 3) are shown in colour (one percentile stretch for all channels), grey
    images in grey.  Overlays: grain-id outlines (4-neighbour changes) in cyan, ``boundary`` in
    red, ``twin`` lamellae tinted magenta, ``twin_boundary`` in yellow, non-zero ``phase``
    classes tinted by class (green, orange, blue, ...).

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
            rows = _micrograph_rows(s.get("params") or {}, img.shape[0])
            grey = stretch(img if img.ndim == 2 else img.mean(axis=-1), rows=rows)
            rgb = (np.repeat(grey[..., None], 3, axis=-1) if img.ndim == 2
                   else stretch(img, rows=rows))
            over = rgb.copy()
            labels = s["labels"]
            if "grain_id" in labels:
                over[_outlines(labels["grain_id"])] = (0, 220, 255)
            if "phase" in labels:
                ph = labels["phase"]
                for c in range(1, int(ph.max()) + 1 if ph.size else 1):
                    _tint(over, ph == c, _PHASE_COLOURS[(c - 1) % len(_PHASE_COLOURS)], 0.45)
            if "twin" in labels:
                _tint(over, labels["twin"].astype(bool), (230, 40, 230), 0.3)
            if "boundary" in labels:
                _tint(over, labels["boundary"].astype(bool), (255, 40, 40), 0.55)
            if "twin_boundary" in labels:
                _tint(over, labels["twin_boundary"].astype(bool), (255, 230, 0), 0.6)
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
