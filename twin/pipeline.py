"""The SEM grain twin: recipe + instrument → samples (image, exact labels, drawn parameters).

Chain (DESIGN.md §1): Specimen (VoronoiGrains) → Scan (coordinate maps: drift, random walk, line
jitter, mains, nonlinearity) → Contrast (channelling + groove, labels from the same coordinates) →
Optics (Gaussian or Lorentzian-tailed PSF, vignetting) → Detector (Poisson–Gaussian, saturation,
fixed pattern, lag).  The optional parts come from the instrument profile (e.g. one written by
``twin calibrate``); a profile without them gives the basic chain's draws and bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from generators.detector import Detector
from generators.grains import VoronoiGrains
from generators.optics import GaussianPSF, LorentzianTailPSF, Vignetting
from generators.scan import ScanModel
from generators.sem import ChannellingContrast, boundary_label
from generators.voronoi import Tessellation
from twin.dataset import LabelSpec
from twin.instrument import Instrument
from twin.recipe import Recipe
from twin.seeding import sample_rng, specimen_rng

__all__ = ["Sample", "SEMGrainPipeline", "LABEL_SPECS"]

LABEL_SPECS = {
    "grain_id": LabelSpec(
        dtype="int32", kind="instance", classes=(),
        description="index of the grain (Voronoi/Laguerre seed) owning the pixel's specimen position",
    ),
    "boundary": LabelSpec(
        dtype="uint8", kind="boundary", classes=("grain", "boundary"),
        description="1 where the exact distance to a grain boundary is below boundary_width_px / 2",
    ),
}


@dataclass
class Sample:
    """One generated sample.

    Attributes
    ----------
    image : ndarray (H, W) uint16, detector counts
    labels : dict name → ndarray (H, W)
    specimen_id : int
    index : int
    params : dict, every drawn parameter (JSON-ready)
    """

    image: np.ndarray
    labels: dict[str, np.ndarray]
    specimen_id: int
    index: int
    params: dict[str, Any] = field(default_factory=dict)


class SEMGrainPipeline:
    """Generates sample ``i`` of a recipe, deterministically from (root seed, i).

    Parameters
    ----------
    recipe : Recipe
    instrument : Instrument
    root_seed : int, optional
        Overrides ``recipe.seed``.
    """

    def __init__(self, recipe: Recipe, instrument: Instrument, root_seed: int | None = None):
        self.recipe = recipe
        self.instrument = instrument
        self.root_seed = int(recipe.seed if root_seed is None else root_seed)
        h, w = recipe.size
        sp = recipe.specimen
        self.specimen = VoronoiGrains(
            field_shape=(h, w),
            grains_per_field=(int(sp.grains_per_field[0]), int(sp.grains_per_field[1])),
            seeds=sp.seeds, min_distance=sp.min_distance, weights=sp.weights,
            weight_sigma=sp.weight_sigma, periodic=sp.periodic, specimen_scale=sp.specimen_scale,
        )
        c = recipe.contrast
        self.contrast = ChannellingContrast(
            intensity=c.grain_intensity, groove_width_px=c.boundary.width_px,
            groove_depth=c.boundary.depth,
        )
        scan = instrument.scan
        self.scan = ScanModel(
            shape=(h, w),
            drift_px=scan.drift_px if recipe.scan.drift_px is None else recipe.scan.drift_px,
            line_jitter_px=(scan.line_jitter_px if recipe.scan.line_jitter_px is None
                            else recipe.scan.line_jitter_px),
            field_extent=self.specimen.extent,
            drift_walk_px=scan.drift_walk_px,
            mains_amplitude_px=(scan.mains.amplitude_px if scan.mains is not None else (0.0, 0.0)),
            mains_frequency_hz=(scan.mains.frequency_hz if scan.mains is not None else 50.0),
            dwell_time_s=scan.dwell_time_s,
            flyback_s=scan.flyback_s,
            fast_nonlinearity=(scan.fast_nonlinearity.amplitude_px,
                               scan.fast_nonlinearity.decay_px),
            slow_nonlinearity=(scan.slow_nonlinearity.amplitude_px,
                               scan.slow_nonlinearity.decay_px),
        )
        opt = instrument.optics
        psf = opt.psf_sigma_px if recipe.optics.psf_sigma_px is None else recipe.optics.psf_sigma_px
        if opt.psf_kind == "lorentzian":
            self.optics = LorentzianTailPSF(sigma_px=psf, tail_fraction=opt.psf_tail_fraction,
                                            tail_gamma_px=opt.psf_tail_gamma_px)
        else:
            self.optics = GaussianPSF(sigma_px=psf)
        self.vignetting = Vignetting(coefficients=opt.vignetting.coefficients())
        d = instrument.detector
        self.detector = Detector(gain=d.gain, readout_sigma=d.readout_sigma, offset=d.offset,
                                 bit_depth=d.bit_depth, dose=recipe.detector.dose,
                                 saturation=d.saturation, row_sigma=d.fixed_pattern.row_sigma,
                                 col_sigma=d.fixed_pattern.col_sigma,
                                 pattern_seed=d.fixed_pattern.seed, lag_px=d.lag_px)
        self.label_names = list(recipe.labels.names)
        self.label_width = recipe.labels.boundary_width_px
        # boundary distances beyond this never change image or labels: cap the exact search there
        self.distance_cap = max(self.contrast.reach_px(), 0.5 * self.label_width) + 1.0
        self._cache: tuple[int, Tessellation, np.ndarray, dict] | None = None

    generator_name = "sem-voronoi-grains"
    image_dtype = "uint16"

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image: (H, W)."""
        return tuple(self.recipe.size)

    @property
    def label_specs(self) -> dict[str, LabelSpec]:
        return {n: LABEL_SPECS[n] for n in self.label_names}

    def specimen_id(self, index: int) -> int:
        """Specimen imaged by sample ``index`` (consecutive samples share one)."""
        return int(index) // self.recipe.samples_per_specimen

    def specimen_of(self, specimen_id: int) -> tuple[Tessellation, np.ndarray, dict]:
        """Tessellation, per-grain intensities and parameters of a specimen (cached: last one)."""
        if self._cache is None or self._cache[0] != specimen_id:
            rng = specimen_rng(self.root_seed, specimen_id)
            tess, params = self.specimen.sample(rng)
            intensity = self.contrast.sample_grains(rng, tess.n_seeds)
            self._cache = (specimen_id, tess, intensity, params)
        return self._cache[1], self._cache[2], self._cache[3]

    def generate(self, index: int) -> Sample:
        """Sample ``index``: image (H, W) uint16, labels, and every drawn parameter."""
        sid = self.specimen_id(index)
        tess, intensity, spec_params = self.specimen_of(sid)
        rng = sample_rng(self.root_seed, index)
        scan_p = self.scan.sample(rng)
        contrast_p = self.contrast.sample(rng)
        psf_p = self.optics.sample(rng)
        det_p = self.detector.sample(rng)

        x, y = self.scan.apply(scan_p)
        grain_id, dist = tess.label(x, y, max_distance=self.distance_cap)
        signal = self.contrast.apply(grain_id, dist, intensity, contrast_p)
        if self.instrument.optics.psf_follows_scan:
            row_shift = (x - np.arange(x.shape[1], dtype=np.float64)[None, :]).mean(axis=1)
            signal = self.optics.apply(signal, psf_p, row_shift_px=row_shift)
        else:
            signal = self.optics.apply(signal, psf_p)
        vig_p = None
        if self.vignetting.active:
            vig_p = self.vignetting.sample(rng)  # no draw: an instrument constant
            signal = self.vignetting.apply(signal, vig_p)
        image = self.detector.apply(signal, det_p)

        labels: dict[str, np.ndarray] = {}
        if "grain_id" in self.label_names:
            labels["grain_id"] = grain_id
        if "boundary" in self.label_names:
            labels["boundary"] = boundary_label(dist, self.label_width)
        params = {
            "specimen": spec_params,
            "scan": scan_p.to_dict(),
            "contrast": contrast_p.to_dict(),
            "optics": psf_p.to_dict(),
            "detector": det_p.to_dict(),
            "labels": {"boundary_width_px": self.label_width},
        }
        if vig_p is not None:
            params["optics"].update(vig_p.to_dict())
        return Sample(image=image, labels=labels, specimen_id=sid, index=int(index), params=params)
