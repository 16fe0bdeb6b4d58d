"""Recipe schema of the mesoscale bright-field TEM twin.

Selected by ``specimen.kind: mesoscale-nanoparticles`` (twin.recipe.RECIPE_KINDS).

Strict like :class:`twin.recipe.Recipe`: unknown keys and out-of-range values are refused, with
the key, its value and what is allowed.  See ``recipes/tem_bf_nanoparticles.yaml`` for every key.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from twin.recipe import Output, PixelSize, RecipeBase, _range_type, _Strict, unique_names

__all__ = ["BFTEMRecipe"]

_TO_NM = {"pm": 1e-3, "Å": 0.1, "A": 0.1, "nm": 1.0, "um": 1e3, "µm": 1e3}


class ShapeWeights(_Strict):
    sphere: float = Field(0.6, ge=0)
    ellipsoid: float = Field(0.3, ge=0)
    faceted: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _some(self):
        if self.sphere + self.ellipsoid + self.faceted <= 0:
            raise ValueError("at least one shape weight must be > 0")
        return self


class Material(_Strict):
    mean_inner_potential_v: _range_type(gt=0, le=100) = (20.0, 30.0)
    mean_free_path_nm: _range_type(gt=0, le=1e5) = (30.0, 60.0)
    texture: _range_type(ge=0, le=2) = (0.0, 0.0)
    texture_correlation_nm: _range_type(gt=0, le=1000) = (1.0, 3.0)


class Support(_Strict):
    thickness_nm: _range_type(ge=0, le=1000) = (10.0, 30.0)
    mean_inner_potential_v: _range_type(gt=0, le=100) = (8.0, 11.0)
    mean_free_path_nm: _range_type(gt=0, le=1e5) = (150.0, 250.0)
    roughness: _range_type(ge=0, le=1) = (0.15, 0.3)
    correlation_nm: _range_type(gt=0, le=1000) = (0.5, 1.5)
    spectrum_exponent: _range_type(gt=0, le=10) = (3.0, 3.0)


class BFSpecimen(_Strict):
    kind: Literal["mesoscale-nanoparticles"] = "mesoscale-nanoparticles"
    specimen_scale: float = Field(1.5, ge=1.0, le=8.0,
                                  description="specimen side / field side (views per specimen)")
    coverage: _range_type(ge=0, le=0.6) = (0.13, 0.23)
    diameter_median_nm: _range_type(gt=0, le=1e4) = (15.0, 25.0)
    diameter_sigma: float = Field(0.35, ge=0, le=2)
    diameter_range_nm: _range_type(gt=0, le=1e4) = (5.0, 50.0)
    shapes: ShapeWeights = ShapeWeights()
    aspect: _range_type(ge=1, le=5) = (1.0, 1.3)
    thickness_ratio: _range_type(gt=0, le=5) = (0.8, 1.0)
    neck_probability: float = Field(0.1, ge=0, le=1)
    neck_radius_fraction: _range_type(gt=0, le=1) = (0.3, 0.6)
    min_gap_nm: float = Field(1.0, ge=0, le=1000)
    motion_blur_nm: _range_type(ge=0, le=1000) = Field(
        (0.0, 0.0), description="rms displacement of the particles during one exposure (in-situ "
                                "heating: particles jiggle on the support), drawn per sample")
    material: Material = Material()
    support: Support = Support()


class Imaging(_Strict):
    defocus_nm: _range_type(ge=-1e5, le=1e5) = (500.0, 1500.0)
    cs_mm: float | None = Field(None, ge=-100, le=100)                 # None → the instrument's
    defocus_spread_nm: float | None = Field(None, ge=0, le=1000)       # None → the instrument's
    convergence_mrad: float | None = Field(None, ge=0, le=100)         # None → the instrument's
    aperture_mrad: float | None = Field(None, gt=0, le=1000)           # None: no aperture
    margin_px: int = Field(32, ge=0, le=1024)


class Optics(_Strict):
    psf_sigma_px: _range_type(ge=0, le=32) | None = None  # None → the instrument's


class DetectorOverrides(_Strict):
    dose: _range_type(gt=0, le=1e9) = (50.0, 200.0)


class Labels(_Strict):
    names: list[Literal["particle", "instance"]] = ["particle", "instance"]

    @field_validator("names")
    @classmethod
    def _unique(cls, v):
        return unique_names(v)


class BFTEMRecipe(RecipeBase):
    """A mesoscale bright-field TEM recipe (see ``recipes/tem_bf_nanoparticles.yaml``)."""

    pipeline: ClassVar[str] = "twin.pipeline_bftem:BFTEMPipeline"

    pixel_size: PixelSize = PixelSize(value=0.35, unit="nm")
    instrument: str = "generic-tem-camera"
    specimen: BFSpecimen
    imaging: Imaging = Imaging()
    optics: Optics = Optics()
    detector: DetectorOverrides = DetectorOverrides()
    labels: Labels = Labels()
    output: Output = Output()

    @model_validator(mode="after")
    def _checks(self):
        px = self.pixel_size_nm
        lo, hi = self.specimen.diameter_range_nm
        side = min(self.size) * px
        if hi > side:
            raise ValueError(f"specimen.diameter_range_nm: particle larger than the field "
                             f"(max diameter {hi:g} nm > field side {side:g} nm)")
        if lo / px < 2.0:
            raise ValueError(f"pixel_size: sampling too coarse: the smallest particle ({lo:g} nm) "
                             f"spans {lo / px:.2f} px < 2 px")
        return self

    @property
    def pixel_size_nm(self) -> float:
        """Pixel size in nm."""
        return self.pixel_size.value * _TO_NM[self.pixel_size.unit]

