"""Small data for the SDK tests: a synthetic dataset from the shipped recipe, a fake real folder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TBM = ROOT.parent / "shared" / "data" / "real" / "tbm-grains"


def small_recipe(tmp: Path, size: int = 96, samples: int = 8, specimens: int = 4,
                 grains: tuple[int, int] = (15, 40)) -> Path:
    """The shipped SEM grain recipe at a small size (fast to generate and train on)."""
    text = (ROOT / "recipes" / "sem_voronoi_grains.yaml").read_text()
    text = re.sub(r"^size: .*$", f"size: [{size}, {size}]", text, flags=re.M)
    text = re.sub(r"^samples: .*$", f"samples: {samples}", text, flags=re.M)
    text = re.sub(r"^specimens: .*$", f"specimens: {specimens}", text, flags=re.M)
    text = re.sub(r"^  grains_per_field: .*$", f"  grains_per_field: [{grains[0]}, {grains[1]}]", text, flags=re.M)
    out = tmp / "small.yaml"
    out.write_text(text)
    return out


def make_synthetic(tmp: Path, **kw) -> Path:
    from twin.generate import generate_dataset

    return generate_dataset(small_recipe(tmp, **kw), tmp / "syn.h5", progress=False)


def make_real_folder(tmp: Path, dataset: Path, groups: tuple[str, ...] = ("a", "b", "c", "d"),
                     per_group: int = 2) -> Path:
    """A folder like ``../shared/data/real/tbm-grains``: RGB images, 0/255 masks, ``<group>-<r>-<c>.png``.

    Images are synthetic grains tinted per grain (colour contrast), masks the boundary label.
    """
    from PIL import Image

    from twin.dataset import open_dataset

    root = tmp / "real"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    with open_dataset(dataset) as ds:
        k = 0
        for g in groups:
            for j in range(per_group):
                i = k % len(ds)
                ids = ds.label("grain_id", i)
                img = ds.image(i).astype(np.float32)
                img = (img - img.min()) / max(np.ptp(img), 1)
                tint = rng.uniform(0.3, 1.0, size=(int(ids.max()) + 1, 3))
                rgb = (img[..., None] * tint[ids] * 255).astype(np.uint8)
                name = f"{g}-0-{64 * j}.png"
                Image.fromarray(rgb).save(root / "images" / name)
                Image.fromarray((ds.label("boundary", i) > 0).astype(np.uint8) * 255).save(root / "masks" / name)
                k += 1
    return root
