"""Recipes: YAML files that say what to generate, validated against a strict schema.

Every key is checked: unknown keys and out-of-range values are refused with a message that names
the key, the value and what is allowed.  A range is written either as one number (fixed) or as
``[low, high]`` (drawn uniformly per sample or per specimen, as the key's description says).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from twin.errors import RecipeError

__all__ = ["Recipe", "load_recipe", "parse_recipe", "format_validation_error", "RangeF"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _as_range(v):
    """Accept a number or a [low, high] pair; return (low, high)."""
    if isinstance(v, bool):
        raise ValueError("expected a number or [low, high]")
    if isinstance(v, (int, float)):
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


class VoronoiSpecimen(_Strict):
    kind: Literal["voronoi"] = "voronoi"
    grains_per_field: _range_type(ge=1, le=100000) = (80.0, 300.0)
    seeds: Literal["poisson", "hardcore"] = "poisson"
    min_distance: float = Field(0.5, gt=0, le=1.2, description="fraction of mean seed spacing")
    weights: Literal["none", "lognormal"] = "none"
    weight_sigma: float = Field(0.35, ge=0, le=2.0)
    periodic: bool = True
    specimen_scale: float = Field(2.0, ge=1.0, le=16.0)


class Boundary(_Strict):
    width_px: _range_type(ge=0, le=64) = (1.0, 4.0)
    depth: _range_type(ge=0, le=1) = (0.2, 0.6)


class Contrast(_Strict):
    mode: Literal["sem-channelling"] = "sem-channelling"
    grain_intensity: _range_type(ge=0, le=1) = (0.25, 1.0)
    boundary: Boundary = Boundary()


class Optics(_Strict):
    psf_sigma_px: _range_type(ge=0, le=32) | None = None  # None → the instrument's


class Scan(_Strict):
    drift_px: float | None = Field(None, ge=0, le=1000)
    line_jitter_px: float | None = Field(None, ge=0, le=100)


class DetectorOverrides(_Strict):
    dose: _range_type(gt=0, le=1e9) = (50.0, 200.0)


class Labels(_Strict):
    names: list[Literal["grain_id", "boundary"]] = ["grain_id", "boundary"]
    boundary_width_px: float = Field(2.0, gt=0, le=64)

    @field_validator("names")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v) or not v:
            raise ValueError("label names must be a non-empty list without repeats")
        return v


class Output(_Strict):
    compression: Literal["lz4", "gzip", "none"] = "lz4"


class Recipe(_Strict):
    """A generation recipe (see ``recipes/sem_voronoi_grains.yaml`` for every key, commented)."""

    #: "module:Class" of the pipeline that renders this recipe (see twin.generate.make_pipeline)
    pipeline: ClassVar[str] = "twin.pipeline:SEMGrainPipeline"

    name: str = Field(min_length=1, max_length=200)
    size: tuple[int, int] = Field(description="image (H, W) in px")
    pixel_size: PixelSize = PixelSize(value=20.0, unit="nm")
    instrument: str = "generic-sem"
    samples: int = Field(64, ge=1, le=100_000_000)
    specimens: int = Field(16, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    specimen: VoronoiSpecimen = VoronoiSpecimen()
    contrast: Contrast = Contrast()
    optics: Optics = Optics()
    scan: Scan = Scan()
    detector: DetectorOverrides = DetectorOverrides()
    labels: Labels = Labels()
    output: Output = Output()

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


def format_validation_error(err: ValidationError, source: str) -> str:
    """One message naming each bad key, its value and what is allowed."""
    parts = []
    for e in err.errors():
        # pydantic puts union/tagged members into the location: keep only user-visible keys
        loc = ".".join(
            str(x) for x in e["loc"] if not (isinstance(x, str) and ("[" in x or x.startswith("function-")))
        )
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = ".".join(str(x) for x in e["loc"][:-1])
            parts.append(f"unknown key '{loc}' (not allowed in {parent or 'the top level'})")
        elif e["type"] == "missing":
            parts.append(f"missing required key '{loc}'")
        else:
            parts.append(f"{loc} = {e.get('input')!r}: {msg}")
    return f"{source}: invalid recipe: " + "; ".join(parts)


def validate_yaml(text: str, model: type[BaseModel], source: str, what: str = "recipe"):
    """Parse YAML ``text`` and validate it with ``model``; every problem → one RecipeError line.

    Parameters
    ----------
    text : YAML text
    model : the pydantic model (e.g. :class:`Recipe`)
    source : where the text came from (file name), first in the message
    what : "recipe" or "instrument profile", for the message
    """
    try:
        data = yaml.safe_load(text)
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
    import importlib

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return Recipe  # validate_yaml reports the YAML error
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
    return validate_yaml(text, recipe_model(text), source, "recipe")


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
