"""The mesoscale bright-field TEM twin: recipe + instrument → samples (image, exact labels, params).

Chain: Specimen (:class:`generators.tem.particles3d.ParticleField`: 3-D particles → projected
thickness, instance ids; amorphous support film with a random thickness screen) → view (a field
of the specimen, with a margin against FFT wrap-around) → phase object (σ V t, exp(−t/2λ)) →
objective lens (abTEM CTF: defocus, Cs, focal spread, convergence, aperture) → camera MTF
(Lorentzian-tailed PSF of the instrument) → Detector (dose, Poisson, gain, read noise, offset,
fixed pattern).  Optionally the particles' absorption is mottled by a random field (diffraction
contrast, ``specimen.material.texture``).  Labels come from the projected geometry of the same
view (never the image).

A specimen (particles + support, drawn from ``specimen_rng``) is ``specimen_scale`` times the field
on each side; its samples view different fields of it.  The specimen's material constants (mean
inner potentials, mean free paths) are drawn per specimen; defocus, view, PSF and dose per sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from generators.detector import Detector
from generators.optics import GaussianPSF, LorentzianTailPSF
from generators.tem.bf import BFImaging, interaction_constant, max_edge_phase_step, \
    particle_motion_blur, \
    support_screen, transmission
from generators.tem.particles3d import ParticleField
from twin.dataset import LabelSpec
from twin.errors import RecipeError
from twin.instrument import Instrument
from twin.pipeline import CachedSpecimenPipeline, Sample
from twin.seeding import sample_rng, specimen_rng

__all__ = ["BFTEMPipeline", "LABEL_SPECS"]

LABEL_SPECS = {
    "particle": LabelSpec(
        dtype="uint8", kind="semantic", classes=("support", "particle"),
        description="1 where the projected particle thickness is > 0 (exact, from the 3-D bodies)",
    ),
    "instance": LabelSpec(
        dtype="int32", kind="instance", classes=(),
        description="particle id (specimen-wide, 0 = support); a sintering neck belongs to the "
                    "nearer of the two particles it joins",
    ),
}


class _Specimen:
    """Rendered specimen: particle and support thickness (Å), instance ids, parameters."""

    def __init__(self, t_particle_a, t_support_a, instance, mip_p, mip_s, mfp_p, mfp_s, params,
                 absorption=None):
        self.absorption = absorption
        self.t_particle_a = t_particle_a
        self.t_support_a = t_support_a
        self.instance = instance
        self.mip_particle_v = mip_p
        self.mip_support_v = mip_s
        self.mfp_particle_a = mfp_p
        self.mfp_support_a = mfp_s
        self.params = params


class BFTEMPipeline(CachedSpecimenPipeline):
    """Generates sample ``i`` of a BF-TEM recipe, deterministically from (root seed, i).

    Parameters
    ----------
    recipe : twin.recipe_bftem.BFTEMRecipe
    instrument : Instrument
        A ``kind: tem`` profile with a ``tem:`` section.
    root_seed : int, optional
        Overrides ``recipe.seed``.
    """

    generator_name = "tem-bf-nanoparticles"
    image_dtype = "uint16"

    label_catalogue = LABEL_SPECS

    def __init__(self, recipe, instrument: Instrument, root_seed: int | None = None):
        if instrument.tem is None:
            raise RecipeError(f"instrument '{instrument.name}' has no 'tem:' section "
                              "(voltage_kv, cs_mm, ...): a BF-TEM recipe needs a TEM profile")
        self.recipe = recipe
        self.instrument = instrument
        self.root_seed = int(recipe.seed if root_seed is None else root_seed)
        h, w = recipe.size
        sp = recipe.specimen
        px_nm = recipe.pixel_size_nm
        self.pixel_size_a = 10.0 * px_nm
        im = recipe.imaging
        self.margin = int(im.margin_px)
        scale = sp.specimen_scale
        self.specimen_shape = (int(math.ceil(h * scale)) + 2 * self.margin,
                               int(math.ceil(w * scale)) + 2 * self.margin)
        weights = tuple((k, float(v)) for k, v in sp.shapes.model_dump().items() if v > 0)
        try:
            self.field = ParticleField(
                shape=self.specimen_shape, pixel_size_nm=px_nm, coverage=sp.coverage,
                diameter_median_nm=sp.diameter_median_nm, diameter_sigma=sp.diameter_sigma,
                diameter_range_nm=sp.diameter_range_nm, shape_weights=weights, aspect=sp.aspect,
                thickness_ratio=sp.thickness_ratio, neck_probability=sp.neck_probability,
                neck_radius_fraction=sp.neck_radius_fraction, min_gap_nm=sp.min_gap_nm)
        except ValueError as exc:
            raise RecipeError(f"recipe '{recipe.name}': {exc}") from None
        tem = instrument.tem
        self.voltage_kv = float(tem.voltage_kv)
        self.sigma = interaction_constant(self.voltage_kv)
        step = max_edge_phase_step(0.5 * sp.diameter_range_nm[1] / px_nm, self.pixel_size_a,
                                   sp.material.mean_inner_potential_v[1], self.sigma)
        if step >= math.pi:
            raise RecipeError(
                f"recipe '{recipe.name}': sampling too coarse for {self.voltage_kv:g} kV: the "
                f"phase steps by {step:.2f} rad (>= pi: aliased) across the outermost pixel of the "
                f"largest particle at {px_nm:g} nm/px (use a smaller pixel_size)")
        # instrument focal spread is taken as a standard deviation; abTEM wants the 1/e width
        spread_nm = tem.defocus_spread_nm if im.defocus_spread_nm is None else im.defocus_spread_nm
        self.imaging = BFImaging(
            voltage_kv=self.voltage_kv, pixel_size_a=self.pixel_size_a,
            defocus_nm=im.defocus_nm,
            cs_mm=tem.cs_mm if im.cs_mm is None else im.cs_mm,
            focal_spread_nm=math.sqrt(2.0) * spread_nm,
            convergence_mrad=(tem.convergence_mrad if im.convergence_mrad is None
                              else im.convergence_mrad),
            aperture_mrad=math.inf if im.aperture_mrad is None else im.aperture_mrad)
        opt = instrument.optics
        psf = opt.psf_sigma_px if recipe.optics.psf_sigma_px is None else recipe.optics.psf_sigma_px
        if opt.psf_kind == "lorentzian":
            self.optics = LorentzianTailPSF(sigma_px=psf, tail_fraction=opt.psf_tail_fraction,
                                            tail_gamma_px=opt.psf_tail_gamma_px)
        else:
            self.optics = GaussianPSF(sigma_px=psf)
        d = instrument.detector
        self.detector = Detector(gain=d.gain, readout_sigma=d.readout_sigma, offset=d.offset,
                                 bit_depth=d.bit_depth, dose=recipe.detector.dose,
                                 saturation=d.saturation, row_sigma=d.fixed_pattern.row_sigma,
                                 col_sigma=d.fixed_pattern.col_sigma,
                                 pattern_seed=d.fixed_pattern.seed, lag_px=d.lag_px)
        self.label_names = list(recipe.labels.names)
        self._cache = None

    def _make_specimen(self, specimen_id: int) -> _Specimen:
        rng = specimen_rng(self.root_seed, specimen_id)
        sp = self.recipe.specimen
        spec = self.field.sample(rng)
        t_px, inst = spec.render()
        mat, sup = sp.material, sp.support
        mip_p = float(rng.uniform(*mat.mean_inner_potential_v))
        mfp_p = float(rng.uniform(*mat.mean_free_path_nm)) * 10.0
        t_film = float(rng.uniform(*sup.thickness_nm)) * 10.0
        mip_s = float(rng.uniform(*sup.mean_inner_potential_v))
        mfp_s = float(rng.uniform(*sup.mean_free_path_nm)) * 10.0
        rough = float(rng.uniform(*sup.roughness))
        corr_nm = float(rng.uniform(*sup.correlation_nm))
        alpha = float(rng.uniform(*sup.spectrum_exponent))
        screen_key = int(rng.integers(0, 2**63 - 1))
        screen = support_screen(self.specimen_shape, corr_nm / self.recipe.pixel_size_nm, alpha,
                                screen_key)
        t_support = np.clip(t_film * (1.0 + rough * screen), 0.0, None)
        texture = float(rng.uniform(*mat.texture))
        tex_corr_nm = float(rng.uniform(*mat.texture_correlation_nm))
        texture_key = int(rng.integers(0, 2**63 - 1))
        absorption = None
        if texture > 0:
            g = support_screen(self.specimen_shape, tex_corr_nm / self.recipe.pixel_size_nm, 3.0,
                               texture_key)
            absorption = np.clip(1.0 + texture * g, 0.0, None).astype(np.float32)
        params = dict(spec.params)
        params.update({
            "coverage": float(np.mean(t_px > 0)),
            "mean_inner_potential_v": mip_p, "mean_free_path_a": mfp_p,
            "texture": texture, "texture_correlation_nm": tex_corr_nm,
            "texture_key": texture_key,
            "support": {"thickness_a": t_film, "mean_inner_potential_v": mip_s,
                        "mean_free_path_a": mfp_s, "roughness": rough,
                        "correlation_nm": corr_nm, "spectrum_exponent": alpha,
                        "screen_key": screen_key},
            "particles": [{"id": k + 1, **b.to_dict()} for k, b in enumerate(spec.particles)],
            "necks": [nk.to_dict() for cl in spec.clusters for nk in cl.necks],
        })
        return _Specimen(t_px * self.pixel_size_a, t_support, inst, mip_p, mip_s, mfp_p, mfp_s,
                         params, absorption)

    def generate(self, index: int) -> Sample:
        """Sample ``index``: image (H, W) uint16, labels, and every drawn parameter."""
        sid = self.specimen_id(index)
        spec = self.specimen_of(sid)
        rng = sample_rng(self.root_seed, index)
        h, w = self.recipe.size
        m = self.margin
        hs, ws = self.specimen_shape
        oy = int(rng.integers(0, hs - (h + 2 * m) + 1))
        ox = int(rng.integers(0, ws - (w + 2 * m) + 1))
        img_p = self.imaging.sample(rng)
        psf_p = self.optics.sample(rng)
        det_p = self.detector.sample(rng)

        win = (slice(oy, oy + h + 2 * m), slice(ox, ox + w + 2 * m))
        t_p = spec.t_particle_a[win]
        absorption = None if spec.absorption is None else spec.absorption[win]
        motion = self.recipe.specimen.motion_blur_nm
        motion_px = 0.0
        if motion[1] > 0:  # drawn only when enabled: recipes without it keep their bytes
            motion_px = float(rng.uniform(*motion)) / self.recipe.pixel_size_nm
            t_p, absorption = particle_motion_blur(t_p, absorption, motion_px)
        wave = transmission(t_p, spec.t_support_a[win], sigma=self.sigma,
                            mip_particle_v=spec.mip_particle_v,
                            mip_support_v=spec.mip_support_v,
                            mfp_particle_a=spec.mfp_particle_a,
                            mfp_support_a=spec.mfp_support_a,
                            particle_absorption=absorption)
        intensity = self.imaging.apply(wave, img_p)[m:m + h, m:m + w]
        signal = self.optics.apply(intensity, psf_p)
        image = self.detector.apply(np.clip(signal, 0.0, None), det_p)

        inner = (slice(oy + m, oy + m + h), slice(ox + m, ox + m + w))
        labels: dict[str, np.ndarray] = {}
        if "particle" in self.label_names:
            labels["particle"] = (spec.t_particle_a[inner] > 0).astype(np.uint8)
        if "instance" in self.label_names:
            labels["instance"] = np.ascontiguousarray(spec.instance[inner])
        params: dict[str, Any] = {
            "specimen": spec.params,
            "view": {"offset_px": [ox + m, oy + m], "margin_px": m},
            "imaging": {**img_p.to_dict(), "voltage_kv": self.voltage_kv,
                        "sigma_rad_per_v_a": self.sigma},
            "optics": psf_p.to_dict(),
            "detector": det_p.to_dict(),
        }
        if motion[1] > 0:
            params["particle_motion_px"] = motion_px
        return Sample(image=image, labels=labels, specimen_id=sid, index=int(index), params=params)
