"""Grain specimens: Voronoi/Laguerre tessellations drawn from a few physical knobs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from generators.voronoi import Tessellation, hardcore_seeds, lognormal_weights, poisson_seeds

__all__ = ["VoronoiGrains"]


@dataclass(frozen=True)
class VoronoiGrains:
    """Specimen stage drawing a (periodic) grain tessellation larger than the field of view.

    Parameters
    ----------
    field_shape : (H, W)
        Field of view in px.
    grains_per_field : (low, high)
        Mean number of grains in one field of view, drawn as an integer per specimen.
    seeds : {"poisson", "hardcore"}
        Seed process: uniform (Poisson–Voronoi) or with a minimum distance.
    min_distance : float
        Hard-core distance as a fraction of the mean seed spacing ``sqrt(area / n)``.
    weights : {"none", "lognormal"}
        Laguerre weights (``lognormal``: radii ~ LogNormal(0, weight_sigma)).
    weight_sigma : float
    periodic : bool
        Periodic specimen (no edge effects; fields may wrap).
    specimen_scale : float
        Specimen side / field side (≥ 1): fields of one specimen sample different regions.
    """

    field_shape: tuple[int, int]
    grains_per_field: tuple[int, int] = (80, 300)
    seeds: str = "poisson"
    min_distance: float = 0.5
    weights: str = "none"
    weight_sigma: float = 0.35
    periodic: bool = True
    specimen_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.seeds not in ("poisson", "hardcore"):
            raise ValueError(f"seeds must be 'poisson' or 'hardcore', got {self.seeds!r}")
        if self.weights not in ("none", "lognormal"):
            raise ValueError(f"weights must be 'none' or 'lognormal', got {self.weights!r}")
        if self.specimen_scale < 1:
            raise ValueError(f"specimen_scale must be >= 1, got {self.specimen_scale}")

    @property
    def extent(self) -> tuple[float, float]:
        """Specimen size (Lx, Ly) in px."""
        h, w = self.field_shape
        return (w * self.specimen_scale, h * self.specimen_scale)

    def sample(self, rng: np.random.Generator) -> tuple[Tessellation, dict]:
        """Draw one specimen.

        Returns
        -------
        tessellation : Tessellation
        params : dict
            ``n_grains`` (in the whole specimen), ``grains_per_field``, ``extent_px``.
        """
        lo, hi = self.grains_per_field
        per_field = int(rng.integers(lo, hi + 1))
        n = max(1, int(round(per_field * self.specimen_scale**2)))
        extent = self.extent
        spacing = math.sqrt(extent[0] * extent[1] / n)
        if self.seeds == "poisson":
            seeds = poisson_seeds(rng, n, extent)
        else:
            seeds = hardcore_seeds(
                rng, n, extent, self.min_distance * spacing, periodic=self.periodic
            )
        w = None
        if self.weights == "lognormal" and self.weight_sigma > 0:
            w = lognormal_weights(rng, n, spacing, self.weight_sigma)
        tess = Tessellation(seeds, extent, weights=w, periodic=self.periodic)
        return tess, {
            "n_grains": n,
            "grains_per_field": per_field,
            "extent_px": list(extent),
        }
