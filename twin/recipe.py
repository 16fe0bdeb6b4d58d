"""Recipes: YAML files that say what to generate, validated against a strict schema.

Every key is checked: unknown keys and out-of-range values are refused with a message that names
the key, the value and what is allowed.  A range is written either as one number (fixed) or as
``[low, high]`` (drawn uniformly per sample or per specimen, as the key's description says).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from twin.errors import RecipeError

__all__ = ["Recipe", "RecipeBase", "unique_names", "load_recipe", "parse_recipe", "format_validation_error", "RangeF"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _as_range(v):
    """Accept a number or a [low, high] pair; return (low, high)."""
    if isinstance(v, bool):
        raise ValueError("expected a number or [low, high]")
    if isinstance(v, (int, float)):
        if not math.isfinite(float(v)):
            raise ValueError("must be a finite number")
        return (float(v), float(v))
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v
    ):
        lo, hi = float(v[0]), float(v[1])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("range bounds must be finite")
        if lo > hi:
            raise ValueError(f"range [low, high] needs low <= high, got [{lo:g}, {hi:g}]")
        return (lo, hi)
    raise ValueError("expected a number or a list [low, high]")


def _range_type(ge: float | None = None, le: float | None = None, gt: float | None = None):
    def check(v):
        lo, hi = _as_range(v)
        for x in (lo, hi):
            if ge is not None and x < ge:
                raise ValueError(f"must be >= {ge:g}")
            if gt is not None and x <= gt:
                raise ValueError(f"must be > {gt:g}")
            if le is not None and x > le:
                raise ValueError(f"must be <= {le:g}")
        return (lo, hi)

    from pydantic import BeforeValidator

    return Annotated[tuple[float, float], BeforeValidator(check)]


RangeF = _range_type()


class PixelSize(_Strict):
    value: float = Field(gt=0, description="pixel size")
    unit: Literal["pm", "Å", "A", "nm", "um", "µm"] = "nm"


# --------------------------------------------------------------------------------------------
# specimen features (issue 4): each a switch, ``enabled: false`` by default
# --------------------------------------------------------------------------------------------
class _Feature(_Strict):
    enabled: bool = Field(False, description="switch the feature on (off: the plain generator)")


class TwinsFeature(_Feature):
    """Annealing twins: parallel lamellae at a per-grain orientation (generators.twins)."""

    probability: float = Field(0.3, ge=0, le=1, description="chance that a grain is twinned")
    spacing_px: _range_type(gt=0, le=100000) = (15.0, 40.0)
    width_px: _range_type(gt=0, le=100000) = (3.0, 10.0)
    intensity: _range_type(ge=0, le=1) = (0.25, 1.0)
    groove_width_px: _range_type(ge=0, le=64) = (0.5, 1.5)
    groove_depth: _range_type(ge=0, le=1) = (0.02, 0.1)


class RoughnessFeature(_Feature):
    """Smooth random displacement of specimen coordinates: curved, non-convex grains."""

    amplitude_px: _range_type(ge=0, le=10000) = (2.0, 5.0)
    correlation_px: _range_type(gt=0, le=1e6) = (20.0, 40.0)
    n_modes: int = Field(8, ge=1, le=256)


class ElongationFeature(_Feature):
    """Affine (area-preserving) stretch: grains ``ratio`` times longer along ``angle_deg``."""

    ratio: _range_type(ge=1, le=50) = (2.0, 2.0)
    angle_deg: _range_type(ge=-360, le=360) = (0.0, 0.0)


class SizesFeature(_Feature):
    """Lognormal grain areas by fitted Laguerre weights (generators.sizes)."""

    sigma: float = Field(0.5, ge=0, le=2, description="log-std of the grain areas")
    median_area_px: float | None = Field(None, gt=0, description="median grain area, px^2")


class SubgrainsFeature(_Feature):
    # (≤ 100: more sub-grains per grain are pixel-sized, and their polygons' memory grows as
    # the square of the count: 10,000 asked for 300 GB)
    subgrains_per_grain: _range_type(gt=0, le=100) = (3.0, 10.0)
    grain_fraction: float = Field(1.0, ge=0, le=1)
    intensity_delta: _range_type(ge=0, le=1) = (0.01, 0.05)
    groove_width_px: _range_type(ge=0, le=64) = (0.5, 2.0)
    groove_depth: _range_type(ge=0, le=1) = (0.02, 0.1)


class GradientsFeature(_Feature):
    amplitude: _range_type(ge=0, le=10) = (0.0, 0.15)


class PhaseSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    fraction: float = Field(ge=0, le=1)
    intensity: _range_type(ge=0, le=10) = (0.25, 1.0)


class PhasesFeature(_Feature):
    phases: list[PhaseSpec] = [PhaseSpec(name="matrix", fraction=0.7),
                               PhaseSpec(name="second", fraction=0.3, intensity=(1.0, 1.4))]

    @model_validator(mode="after")
    def _fractions(self):
        total = sum(p.fraction for p in self.phases)
        if not self.phases or abs(total - 1.0) > 1e-6:
            raise ValueError(f"phase fractions must sum to 1, got {total:g}")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")
        return self


class Placement(_Strict):
    interior: float = Field(1.0, ge=0)
    boundary: float = Field(0.0, ge=0)
    junction: float = Field(0.0, ge=0)


class ParticleSpec(_Strict):
    name: str = Field(min_length=1, max_length=64)
    density: _range_type(ge=0, le=10000) = (0.5, 2.0)
    semi_major_px: _range_type(gt=0, le=10000) = (1.5, 5.0)
    aspect: _range_type(gt=0, le=1) = (0.5, 1.0)
    intensity: _range_type(ge=0, le=10) = (1.1, 1.5)
    placement: Placement = Placement()


class ParticlesFeature(_Feature):
    classes: list[ParticleSpec] = [
        ParticleSpec(name="precipitate"),
        ParticleSpec(name="pore", density=(0.2, 1.0), semi_major_px=(1.0, 3.0),
                     aspect=(0.7, 1.0), intensity=(0.0, 0.1)),
    ]


class Features(_Strict):
    """Specimen features; every one is off unless ``enabled: true``."""

    sizes: SizesFeature = SizesFeature()
    twins: TwinsFeature = TwinsFeature()
    roughness: RoughnessFeature = RoughnessFeature()
    elongation: ElongationFeature = ElongationFeature()
    subgrains: SubgrainsFeature = SubgrainsFeature()
    gradients: GradientsFeature = GradientsFeature()
    phases: PhasesFeature = PhasesFeature()
    particles: ParticlesFeature = ParticlesFeature()


class VoronoiSpecimen(_Strict):
    kind: Literal["voronoi"] = "voronoi"
    grains_per_field: _range_type(ge=1, le=100000) = (80.0, 300.0)
    seeds: Literal["poisson", "hardcore"] = "poisson"
    # random sequential adsorption of discs jams at coverage 0.547, i.e. min_distance 0.83:
    # from ~0.8 the seeds cannot all be placed
    min_distance: float = Field(0.5, gt=0, le=0.75, description="fraction of mean seed spacing")
    weights: Literal["none", "lognormal"] = "none"
    # larger spreads of w = (s r / 2)² empty most cells (sigma 0.6: a third of them, 1.0: nearly
    # all); a wide grain-size distribution is features.sizes (fitted weights)
    weight_sigma: float = Field(0.35, ge=0, le=0.5)
    periodic: bool = True
    specimen_scale: float = Field(2.0, ge=1.0, le=16.0)
    features: Features = Features()


class PottsSpecimen(_Strict):
    """Grain growth: a Voronoi start evolved by Monte-Carlo Potts (generators.potts.PottsGrains)."""

    kind: Literal["potts"]
    grains_per_field: _range_type(ge=1, le=100000) = (150.0, 400.0)
    steps: _range_type(ge=0, le=1e6) = (50.0, 200.0)
    # measured (96² frames, 60 grains): ids split into several pieces in the frame 1-3 of ~90
    # at kT 0.5 (frame-edge cuts included), 3-11 at 1.0, 5-19 at 1.5 — a hot lattice breaks
    # grains into islands, so one grain id would no longer be one grain
    temperature: float = Field(0.5, ge=0, le=1.0, description="kT in units of the boundary energy")
    periodic: bool = True
    specimen_scale: float = Field(2.0, ge=1.0, le=16.0)
    resolution: float = Field(1.0, ge=1.0, le=8.0, description="raster cells per image px")
    features: Features = Features()


class Section3DSpecimen(_Strict):
    """Planar section of a 3D Voronoi/Laguerre tessellation (generators.section3d)."""

    kind: Literal["section3d"]
    grains_per_field: _range_type(ge=1, le=100000) = (80.0, 300.0)
    seeds: Literal["poisson", "hardcore"] = "poisson"
    # spheres jam at volume fraction ~0.38 (min_distance ~0.9)
    min_distance: float = Field(0.5, gt=0, le=0.8, description="fraction of mean 3D seed spacing")
    weights: Literal["none", "lognormal"] = "none"
    # larger spreads of w = (s r / 2)² empty most cells (sigma 0.6: a third of them, 1.0: nearly
    # all); a wide grain-size distribution is features.sizes (fitted weights)
    weight_sigma: float = Field(0.35, ge=0, le=0.5)
    tilt_deg: _range_type(ge=0, le=90) = (0.0, 0.0)
    periodic: bool = True
    specimen_scale: float = Field(2.0, ge=1.0, le=16.0)
    features: Features = Features()


#: union tags of ``specimen`` (dropped from error locations by :func:`format_validation_error`)
_SPECIMEN_TAGS = ("voronoi", "potts", "section3d")


def _specimen_kind(v) -> str:
    kind = v.get("kind", "voronoi") if isinstance(v, dict) else getattr(v, "kind", "voronoi")
    return kind if isinstance(kind, str) else repr(kind)


SpecimenModel = Annotated[
    Union[Annotated[VoronoiSpecimen, Tag("voronoi")], Annotated[PottsSpecimen, Tag("potts")],
          Annotated[Section3DSpecimen, Tag("section3d")]],
    Discriminator(_specimen_kind, custom_error_type="specimen_kind",
                  custom_error_message="specimen.kind must be one of 'voronoi', 'potts', "
                                       "'section3d' (or a kind listed in RECIPE_KINDS)"),
]

#: features that need the convex cells of a 2D Voronoi/Laguerre specimen
VORONOI_ONLY_FEATURES = ("sizes", "roughness", "elongation", "subgrains", "gradients",
                         "particles")


class Boundary(_Strict):
    width_px: _range_type(ge=0, le=64) = (1.0, 4.0)
    depth: _range_type(ge=0, le=1) = (0.2, 0.6)


class OpticalSettings(_Strict):
    """Optical colour contrast (generators.optical.OpticalColourContrast); defaults fit tbm-grains."""

    hue_bands_deg: list[_range_type(ge=-360, le=720)] = [(15.0, 65.0), (205.0, 240.0)]
    band_concentration: float = Field(0.7, gt=0, le=1e6)
    saturation: _range_type(ge=0, le=1) = (0.05, 0.65)
    value: _range_type(ge=0, le=1) = (0.38, 0.70)
    specimen_hue_shift_deg: float = Field(10.0, ge=0, le=180)
    specimen_value_shift: float = Field(0.10, ge=0, le=1)
    contrast: float = Field(1.0, ge=0, le=1)
    boundary_depth: _range_type(ge=0, le=1) = (0.0, 0.05)
    boundary_width_px: _range_type(ge=0, le=64) = (1.0, 3.0)
    shading: _range_type(ge=0, le=0.999) = (0.0, 0.10)
    mottle_amplitude: _range_type(ge=0, le=1) = (0.02, 0.07)
    mottle_chroma: _range_type(ge=0, le=1) = (0.01, 0.05)
    mottle_length_px: _range_type(gt=0, le=1000) = (2.0, 5.0)

    @field_validator("hue_bands_deg")
    @classmethod
    def _bands(cls, v):
        if not v:
            raise ValueError("needs at least one [low, high] hue band")
        for lo, hi in v:
            if hi > lo + 360:
                raise ValueError(f"hue band [{lo:g}, {hi:g}] spans more than 360 degrees")
        return v


class Contrast(_Strict):
    mode: Literal["sem-channelling", "optical-colour"] = "sem-channelling"
    grain_intensity: _range_type(ge=0, le=1) = (0.25, 1.0)
    boundary: Boundary = Boundary()
    optical: OpticalSettings = OpticalSettings()


# --------------------------------------------------------------------------------------------
# artefacts (change the image, never the labels): each a switch, off by default
# --------------------------------------------------------------------------------------------
class ScratchesArtefact(_Feature):
    probability: float = Field(1.0, ge=0, le=1, description="chance per frame when enabled")
    count: _range_type(ge=0, le=100000) = (1.0, 12.0)
    length_frac: _range_type(ge=0, le=10) = (0.2, 1.2)
    width_px: _range_type(gt=0, le=1000) = (0.6, 2.0)
    strength: _range_type(ge=0, le=1) = (0.05, 0.3)
    bright_fraction: float = Field(0.5, ge=0, le=1)
    angle_spread_deg: float = Field(6.0, ge=0, le=180)
    curvature_per_px: _range_type(ge=0, le=0.1) = (0.0, 5e-4)


class SpotsArtefact(_Feature):
    """Pits: small dark round spots (σ, density per 10⁴ px², relative strength)."""

    probability: float = Field(1.0, ge=0, le=1, description="chance per frame when enabled")
    density: _range_type(ge=0, le=10000) = (0.5, 4.0)
    sigma_px: _range_type(gt=0, le=10000) = (0.5, 1.5)
    strength: _range_type(ge=0, le=1) = (0.3, 0.8)
    bright_fraction: float = Field(0.0, ge=0, le=1)


class DustArtefact(SpotsArtefact):
    """Dust: small bright or dark particles."""

    density: _range_type(ge=0, le=10000) = (0.1, 1.0)
    sigma_px: _range_type(gt=0, le=10000) = (1.0, 3.0)
    strength: _range_type(ge=0, le=1) = (0.1, 0.5)
    bright_fraction: float = Field(0.5, ge=0, le=1)


class ContaminationArtefact(SpotsArtefact):
    """Contamination: large soft dark halos."""

    density: _range_type(ge=0, le=10000) = (0.005, 0.04)
    sigma_px: _range_type(gt=0, le=10000) = (8.0, 40.0)
    strength: _range_type(ge=0, le=1) = (0.1, 0.4)


class ChargingArtefact(_Feature):
    probability: float = Field(1.0, ge=0, le=1, description="chance per frame when enabled")
    count: _range_type(ge=0, le=100000) = (1.0, 6.0)
    amplitude: _range_type(ge=0, le=1000) = (0.1, 0.6)
    decay_px: _range_type(gt=0, le=1e6) = (10.0, 150.0)
    height_px: _range_type(gt=0, le=1e4) = (0.5, 2.0)


class DataBarArtefact(_Feature):
    probability: float = Field(1.0, ge=0, le=1, description="chance per frame when enabled")
    height_frac: _range_type(ge=0, le=0.9) = (0.06, 0.12)
    background: _range_type(ge=0, le=1) = (0.0, 0.25)
    foreground: _range_type(ge=0, le=1) = (0.85, 1.0)
    scale_bar_frac: _range_type(ge=0, le=0.9) = (0.1, 0.3)
    words: _range_type(ge=0, le=1000) = (2.0, 6.0)


class ArtefactsConfig(_Strict):
    """Artefacts of preparation and instrument (generators.artefacts); labels never change."""

    scratches: ScratchesArtefact = ScratchesArtefact()
    pits: SpotsArtefact = SpotsArtefact()
    dust: DustArtefact = DustArtefact()
    contamination: ContaminationArtefact = ContaminationArtefact()
    charging: ChargingArtefact = ChargingArtefact()
    data_bar: DataBarArtefact = DataBarArtefact()


class Optics(_Strict):
    psf_sigma_px: _range_type(ge=0, le=32) | None = None  # None → the instrument's


class Scan(_Strict):
    drift_px: float | None = Field(None, ge=0, le=1000)
    line_jitter_px: float | None = Field(None, ge=0, le=100)


#: dose of recipes that set none, on instruments whose profile names none (an SEM's)
DEFAULT_DOSE = (50.0, 200.0)


class DetectorOverrides(_Strict):
    # electrons (photoelectrons) per pixel at full signal; None: the instrument profile's
    # detector.dose, else DEFAULT_DOSE
    dose: _range_type(gt=0, le=1e9) | None = None


class Labels(_Strict):
    names: list[Literal["grain_id", "boundary", "twin", "twin_boundary", "phase"]] = [
        "grain_id", "boundary"]
    boundary_width_px: float = Field(2.0, gt=0, le=64)
    twin_boundary_width_px: float | None = Field(
        None, gt=0, le=64, description="twin-boundary band width, px (omit: boundary_width_px)")

    @field_validator("names")
    @classmethod
    def _unique(cls, v):
        return unique_names(v)


def unique_names(v: list[str]) -> list[str]:
    """Validator body for label-name lists: non-empty, no repeats."""
    if len(set(v)) != len(v) or not v:
        raise ValueError("label names must be a non-empty list without repeats")
    return v


class Output(_Strict):
    compression: Literal["lz4", "gzip", "none"] = "lz4"
    geometry: bool = Field(False, description="store /geometry grain_table and grain_polygons "
                                              "(specimen px; kind voronoi only)")


class RecipeBase(_Strict):
    """Keys every recipe shares (grains, HRTEM/STEM, BF-TEM): what, how many, which instrument."""

    #: "module:Class" of the pipeline that renders this recipe (see twin.generate.make_pipeline)
    pipeline: ClassVar[str] = "twin.pipeline:SEMGrainPipeline"

    name: str = Field(min_length=1, max_length=200)
    size: tuple[int, int] = Field(description="image (H, W) in px")
    pixel_size: PixelSize = PixelSize(value=20.0, unit="nm")
    instrument: str = "generic-sem"
    samples: int = Field(64, ge=1, le=100_000_000)
    specimens: int = Field(16, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)

    @field_validator("size")
    @classmethod
    def _size(cls, v):
        if not all(8 <= x <= 16384 for x in v):
            raise ValueError("each side must be within 8..16384 px")
        return v

    @model_validator(mode="after")
    def _specimens(self):
        if self.specimens > self.samples:
            raise ValueError(
                f"specimens ({self.specimens}) must be <= samples ({self.samples}): "
                "each specimen is imaged at least once"
            )
        return self

    @property
    def samples_per_specimen(self) -> int:
        """Consecutive samples sharing one specimen: ceil(samples / specimens)."""
        return -(-self.samples // self.specimens)


class Recipe(RecipeBase):
    """A generation recipe (see ``recipes/sem_voronoi_grains.yaml`` for every key, commented)."""

    specimen: SpecimenModel = VoronoiSpecimen()
    contrast: Contrast = Contrast()
    optics: Optics = Optics()
    scan: Scan = Scan()
    detector: DetectorOverrides = DetectorOverrides()
    labels: Labels = Labels()
    artefacts: ArtefactsConfig = ArtefactsConfig()
    output: Output = Output()

    @model_validator(mode="after")
    def _features_fit_kind(self):
        if self.output.geometry and self.specimen.kind != "voronoi":
            raise ValueError("output.geometry needs specimen.kind voronoi (exact cell polygons)")
        if self.specimen.kind != "voronoi":
            f = self.specimen.features
            bad = [n for n in VORONOI_ONLY_FEATURES if getattr(f, n).enabled]
            if bad:
                raise ValueError(
                    f"specimen.features {', '.join(bad)} need specimen.kind voronoi (they use its "
                    f"convex cells); kind {self.specimen.kind} supports twins and phases")
        return self


def format_validation_error(err: ValidationError, source: str) -> str:
    """One message naming each bad key, its value and what is allowed."""
    parts = []
    for e in err.errors():
        # pydantic puts union/tagged members into the location: keep only user-visible keys
        loc = ".".join(
            str(x) for x in e["loc"] if not (isinstance(x, str) and (
                "[" in x or x.startswith("function-") or x in _SPECIMEN_TAGS))
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(x) for x in e["loc"][:-1] if x not in _SPECIMEN_TAGS)
            parts.append(f"unknown key '{loc}' (not allowed in {parent or 'the top level'})")
        elif e["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
        elif not loc or isinstance(e.get("input"), dict):
            # a check across keys (a model validator): its message names them; the input is a
            # whole (sub-)recipe, not a value to quote
            parts.append(f"{loc}: {msg}" if loc else msg)
        else:
            parts.append(f"{loc} = {e.get('input')!r}: {msg}")
    return f"{source}: invalid recipe: " + "; ".join(parts)


_UNPARSED = object()  # validate_yaml: no parsed data given
_FAST_LOADER = getattr(yaml, "CSafeLoader", None)  # PyYAML built with libyaml


def safe_load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, parsed by libyaml where PyYAML has it.

    The C parser builds the same Python objects with the same safe constructor ~10x faster
    (a recipe or instrument profile: ~0.5 instead of ~7 ms; ``twin generate`` parses each
    several times per run). Text it rejects is parsed again by the pure-Python parser, so the
    :class:`yaml.YAMLError` raised (its message and line/column) is the one it has always been.

    Parameters
    ----------
    text : str
        YAML text.

    Returns
    -------
    The parsed document (``None`` for an empty one).

    Raises
    ------
    yaml.YAMLError
        Malformed YAML (from :func:`yaml.safe_load`).
    """
    if _FAST_LOADER is not None:
        try:
            return yaml.load(text, Loader=_FAST_LOADER)  # noqa: S506 - a safe loader
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def validate_yaml(text: str, model: type[BaseModel], source: str, what: str = "recipe",
                  data: Any = _UNPARSED):
    """Parse YAML ``text`` and validate it with ``model``; every problem → one RecipeError line.

    Parameters
    ----------
    text : YAML text
    model : the pydantic model (e.g. :class:`Recipe`)
    source : where the text came from (file name), first in the message
    what : "recipe" or "instrument profile", for the message
    data : optional
        ``yaml.safe_load(text)`` when the caller has it already (not parsed again).
    """
    try:
        if data is _UNPARSED:
            data = safe_load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{source}: malformed YAML{where} in {what}: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a {what} must be a YAML mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        msg = format_validation_error(exc, source)
        raise RecipeError(msg.replace("invalid recipe", f"invalid {what}")) from None


