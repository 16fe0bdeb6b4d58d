"""The SEM grain twin: recipe + instrument → samples (image, exact labels, drawn parameters).

Chain (DESIGN.md §1): Specimen (VoronoiGrains; PottsGrains or Section3DGrains by
``specimen.kind``) → Scan (coordinate maps: drift, random walk, line
jitter, mains, nonlinearity) → Contrast (channelling + groove, labels from the same coordinates) →
Optics (Gaussian or Lorentzian-tailed PSF, vignetting) → Detector (Poisson–Gaussian, saturation,
fixed pattern, lag).  The optional parts come from the instrument profile (e.g. one written by
``twin calibrate``); a profile without them gives the basic chain's draws and bytes.

Features of issue 4 (each a recipe switch, off by default; built by :func:`build_features`):
grain-size control, twins, roughness/elongation (coordinate map), sub-grains, orientation
gradients, phases, particles, optical colour contrast and artefacts.  Their random draws come
from child generators seeded by a fixed number of draws made *after* all the foundation draws of
the specimen and of the sample, so with every feature off the draws and the bytes are those of
the foundation generator, and a variant with one feature off differs only in that feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
from twin.recipe import DEFAULT_DOSE, Recipe
from twin.seeding import sample_rng, specimen_rng

__all__ = ["CachedSpecimenPipeline", "Sample", "SEMGrainPipeline", "LABEL_SPECS", "FeatureStages", "build_features",
           "SpecimenState"]

LABEL_SPECS = {
    "grain_id": LabelSpec(
        dtype="int32", kind="instance", classes=(),
        description="index of the grain (Voronoi/Laguerre seed) owning the pixel's specimen position",
    ),
    "boundary": LabelSpec(
        dtype="uint8", kind="boundary", classes=("grain", "boundary"),
        description="1 where the exact distance to a grain boundary is below boundary_width_px / 2",
    ),
    "twin": LabelSpec(
        dtype="uint8", kind="semantic", classes=("parent", "twin"),
        description="1 inside an annealing-twin lamella",
    ),
    "twin_boundary": LabelSpec(
        dtype="uint8", kind="boundary", classes=("other", "twin_boundary"),
        description="1 where the exact distance to a lamella edge (inside its grain) is below "
                    "twin_boundary_width_px / 2",
    ),
    "phase": LabelSpec(
        dtype="uint8", kind="semantic", classes=("matrix",),
        description="grain phase (0 = matrix), then one class per particle class",
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
    geometry : dict name → ndarray, optional vector truth (``output.geometry``): ``grain_table``
        (k, 4) and ``grain_polygons`` (m, 3), see :mod:`generators.geometry`
    """

    image: np.ndarray
    labels: dict[str, np.ndarray]
    specimen_id: int
    index: int
    params: dict[str, Any] = field(default_factory=dict)
    geometry: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureStages:
    """The feature stages a recipe switches on (``None`` = off)."""

    sizes: Any = None
    twins: Any = None
    warp: Any = None
    subgrains: Any = None
    gradients: Any = None
    phases: Any = None
    particles: Any = None
    optical: Any = None
    artefacts: Any = None

    @property
    def specimen_active(self) -> bool:
        return any(x is not None for x in (self.sizes, self.twins, self.warp, self.subgrains,
                                           self.gradients, self.phases, self.particles))


#: child-generator slots drawn after the foundation draws (fixed count: never reorder)
_SPECIMEN_SLOTS = ("sizes", "twins", "warp", "subgrains", "gradients", "phases", "particles",
                   "optical_twins")
_SAMPLE_SLOTS = ("twins", "subgrains", "artefacts", "spare")


