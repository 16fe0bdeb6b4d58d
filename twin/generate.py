"""Generate a dataset file from a recipe (the work behind ``twin generate``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from twin.dataset import DatasetWriter
from twin.instrument import load_instrument
from twin.pipeline import SEMGrainPipeline
from twin.recipe import Recipe, load_recipe, parse_recipe, recipe_sha256

__all__ = ["build_pipeline", "generate_dataset"]


def build_pipeline(recipe: Recipe, recipe_dir: Path | None = None,
                   seed: int | None = None) -> tuple[SEMGrainPipeline, str]:
    """Pipeline for a validated recipe, and the instrument profile text."""
    instrument, instrument_text = load_instrument(recipe.instrument, base_dir=recipe_dir)
    return SEMGrainPipeline(recipe, instrument, root_seed=seed), instrument_text


def generate_dataset(
    recipe_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n: int | None = None,
    seed: int | None = None,
    compression: str | None = None,
    progress: bool | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> Path:
    """Generate ``n`` samples (default: the recipe's ``samples``) into an HDF5 dataset.

    The file is written under a temporary name and renamed when complete: an error or an
    interruption leaves no file at ``out``.

    Parameters
    ----------
    recipe_path : path
        YAML recipe.
    out : path
        Output ``.h5`` file.
    n : int, optional
        Number of samples (overrides the recipe's ``samples``; specimen grouping is unchanged).
    seed : int, optional
        Root seed (overrides the recipe's ``seed``).
    compression : {"lz4", "gzip", "none"}, optional
        Overrides the recipe's ``output.compression``.
    progress : bool, optional
        Show a progress bar (default: when stderr is a terminal).

    Returns
    -------
    Path of the written file.
    """
    recipe, text = load_recipe(recipe_path)
    if n is not None and n < 1:
        from twin.errors import RecipeError

        raise RecipeError(f"-n must be >= 1, got {n}")
    n_samples = recipe.samples if n is None else int(n)
    pipe, instrument_text = build_pipeline(recipe, Path(recipe_path).parent, seed)
    attrs = {
        "recipe": text,
        "recipe_sha256": recipe_sha256(text),
        "recipe_name": recipe.name,
        "root_seed": pipe.root_seed,
        "instrument": instrument_text,
        "instrument_name": pipe.instrument.name,
        "pixel_size": recipe.pixel_size.value,
        "pixel_size_unit": recipe.pixel_size.unit,
        "generator": "sem-voronoi-grains",
        "samples_per_specimen": recipe.samples_per_specimen,
    }
    h, w = recipe.size
    if progress is None:
        progress = sys.stderr.isatty()
    from tqdm import tqdm

    with DatasetWriter(
        out, n_samples=n_samples, image_shape=(h, w), image_dtype="uint16",
        labels=pipe.label_specs, attrs=attrs,
        compression=compression or recipe.output.compression,
    ) as writer:
        for i in tqdm(range(n_samples), desc=f"generating {Path(out).name}", unit="sample",
                      disable=not progress, file=sys.stderr):
            s = pipe.generate(i)
            writer.write(i, s.image, s.labels, specimen_id=s.specimen_id, index=s.index,
                         params=s.params)
            if on_sample is not None:
                on_sample(i)
    return Path(out)


def regenerate_sample(recipe_text: str, index: int, seed: int | None = None):
    """Regenerate one sample from recipe text (e.g. a dataset's ``recipe`` attr)."""
    recipe = parse_recipe(recipe_text)
    pipe, _ = build_pipeline(recipe, None, seed)
    return pipe.generate(index)
