"""The atomic-resolution TEM twin: recipe + instrument → samples (image, exact labels, params).

HRTEM chain: specimen (:class:`generators.tem.atoms.SpecimenSpec`: FCC particles from ASE on an
amorphous carbon film, drawn from ``specimen_rng``) → exit wave by abTEM plane-wave multislice
(**once per specimen**, cached; the K = ``samples_per_specimen`` samples of the specimen reuse it)
→ per sample: objective lens (abTEM CTF: defocus, Cs, focal spread, convergence, aperture) →
intensity binned to the image pixels → camera MTF (instrument PSF) → Detector (dose e⁻/Å² →
e⁻/px, Poisson, gain, read noise, offset).

STEM-HAADF chain: the same specimens; per sample the scan model of the instrument gives the
(distorted) probe position of every pixel; abTEM scans the probe at exactly those positions
(CustomScan, multislice, annular detector) → Detector.

Labels (exact, from the atoms, never from the image): particle k's footprint is the convex hull of
its projected atoms dilated by ``labels.radius_a``; ``particle`` (uint8, 1 inside any footprint)
and ``instance`` (int32, k) are evaluated at the specimen coordinates of each pixel: for HRTEM
the centre of the pixel's f × f simulation block ``x = (c + ½)·p − ½·s`` (p pixel size,
s simulation sampling), for STEM the probe position.  ``sample.geometry`` holds the projected
atom columns ``(x_px, y_px, n_atoms, particle_id)`` in image-pixel coordinates of the same
convention (``x_px = (x + ½ s)/p − ½`` for HRTEM, ``x/p`` for STEM).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from generators.detector import Detector
from generators.optics import GaussianPSF, LorentzianTailPSF
from generators.scan import ScanModel
from generators.tem.atoms import SpecimenSpec, atom_columns, particle_footprints, \
    rasterize_footprints
from generators.tem.hrtem import HRTEMImaging, antialias_cutoff_mrad, exit_wave
from generators.tem.stem import HAADF, haadf_signal
from twin.dataset import LabelSpec
from twin.errors import RecipeError
from twin.instrument import Instrument
from twin.pipeline import CachedSpecimenPipeline, Sample
from twin.seeding import sample_rng, specimen_rng

__all__ = ["AtomicTEMPipeline", "TEMSample", "LABEL_SPECS"]

LABEL_SPECS = {
    "particle": LabelSpec(
        dtype="uint8", kind="semantic", classes=("support", "particle"),
        description="1 inside a particle footprint: convex hull of its projected atoms dilated by "
                    "labels.radius_a (exact, from the atoms)"),
    "instance": LabelSpec(
        dtype="int32", kind="instance", classes=(),
        description="particle id (1..n within the specimen, 0 = support/vacuum); the higher id "
                    "wins where footprints overlap"),
}


@dataclass
class TEMSample(Sample):
    """A :class:`twin.pipeline.Sample` with vector truth: ``geometry['atom_columns']`` rows
    ``(x_px, y_px, n_atoms, particle_id)`` (pass to ``DatasetWriter.write(geometry=...)``)."""

    geometry: dict[str, np.ndarray] = field(default_factory=dict)


class _Specimen:
    def __init__(self, specimen, footprints, columns, wave=None):
        self.labels: dict[str, np.ndarray] | None = None  # HRTEM: the same for every draw
        self.atoms = specimen
        self.footprints = footprints
        self.columns = columns
        self.wave = wave


class AtomicTEMPipeline(CachedSpecimenPipeline):
    """Generates sample ``i`` of an atomic TEM recipe, deterministically from (root seed, i).

    Parameters
    ----------
    recipe : twin.recipe_tem.AtomicTEMRecipe
    instrument : Instrument (``kind: tem`` with ``tem:`` for HRTEM; a ``tem:`` section or 300 kV
        for STEM)
    root_seed : int, optional, overrides ``recipe.seed``
    """

    image_dtype = "uint16"

    label_catalogue = LABEL_SPECS

    def __init__(self, recipe, instrument: Instrument, root_seed: int | None = None):
        self.recipe = recipe
        self.instrument = instrument
        self.root_seed = int(recipe.seed if root_seed is None else root_seed)
        self.mode = recipe.imaging.mode
        self.generator_name = ("tem-hrtem-nanoparticles" if self.mode == "hrtem"
                               else "tem-stem-haadf-nanoparticles")
        h, w = recipe.size
        px = recipe.pixel_size_a
        self.pixel_size_a = px
        sp = recipe.specimen
        name = f"recipe '{recipe.name}'"
        tem = instrument.tem
        im = recipe.imaging
        if tem is None and (self.mode == "hrtem" or im.voltage_kv is None):
            raise RecipeError(f"instrument '{instrument.name}' has no 'tem:' section "
                              "(voltage_kv, cs_mm, ...): HRTEM needs one; STEM needs it or "
                              "imaging.voltage_kv")
        self.voltage_kv = float(tem.voltage_kv if im.voltage_kv is None else im.voltage_kv)
        if self.mode == "hrtem":
            self.factor = max(1, int(math.ceil(px / im.sampling_a - 1e-9)))
            self.sampling_a = px / self.factor
        else:
            self.factor = 1
            self.sampling_a = im.sampling_a
        self.extent_a = (w * px, h * px)
        weights = tuple((k, float(v)) for k, v in sp.shapes.model_dump().items() if v > 0)
        try:
            self.spec = SpecimenSpec(
                extent_a=self.extent_a, element=sp.element, shape_weights=weights,
                diameter_a=(10 * sp.diameter_nm[0], 10 * sp.diameter_nm[1]),
                particles=tuple(sp.particles_per_field), orientation=sp.orientation,
                zone_axis=tuple(sp.zone_axis), min_gap_a=10 * sp.min_gap_nm,
                support_thickness_a=(10 * sp.support.thickness_nm[0],
                                     10 * sp.support.thickness_nm[1]),
                support_density_g_cm3=sp.support.density_g_cm3,
                support_min_distance_a=sp.support.min_distance_a)
        except ValueError as exc:
            raise RecipeError(f"{name}: {exc}") from None
        if self.mode == "stem-haadf" and im.stem.inner_mrad <= im.stem.semiangle_mrad:
            raise RecipeError(f"{name}: imaging.stem.inner_mrad ({im.stem.inner_mrad:g}) must "
                              f"exceed the probe semiangle ({im.stem.semiangle_mrad:g} mrad)")
        cutoff = antialias_cutoff_mrad(self.voltage_kv, self.sampling_a)
        if self.mode == "hrtem":
            hs = im.hrtem
            needed = hs.max_angle_mrad if hs.aperture_mrad is None else max(hs.aperture_mrad,
                                                                           hs.max_angle_mrad)
            what = "imaging.hrtem.max_angle_mrad / aperture_mrad"
        else:
            needed, what = im.stem.outer_mrad, "imaging.stem.outer_mrad"
        if cutoff < needed:
            raise RecipeError(
                f"{name}: sampling too coarse for {self.voltage_kv:g} kV: the simulation sampling "
                f"{self.sampling_a:.4g} Å passes scattering angles up to {cutoff:.1f} mrad "
                f"(abTEM antialiasing) < {needed:g} mrad needed by {what} "
                f"(use a smaller imaging.sampling_a)")
        d = instrument.detector
        px_area = px * px
        self.detector = Detector(gain=d.gain, readout_sigma=d.readout_sigma, offset=d.offset,
                                 bit_depth=d.bit_depth,
                                 dose=(recipe.detector.dose_e_per_a2[0] * px_area,
                                       recipe.detector.dose_e_per_a2[1] * px_area),
                                 saturation=d.saturation, row_sigma=d.fixed_pattern.row_sigma,
                                 col_sigma=d.fixed_pattern.col_sigma,
                                 pattern_seed=d.fixed_pattern.seed, lag_px=d.lag_px)
        if self.mode == "hrtem":
            hs = im.hrtem
            cs = (tem.cs_mm, tem.cs_mm) if hs.cs_mm is None else hs.cs_mm
            spread_nm = tem.defocus_spread_nm if hs.defocus_spread_nm is None \
                else hs.defocus_spread_nm
            self.imaging = HRTEMImaging(
                voltage_kv=self.voltage_kv, sampling_a=(self.sampling_a, self.sampling_a),
                factor=self.factor,
                defocus_a=(10 * hs.defocus_nm[0], 10 * hs.defocus_nm[1]),
                cs_a=(1e7 * cs[0], 1e7 * cs[1]),
                focal_spread_a=math.sqrt(2.0) * 10 * spread_nm,
                convergence_mrad=(tem.convergence_mrad if hs.convergence_mrad is None
                                  else hs.convergence_mrad),
                aperture_mrad=math.inf if hs.aperture_mrad is None else hs.aperture_mrad)
            opt = instrument.optics
            psf = opt.psf_sigma_px if recipe.optics.psf_sigma_px is None \
                else recipe.optics.psf_sigma_px
            if opt.psf_kind == "lorentzian":
                self.optics = LorentzianTailPSF(sigma_px=psf, tail_fraction=opt.psf_tail_fraction,
                                                tail_gamma_px=opt.psf_tail_gamma_px)
            else:
                self.optics = GaussianPSF(sigma_px=psf)
            self.scan = None
        else:
            st = im.stem
            self.stem = HAADF(voltage_kv=self.voltage_kv, semiangle_mrad=st.semiangle_mrad,
                              inner_mrad=st.inner_mrad, outer_mrad=st.outer_mrad,
                              defocus_a=10 * st.defocus_nm, cs_a=1e7 * st.cs_mm,
                              sampling_a=self.sampling_a, slice_thickness_a=im.slice_thickness_a)
            scan = instrument.scan
            self.scan = ScanModel(
                shape=(h, w),
                drift_px=scan.drift_px if recipe.scan.drift_px is None else recipe.scan.drift_px,
                line_jitter_px=(scan.line_jitter_px if recipe.scan.line_jitter_px is None
                                else recipe.scan.line_jitter_px),
                drift_walk_px=scan.drift_walk_px,
                mains_amplitude_px=(scan.mains.amplitude_px if scan.mains is not None
                                    else (0.0, 0.0)),
                mains_frequency_hz=(scan.mains.frequency_hz if scan.mains is not None else 50.0),
                dwell_time_s=scan.dwell_time_s, flyback_s=scan.flyback_s)
        self.label_names = list(recipe.labels.names)
        self._cache = None

    def _make_specimen(self, specimen_id: int) -> _Specimen:
        rng = specimen_rng(self.root_seed, specimen_id)
        spec = self.spec.sample(rng)
        fps = particle_footprints(spec, self.recipe.labels.radius_a)
        cols = atom_columns(spec)
        wave = None
        if self.mode == "hrtem":
            h, w = self.recipe.size
            psi = exit_wave(spec.to_ase(), (w * self.factor, h * self.factor), self.voltage_kv,
                            self.recipe.imaging.slice_thickness_a, fft=self.recipe.imaging.fft)
            wave = self.imaging.spectrum(psi)  # kept in Fourier space: every draw starts here
            del psi
        return _Specimen(spec, fps, cols, wave)

    # ---- coordinates ----
    def pixel_centres_a(self) -> tuple[np.ndarray, np.ndarray]:
        """HRTEM: specimen coordinates (x, y), Å, of every pixel centre, each (H, W)."""
        h, w = self.recipe.size
        p, s = self.pixel_size_a, self.sampling_a
        x = (np.arange(w) + 0.5) * p - 0.5 * s
        y = (np.arange(h) + 0.5) * p - 0.5 * s
        return np.broadcast_to(x[None, :], (h, w)), np.broadcast_to(y[:, None], (h, w))

    def _labels(self, spec: _Specimen, x_a: np.ndarray, y_a: np.ndarray) -> dict[str, np.ndarray]:
        inst = rasterize_footprints(spec.footprints, x_a, y_a)
        out = {}
        if "particle" in self.label_names:
            out["particle"] = (inst > 0).astype(np.uint8)
        if "instance" in self.label_names:
            out["instance"] = inst
        return out

    # ---- rendering ----
    def render(self, index: int) -> tuple[np.ndarray, dict, dict, dict, Any]:
        """Noise-free signal of sample ``index`` before MTF and detector.

        Returns
        -------
        signal : (H, W) float32, image intensity (HRTEM, incident = 1) or detected probe fraction
            (STEM)
        labels, geometry, params : as in :meth:`generate`
        rng : the sample's generator, positioned after the imaging draws
        """
        sid = self.specimen_id(index)
        spec = self.specimen_of(sid)
        rng = sample_rng(self.root_seed, index)
        K = self.recipe.samples_per_specimen
        params: dict[str, Any] = {"specimen": spec.atoms.params, "mode": self.mode,
                                  "voltage_kv": self.voltage_kv,
                                  "sampling_a": self.sampling_a,
                                  "slice_thickness_a": self.recipe.imaging.slice_thickness_a}
        cols = spec.columns.copy()
        if self.mode == "hrtem":
            lens = self.imaging.sample(rng)
            signal = self.imaging.apply_spectrum(spec.wave, lens)
            if spec.labels is None:
                spec.labels = self._labels(spec, *self.pixel_centres_a())
            labels = {k: v.copy() for k, v in spec.labels.items()}
            s, p = self.sampling_a, self.pixel_size_a
            cols[:, :2] = (cols[:, :2] + 0.5 * s) / p - 0.5
            params.update({"imaging": lens.to_dict(), "binning": self.factor,
                           "exit_wave": {"specimen_id": sid, "draw": int(index) % K, "K": K}})
        else:
            scan_p = self.scan.sample(rng)
            X, Y = self.scan.apply(scan_p)
            lx, ly = self.extent_a
            x_a = np.mod(X * self.pixel_size_a, lx)
            y_a = np.mod(Y * self.pixel_size_a, ly)
            signal = haadf_signal(spec.atoms.to_ase(), np.stack([x_a, y_a], -1), self.stem,
                                  fft=self.recipe.imaging.fft)
            cols[:, :2] = cols[:, :2] / self.pixel_size_a
            params.update({"imaging": self.stem.to_dict(), "scan": scan_p.to_dict()})
            labels = self._labels(spec, x_a, y_a)
        return signal, labels, {"atom_columns": cols}, params, rng

    def generate(self, index: int) -> TEMSample:
        """Sample ``index``: image (H, W) uint16, labels, geometry and every drawn parameter."""
        signal, labels, geometry, params, rng = self.render(index)
        if self.mode == "hrtem":
            psf_p = self.optics.sample(rng)
            signal = self.optics.apply(signal, psf_p)
            params["optics"] = psf_p.to_dict()
        det_p = self.detector.sample(rng)
        image = self.detector.apply(np.clip(signal, 0.0, None), det_p)
        params["detector"] = {**det_p.to_dict(),
                              "dose_e_per_a2": det_p.dose / self.pixel_size_a ** 2}
        return TEMSample(image=image, labels=labels, specimen_id=self.specimen_id(index),
                         index=int(index), params=params, geometry=geometry)