def build_features(recipe: Recipe) -> FeatureStages:
    """Feature stages of a recipe (generators objects), ``None`` for every feature left off."""
    f = recipe.specimen.features
    out: dict[str, Any] = {}
    if f.sizes.enabled:
        from generators.sizes import GrainSizeControl
        out["sizes"] = GrainSizeControl(sigma=f.sizes.sigma, median_area_px=f.sizes.median_area_px)
    if f.twins.enabled:
        from generators.twins import AnnealingTwins
        t = f.twins
        out["twins"] = AnnealingTwins(probability=t.probability, spacing_px=t.spacing_px,
                                      width_px=t.width_px, intensity=t.intensity,
                                      groove_width_px=t.groove_width_px,
                                      groove_depth=t.groove_depth)
    if f.roughness.enabled or f.elongation.enabled:
        from generators.warp import Warp
        r, e = f.roughness, f.elongation
        out["warp"] = Warp(amplitude_px=r.amplitude_px if r.enabled else (0.0, 0.0),
                           correlation_px=r.correlation_px, n_modes=r.n_modes,
                           elongation=e.ratio if e.enabled else (1.0, 1.0),
                           angle_deg=e.angle_deg if e.enabled else (0.0, 0.0))
    if f.subgrains.enabled:
        from generators.substructure import Subgrains
        g = f.subgrains
        out["subgrains"] = Subgrains(subgrains_per_grain=g.subgrains_per_grain,
                                     grain_fraction=g.grain_fraction,
                                     intensity_delta=g.intensity_delta,
                                     groove_width_px=g.groove_width_px,
                                     groove_depth=g.groove_depth)
    if f.gradients.enabled:
        from generators.substructure import OrientationGradients
        out["gradients"] = OrientationGradients(amplitude=f.gradients.amplitude)
    if f.phases.enabled:
        from generators.phases import Phase, Phases
        out["phases"] = Phases(tuple(Phase(p.name, p.fraction, p.intensity)
                                     for p in f.phases.phases))
    if f.particles.enabled:
        from generators.phases import ParticleClass, Particles
        out["particles"] = Particles(tuple(
            ParticleClass(c.name, density=c.density, semi_major_px=c.semi_major_px,
                          aspect=c.aspect, intensity=c.intensity,
                          placement=(c.placement.interior, c.placement.boundary,
                                     c.placement.junction))
            for c in f.particles.classes))
    c = recipe.contrast
    if c.mode == "optical-colour":
        from generators.optical import OpticalColourContrast
        o = c.optical
        out["optical"] = OpticalColourContrast(
            hue_bands_deg=tuple(tuple(b) for b in o.hue_bands_deg),
            band_concentration=o.band_concentration, saturation=o.saturation, value=o.value,
            specimen_hue_shift_deg=o.specimen_hue_shift_deg,
            specimen_value_shift=o.specimen_value_shift, contrast=o.contrast,
            boundary_depth=o.boundary_depth, boundary_width_px=o.boundary_width_px,
            shading=o.shading, mottle_amplitude=o.mottle_amplitude,
            mottle_chroma=o.mottle_chroma, mottle_length_px=o.mottle_length_px)
    a = recipe.artefacts
    if any(x.enabled for x in (a.scratches, a.pits, a.dust, a.contamination, a.charging,
                               a.data_bar)):
        from generators import artefacts as art

        def p(x):
            return x.probability if x.enabled else 0.0

        def ir(r):
            return (int(round(r[0])), int(round(r[1])))

        def spots(x):
            return art.Spots(probability=p(x), density=x.density, sigma_px=x.sigma_px,
                             strength=x.strength, bright_fraction=x.bright_fraction)

        s = a.scratches
        out["artefacts"] = art.Artefacts(
            scratches=art.Scratches(probability=p(s), count=ir(s.count),
                                    length_frac=s.length_frac, width_px=s.width_px,
                                    strength=s.strength, bright_fraction=s.bright_fraction,
                                    angle_spread_deg=s.angle_spread_deg,
                                    curvature_per_px=s.curvature_per_px),
            pits=spots(a.pits), dust=spots(a.dust), contamination=spots(a.contamination),
            charging=art.ChargingStreaks(probability=p(a.charging), count=ir(a.charging.count),
                                         amplitude=a.charging.amplitude,
                                         decay_px=a.charging.decay_px,
                                         height_px=a.charging.height_px),
            data_bar=art.DataBar(probability=p(a.data_bar), height_frac=a.data_bar.height_frac,
                                 background=a.data_bar.background,
                                 foreground=a.data_bar.foreground,
                                 scale_bar_frac=a.data_bar.scale_bar_frac,
                                 words=ir(a.data_bar.words)))
    return FeatureStages(**out)