#: specimen.kind → "module:Class" of the recipe model for kinds that are not grain specimens.
#: Every kind not listed here is validated by :class:`Recipe` (whose schema names the grain kinds).
RECIPE_KINDS: dict[str, str] = {
    "atomic-nanoparticles": "twin.recipe_tem:AtomicTEMRecipe",        # HRTEM / STEM via abTEM
    "mesoscale-nanoparticles": "twin.recipe_bftem:BFTEMRecipe",      # mesoscale bright-field TEM
}


def recipe_model(text: str) -> type[BaseModel]:
    """The recipe model class for a recipe text, chosen by its ``specimen.kind``."""
    try:
        data = safe_load_yaml(text)
    except yaml.YAMLError:
        return Recipe  # validate_yaml reports the YAML error
    return _model_for(data)


def _model_for(data: Any) -> type[BaseModel]:
    """The recipe model class for parsed recipe YAML (see :func:`recipe_model`)."""
    import importlib

    kind = None
    if isinstance(data, dict) and isinstance(data.get("specimen"), dict):
        kind = data["specimen"].get("kind")
    path = RECIPE_KINDS.get(kind) if isinstance(kind, str) else None
    if path is None:
        return Recipe
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def parse_recipe(text: str, source: str = "<recipe>"):
    """Validate recipe YAML text with the model its ``specimen.kind`` selects.

    Returns
    -------
    Recipe, or the model registered in :data:`RECIPE_KINDS` for the specimen kind.

    Raises
    ------
    RecipeError
        Malformed YAML, a non-mapping document, unknown keys or out-of-range values.
    """
    try:
        data = safe_load_yaml(text)  # once, for the model choice and the validation
    except yaml.YAMLError:
        return validate_yaml(text, Recipe, source, "recipe")  # reports the YAML error
    return validate_yaml(text, _model_for(data), source, "recipe", data=data)


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    """Read and validate a recipe file; returns the recipe and its text (for provenance)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{p}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{p}: cannot read recipe: {exc}") from None
    return parse_recipe(text, str(p)), text


def recipe_sha256(text: str) -> str:
    """SHA-256 of the recipe text (hex)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