@dataclass
class SpecimenState:
    """Everything drawn for one specimen: the grains and each enabled feature's structure."""

    tess: Any
    intensity: np.ndarray
    params: dict
    twins: Any = None
    twin_colours: np.ndarray | None = None
    cmap: Any = None
    neighbours: Any = None
    stretch_max: float = 1.0
    polygons: Any = None
    subgrains: Any = None
    gradients: Any = None
    phases: Any = None
    particles: Any = None


def _phase_tinted(colours: np.ndarray, assignment, phases) -> np.ndarray:
    """Grain colours (n, 3) of an optical-colour specimen scaled by their phase's intensity
    relative to the matrix (the first phase, at the middle of its intensity range), clipped to
    [0, 1]: a bright or dark second phase shows, as the ``phase`` label says it is there."""
    lo, hi = phases.phases[0].intensity
    ref = 0.5 * (lo + hi)
    scale = assignment.intensity / ref if ref > 0 else np.ones(len(assignment.intensity))
    return np.clip(np.asarray(colours, dtype=np.float64) * scale[:, None], 0.0, 1.0)


def _child(keys: np.ndarray, slots: tuple[str, ...], name: str) -> np.random.Generator:
    return np.random.default_rng(int(keys[slots.index(name)]))


def _stretch_bound(cmap, extent: tuple[float, float], n: int = 128) -> float:
    """Largest singular value of the map's Jacobian over the specimen (sampled on an n x n grid
    covering a period, +5 %); ``d_p < cap`` needs ``d_q < cap · bound`` (first order)."""
    lx, ly = extent
    yy, xx = np.mgrid[0:n, 0:n] / n
    _, _, jac = cmap.apply(xx * lx, yy * ly)
    a, b, c, d = jac[..., 0, 0], jac[..., 0, 1], jac[..., 1, 0], jac[..., 1, 1]
    s1 = a * a + b * b + c * c + d * d
    det = a * d - b * c
    smax2 = 0.5 * (s1 + np.sqrt(np.maximum(s1 * s1 - 4 * det * det, 0.0)))
    return 1.05 * float(np.sqrt(smax2.max()))


def _signal_factor(twin_f, sub_f, gradients, qx, qy, grain_id) -> np.ndarray | None:
    """Product of the multiplicative signal factors (twin grooves, sub-grains, gradients),
    float32 in that order, ``None`` without any (the colour path; the grey one fuses them)."""
    factor = None
    if twin_f is not None:
        from generators.twins import twin_groove_factor
        factor = twin_groove_factor(*twin_f)
    if sub_f is not None:
        from generators.substructure import subgrain_factor
        f = subgrain_factor(*sub_f)
        factor = f if factor is None else factor * f
    if gradients is not None:
        f = gradients.factor(qx, qy, grain_id)
        factor = f if factor is None else factor * f
    return factor


class CachedSpecimenPipeline:
    """Shared plumbing of the raster-image pipelines (HRTEM/STEM, BF-TEM): image shape, label specs,
    specimen ids and a one-specimen cache (only the last specimen is kept, so memory stays flat).

    Subclasses set ``recipe``, ``label_names``, ``label_catalogue`` (name → LabelSpec) and
    implement ``_make_specimen(specimen_id)``.
    """

    label_catalogue: dict[str, LabelSpec] = {}
    _cache: tuple[int, Any] | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image: (H, W)."""
        return tuple(self.recipe.size)

    @property
    def label_specs(self) -> dict[str, LabelSpec]:
        return {n: self.label_catalogue[n] for n in self.label_names}

    def specimen_id(self, index: int) -> int:
        """Specimen imaged by sample ``index`` (consecutive samples share one)."""
        return int(index) // self.recipe.samples_per_specimen

    def specimen_of(self, specimen_id: int) -> Any:
        """The specimen of ``specimen_id`` (cached: the last one)."""
        if self._cache is None or self._cache[0] != specimen_id:
            self._cache = None  # release the previous specimen before computing the next
            self._cache = (specimen_id, self._make_specimen(specimen_id))
        return self._cache[1]

    def _make_specimen(self, specimen_id: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


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
        self.features = build_features(recipe)
        self.specimen = self._specimen_stage(recipe)
        c = recipe.contrast
        self.contrast = ChannellingContrast(
            intensity=c.grain_intensity, groove_width_px=c.boundary.width_px,
            groove_depth=c.boundary.depth,
        )
        scan = instrument.scan
        field_range = self.specimen.extent
        if not recipe.specimen.periodic:  # a bounded specimen: the field lies inside it
            field_range = (max(field_range[0] - w, 0.0), max(field_range[1] - h, 0.0))
        self.scan = ScanModel(
            shape=(h, w),
            drift_px=scan.drift_px if recipe.scan.drift_px is None else recipe.scan.drift_px,
            line_jitter_px=(scan.line_jitter_px if recipe.scan.line_jitter_px is None
                            else recipe.scan.line_jitter_px),
            field_extent=field_range,
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
        # the recipe's dose, else the instrument's usual exposure, else the schema default
        self.dose_range = (recipe.detector.dose if recipe.detector.dose is not None
                           else d.dose if d.dose is not None else DEFAULT_DOSE)
        self.detector = Detector(gain=d.gain, readout_sigma=d.readout_sigma, offset=d.offset,
                                 bit_depth=d.bit_depth, dose=self.dose_range,
                                 saturation=d.saturation, row_sigma=d.fixed_pattern.row_sigma,
                                 col_sigma=d.fixed_pattern.col_sigma,
                                 pattern_seed=d.fixed_pattern.seed, lag_px=d.lag_px)
        self.label_names = list(recipe.labels.names)
        self.label_width = recipe.labels.boundary_width_px
        tbw = recipe.labels.twin_boundary_width_px
        self.twin_label_width = self.label_width if tbw is None else tbw
        # boundary distances beyond this never change image or labels: cap the exact search there
        reach = (self.features.optical.reach_px() if self.features.optical is not None
                 else self.contrast.reach_px())
        self.distance_cap = max(reach, 0.5 * self.label_width) + 1.0
        self.twin_cap = 1.0
        if self.features.twins is not None:
            self.twin_cap = max(self.features.twins.reach_px(), 0.5 * self.twin_label_width) + 1.0
        self._cache: tuple[int, SpecimenState] | None = None

    generator_name = "sem-voronoi-grains"

    def _specimen_stage(self, recipe: Recipe):
        """The specimen stage of ``specimen.kind``: voronoi (default), potts or section3d."""
        sp = recipe.specimen
        h, w = recipe.size
        if sp.kind == "potts":
            from generators.potts import PottsGrains
            return PottsGrains(
                field_shape=(h, w),
                grains_per_field=(int(sp.grains_per_field[0]), int(sp.grains_per_field[1])),
                steps=(int(sp.steps[0]), int(sp.steps[1])), temperature=sp.temperature,
                periodic=sp.periodic, specimen_scale=sp.specimen_scale, resolution=sp.resolution)
        if sp.kind == "section3d":
            from generators.section3d import Section3DGrains
            return Section3DGrains(
                field_shape=(h, w),
                grains_per_field=(int(sp.grains_per_field[0]), int(sp.grains_per_field[1])),
                seeds=sp.seeds, min_distance=sp.min_distance, weights=sp.weights,
                weight_sigma=sp.weight_sigma, tilt=sp.tilt_deg, periodic=sp.periodic,
                specimen_scale=sp.specimen_scale)
        per_field = (int(sp.grains_per_field[0]), int(sp.grains_per_field[1]))
        sizes = self.features.sizes
        if sizes is not None and sizes.median_area_px is not None:
            # the number of grains follows from the requested median area (same draw count)
            n = sizes.n_grains((float(w), float(h)))
            per_field = (n, n)
        return VoronoiGrains(
            field_shape=(h, w), grains_per_field=per_field,
            seeds=sp.seeds, min_distance=sp.min_distance, weights=sp.weights,
            weight_sigma=sp.weight_sigma, periodic=sp.periodic, specimen_scale=sp.specimen_scale,
        )

    @property
    def image_dtype(self) -> str:
        return "uint16"

    @property
    def colour(self) -> bool:
        """True when images are RGB (optical colour contrast)."""
        return self.features.optical is not None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image: (H, W), or (H, W, 3) in optical colour mode."""
        return tuple(self.recipe.size) + ((3,) if self.colour else ())

    def phase_classes(self) -> tuple[str, ...]:
        """Class names of the ``phase`` label (grain phases, then particle classes)."""
        from generators.phases import phase_class_names
        return phase_class_names(self.features.phases, self.features.particles)

    @property
    def label_specs(self) -> dict[str, LabelSpec]:
        out = {}
        for n in self.label_names:
            spec = LABEL_SPECS[n]
            if n == "phase":
                spec = LabelSpec(dtype=spec.dtype, kind=spec.kind, classes=self.phase_classes(),
                                 description=spec.description)
            out[n] = spec
        return out

    def specimen_id(self, index: int) -> int:
        """Specimen imaged by sample ``index`` (consecutive samples share one)."""
        return int(index) // self.recipe.samples_per_specimen

    def specimen_state(self, specimen_id: int) -> SpecimenState:
        """Everything drawn for a specimen (cached: the last one)."""
        if self._cache is None or self._cache[0] != specimen_id:
            rng = specimen_rng(self.root_seed, specimen_id)
            tess, params = self.specimen.sample(rng)
            fs = self.features
            if fs.optical is not None:
                intensity = fs.optical.sample_grains(rng, tess.n_seeds)
            else:
                intensity = self.contrast.sample_grains(rng, tess.n_seeds)
            st = SpecimenState(tess=tess, intensity=intensity, params=params)
            if fs.specimen_active:
                self._draw_specimen_features(rng, st)
            self._cache = (specimen_id, st)
        return self._cache[1]

    def specimen_of(self, specimen_id: int) -> tuple[Tessellation, np.ndarray, dict]:
        """Tessellation, per-grain intensities and parameters of a specimen (cached: last one)."""
        st = self.specimen_state(specimen_id)
        return st.tess, st.intensity, st.params

    def _draw_specimen_features(self, rng: np.random.Generator, st: SpecimenState) -> None:
        fs = self.features
        keys = rng.integers(0, 2**63 - 1, size=len(_SPECIMEN_SLOTS))
        feat: dict[str, Any] = {}
        polygons = None
        if fs.sizes is not None:  # the fit computes the fitted cells' polygons: keep them
            st.tess, feat["sizes"], polygons = fs.sizes.apply_with_polygons(
                _child(keys, _SPECIMEN_SLOTS, "sizes"), st.tess)
            st.polygons = polygons
        tess = st.tess
        if polygons is None and (fs.subgrains is not None or fs.particles is not None
                                 or fs.warp is not None):
            from generators.substructure import cell_polygons
            polygons = st.polygons = cell_polygons(tess)
        if fs.phases is not None:
            st.phases = fs.phases.sample_specimen(_child(keys, _SPECIMEN_SLOTS, "phases"),
                                                  tess.n_seeds)
            if fs.optical is None:
                st.intensity = st.phases.intensity
            else:  # optical colour: a phase scales its grains' colours by its intensity
                st.intensity = _phase_tinted(st.intensity, st.phases, fs.phases)
            feat["phases"] = st.phases.to_dict()
        if fs.twins is not None:
            if isinstance(tess, Tessellation):  # lamellae in the frame of the grain's seed
                origins, ext, per = tess.seeds, tess.extent, tess.periodic
            else:  # raster / 3D-section grains: the raw specimen frame (continuous in a field)
                origins, ext, per = np.zeros((tess.n_seeds, 2)), (1.0, 1.0), False
            st.twins = fs.twins.sample_specimen(_child(keys, _SPECIMEN_SLOTS, "twins"),
                                                origins, ext, per)
            if fs.optical is not None:
                st.twin_colours = fs.optical.sample_grains(
                    _child(keys, _SPECIMEN_SLOTS, "optical_twins"), tess.n_seeds)
            feat["twins"] = st.twins.to_dict()
        if fs.warp is not None:
            from generators.warp import CellNeighbours
            st.cmap = fs.warp.sample_specimen(_child(keys, _SPECIMEN_SLOTS, "warp"), tess.extent)
            st.neighbours = CellNeighbours.from_polygons(polygons, tess.weights)
            st.stretch_max = _stretch_bound(st.cmap, tess.extent)
            feat["warp"] = st.cmap.to_dict()
        if fs.subgrains is not None:
            grain_of = None
            if st.neighbours is not None:  # label_field's neighbour walk: no tile lists at all
                from generators.warp import walk_grain_ids
                if walk_grain_ids(tess, st.neighbours, np.zeros(1), np.zeros(1)) is not None:
                    def grain_of(x, y, tess=tess, cells=st.neighbours):
                        return walk_grain_ids(tess, cells, x, y)
            st.subgrains = fs.subgrains.sample_specimen(  # label_cap: label_field's tile lists
                _child(keys, _SPECIMEN_SLOTS, "subgrains"), tess, polygons=polygons,
                label_cap=self.distance_cap * st.stretch_max, grain_of=grain_of)
            feat["subgrains"] = st.subgrains.to_dict()
        if fs.gradients is not None:
            st.gradients = fs.gradients.sample_specimen(
                _child(keys, _SPECIMEN_SLOTS, "gradients"), tess)
            feat["gradients"] = st.gradients.to_dict()
        if fs.particles is not None:
            st.particles = fs.particles.sample_specimen(
                _child(keys, _SPECIMEN_SLOTS, "particles"), tess, polygons=polygons)
            feat["particles"] = st.particles.to_dict()
        st.params = {**st.params, "features": feat}

    def label_field(self, st: SpecimenState, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Grain ids and image-space boundary distances at scan coordinates ``(x, y)`` (px).

        Returns a dict with ``qx, qy`` (specimen coordinates), ``grain_id``, ``distance`` and,
        with twins, ``twin`` and ``twin_distance`` (image-space px, capped).
        """
        tess = st.tess
        cap = self.distance_cap
        out: dict[str, Any] = {}
        if st.cmap is None:
            qx, qy, jac, smax = x, y, None, 1.0
        else:
            qx, qy, jac = st.cmap.apply(x, y)
            smax = st.stretch_max  # one cap per specimen: the tile lists are built once
        cap_q = cap * smax
        fused = None
        if jac is not None:  # grains, normals and d_p in one pass by a neighbour walk
            from generators.warp import label_warped_grains
            fused = label_warped_grains(tess, st.neighbours, qx, qy, jac, cap_q, cap)
        if fused is not None:
            gid, dist = fused
        else:
            gid, dist = tess.label(qx, qy, max_distance=cap_q)
            if jac is not None:  # normals of the nearest radical lines and d_p in one pass
                from generators.warp import image_space_distance
                dist = image_space_distance(st.neighbours, qx, qy, gid, dist, jac, cap_q, cap)
        out.update(qx=qx, qy=qy, grain_id=gid, distance=dist)
        if st.twins is not None:
            tcap_q = self.twin_cap * smax
            if jac is not None:  # lamellae and their image-space distance in one pass
                tin, tdist = st.twins.label_warped(qx, qy, gid, jac, tcap_q, self.twin_cap)
            else:
                tin, tdist = st.twins.label(qx, qy, gid, max_distance=tcap_q)
            out.update(twin=tin, twin_distance=tdist)
        return out

    def generate(self, index: int) -> Sample:
        """Sample ``index``: image (H, W) [or (H, W, 3)] uint16, labels, every drawn parameter."""
        sid = self.specimen_id(index)
        st = self.specimen_state(sid)
        tess, intensity, spec_params = st.tess, st.intensity, st.params
        fs = self.features
        colour = self.colour
        rng = sample_rng(self.root_seed, index)
        scan_p = self.scan.sample(rng)
        contrast_p = fs.optical.sample(rng) if colour else self.contrast.sample(rng)
        psf_p = self.optics.sample(rng)
        if colour:  # independent noise keys per channel; one exposure (dose) for all three
            det_ps = [self.detector.sample(rng) for _ in range(3)]
            det_ps = [replace(d, dose=det_ps[0].dose) for d in det_ps]
            det_p = det_ps[0]
        else:
            det_p = self.detector.sample(rng)
        any_sample_feature = (fs.twins is not None or fs.subgrains is not None
                              or fs.artefacts is not None)
        keys = rng.integers(0, 2**63 - 1, size=len(_SAMPLE_SLOTS)) if any_sample_feature else None

        x, y = self.scan.apply(scan_p)
        lab = self.label_field(st, x, y)
        grain_id, dist = lab["grain_id"], lab["distance"]
        qx, qy = lab["qx"], lab["qy"]
        n = tess.n_seeds
        gid_signal = grain_id
        table = intensity
        if st.twins is not None:  # a lamella gets its own yield (or colour): ids n .. 2n-1
            gid_signal = grain_id + n * lab["twin"].astype(np.int32)
            extra = st.twin_colours if colour else st.twins.intensity
            table = np.concatenate([intensity, extra])
        feat_p: dict[str, Any] = {}
        twin_f = sub_f = grad_f = None  # arguments of the multiplicative signal factors
        if st.twins is not None:
            tp = fs.twins.sample(_child(keys, _SAMPLE_SLOTS, "twins"))
            twin_f = (lab["twin_distance"], tp.groove_width_px, tp.groove_depth)
            feat_p["twins"] = tp.to_dict()
        if st.subgrains is not None:
            sp = fs.subgrains.sample(_child(keys, _SAMPLE_SLOTS, "subgrains"))
            sub_id, sub_d = st.subgrains.label(qx, qy, grain_id, max_distance=self.distance_cap)
            sub_f = (sub_id, sub_d, st.subgrains.delta, sp.groove_width_px, sp.groove_depth)
            feat_p["subgrains"] = sp.to_dict()
        if st.gradients is not None:
            gr = st.gradients
            grad_f = (qx, qy, grain_id, gr.origins, gr.slope, gr.extent, gr.periodic)
        if colour:
            signal = fs.optical.apply(gid_signal, dist, table, contrast_p)
            factor = _signal_factor(twin_f, sub_f, st.gradients, qx, qy, grain_id)
            if factor is not None:
                signal = (signal * factor[..., None]).astype(np.float32)
        else:  # groove contrast and every factor in one pass (same bits as separately)
            from generators.sem import shaded_signal
            signal = shaded_signal(gid_signal, dist, table, contrast_p.groove_width_px,
                                   contrast_p.groove_depth, twin=twin_f, subgrains=sub_f,
                                   gradient=grad_f)
        pidx = None
        if st.particles is not None:
            pidx = st.particles.label(qx, qy)
            inside = pidx >= 0
            if inside.any():
                signal = np.array(signal, dtype=np.float32)
                signal[inside] = st.particles.intensity[pidx[inside]].astype(np.float32)[
                    (...,) + ((None,) if colour else ())]
        art_p = None
        if fs.artefacts is not None:
            art_p = fs.artefacts.sample(_child(keys, _SAMPLE_SLOTS, "artefacts"),
                                        tuple(self.recipe.size))
            signal = fs.artefacts.apply_signal(signal, art_p)
            feat_p["artefacts"] = art_p.to_dict()

        if colour:
            channels = [signal[..., c] for c in range(3)]
        else:
            channels = [signal]
        row_shift = None
        if self.instrument.optics.psf_follows_scan:
            row_shift = (x - np.arange(x.shape[1], dtype=np.float64)[None, :]).mean(axis=1)
        vig_p = None
        if self.vignetting.active:
            vig_p = self.vignetting.sample(rng)  # no draw: an instrument constant
        recorded = []
        for c, ch in enumerate(channels):
            ch = (self.optics.apply(ch, psf_p, row_shift_px=row_shift) if row_shift is not None
                  else self.optics.apply(ch, psf_p))
            if vig_p is not None:
                ch = self.vignetting.apply(ch, vig_p)
            recorded.append(self.detector.apply(ch, det_ps[c] if colour else det_p))
        image = np.stack(recorded, axis=-1) if colour else recorded[0]
        if art_p is not None:
            image = fs.artefacts.apply_recorded(image, art_p,
                                                max_value=2**self.detector.bit_depth - 1)

        labels: dict[str, np.ndarray] = {}
        if "grain_id" in self.label_names:
            labels["grain_id"] = grain_id
        if "boundary" in self.label_names:
            labels["boundary"] = boundary_label(dist, self.label_width)
        if "twin" in self.label_names:
            labels["twin"] = (lab["twin"] if st.twins is not None
                              else np.zeros(grain_id.shape, np.uint8))
        if "twin_boundary" in self.label_names:
            if st.twins is not None:
                tb = boundary_label(lab["twin_distance"], self.twin_label_width)
                tb &= st.twins.twinned[grain_id].astype(np.uint8)
            else:
                tb = np.zeros(grain_id.shape, np.uint8)
            labels["twin_boundary"] = tb
        if "phase" in self.label_names:
            from generators.phases import phase_label
            n_ph = len(fs.phases.phases) if fs.phases is not None else 1
            labels["phase"] = phase_label(
                grain_id, st.phases.phase_id if st.phases is not None else None,
                pidx, st.particles.class_id if st.particles is not None else None, n_ph)
        params = {
            "specimen": spec_params,
            "scan": scan_p.to_dict(),
            "contrast": contrast_p.to_dict(),
            "optics": psf_p.to_dict(),
            "detector": ({"channels": [d.to_dict() for d in det_ps]} if colour
                         else det_p.to_dict()),
            "labels": {"boundary_width_px": self.label_width},
        }
        if feat_p:
            params["features"] = feat_p
        if vig_p is not None:
            params["optics"].update(vig_p.to_dict())
        geometry = self._geometry(st, grain_id) if self.recipe.output.geometry else {}
        return Sample(image=image, labels=labels, specimen_id=sid, index=int(index), params=params,
                      geometry=geometry)

    def _geometry(self, st: SpecimenState, grain_id: np.ndarray) -> dict[str, np.ndarray]:
        """Grain table and exact polygons (specimen px) of the grains seen in the frame."""
        from generators.geometry import grain_polygons, grain_table, polygon_rows
        from generators.substructure import cell_polygons

        if st.polygons is None:
            st.polygons = cell_polygons(st.tess)
        ids = np.unique(grain_id)
        polys = grain_polygons(st.polygons, ids)
        return {"grain_table": grain_table(ids, polys), "grain_polygons": polygon_rows(ids, polys)}
