"""Recipe schema of the atomic-resolution TEM twin (HRTEM and STEM HAADF through abTEM).

Selected by ``specimen.kind: atomic-nanoparticles`` (twin.recipe.RECIPE_KINDS).  Strict like
:class:`twin.recipe.Recipe`: unknown keys and out-of-range values are refused, with the key, its
value and what is allowed.  See ``recipes/hrtem_au_nanoparticles.yaml`` for every key.

Exit-wave reuse (HRTEM): one specimen = one set of atoms = one exit wave, computed once and
imaged by its ``samples_per_specimen`` = K consecutive samples, each with its own draw of
defocus, Cs and dose.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from twin.recipe import Output, PixelSize, RecipeBase, _range_type, _Strict, unique_names

__all__ = ["AtomicTEMRecipe"]

_TO_A = {"pm": 0.01, "Å": 1.0, "A": 1.0, "nm": 10.0, "um": 1e4, "µm": 1e4}


class ShapeWeights(_Strict):
    octahedron: float = Field(1.0, ge=0)
    decahedron: float = Field(1.0, ge=0)
    icosahedron: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some(self):
        if self.octahedron + self.decahedron + self.icosahedron <= 0:
            raise ValueError("at least one shape weight must be > 0")
        return self


class CarbonSupport(_Strict):
    thickness_nm: _range_type(ge=0, le=100) = (2.0, 4.0)
    density_g_cm3: float = Field(2.0, gt=0, le=3.5)
    min_distance_a: float = Field(1.3, gt=0, le=3)


class AtomicSpecimen(_Strict):
    kind: Literal["atomic-nanoparticles"] = "atomic-nanoparticles"
    element: str = Field("Au", min_length=1, max_length=3)
    shapes: ShapeWeights = ShapeWeights()
    diameter_nm: _range_type(gt=0, le=1000) = (2.0, 4.0)
    particles_per_field: tuple[int, int] = (1, 3)
    orientation: Literal["random", "zone-axis"] = "zone-axis"
    zone_axis: tuple[float, float, float] = (1.0, 1.0, 0.0)
    min_gap_nm: float = Field(0.5, ge=0, le=1000)
    support: CarbonSupport = CarbonSupport()

    @field_validator("element")
    @classmethod
    def _element(cls, v):
        from generators.tem.atoms import fcc_lattice_constant

        fcc_lattice_constant(v)  # ValueError: unknown or non-FCC element
        return v

    @field_validator("particles_per_field")
    @classmethod
    def _count(cls, v):
        if not 0 <= v[0] <= v[1] <= 1000:
            raise ValueError("needs 0 <= low <= high <= 1000")
        return v


class HRTEMSettings(_Strict):
    defocus_nm: _range_type(ge=-1e4, le=1e4) = (-10.0, 10.0)   # per sample; > 0: underfocus
    cs_mm: _range_type(ge=-100, le=100) | None = None          # per sample; None → instrument's
    defocus_spread_nm: float | None = Field(None, ge=0, le=1000)   # σ; None → instrument's
    convergence_mrad: float | None = Field(None, ge=0, le=100)     # None → instrument's
    aperture_mrad: float | None = Field(None, gt=0, le=1000)       # None: no objective aperture
    max_angle_mrad: float = Field(30.0, gt=0, le=1000,
                                  description="highest scattering angle the image must carry")


class STEMSettings(_Strict):
    semiangle_mrad: float = Field(20.0, gt=0, le=200)
    inner_mrad: float = Field(70.0, ge=0, le=1000)
    outer_mrad: float = Field(150.0, gt=0, le=1000)
    defocus_nm: float = Field(0.0, ge=-1e4, le=1e4)
    cs_mm: float = Field(0.0, ge=-100, le=100)

    @model_validator(mode="after")
    def _angles(self):
        if self.outer_mrad <= self.inner_mrad:
            raise ValueError("outer_mrad must be > inner_mrad")
        return self


class Imaging(_Strict):
    mode: Literal["hrtem", "stem-haadf"] = "hrtem"
    voltage_kv: float | None = Field(None, gt=0, le=3000)   # None → the instrument's tem.voltage_kv
    sampling_a: float = Field(0.05, gt=0, le=2, description="largest simulation sampling, Å")
    slice_thickness_a: float = Field(2.0, gt=0, le=50)
    # numpy: bit-identical datasets whatever the worker count; fftw: ~2.5x faster multislice, but
    # FFTW's timed plans differ between processes at float32 round-off (flipping rare Poisson draws)
    fft: Literal["numpy", "fftw"] = "numpy"
    hrtem: HRTEMSettings = HRTEMSettings()
    stem: STEMSettings = STEMSettings()


class Optics(_Strict):
    psf_sigma_px: _range_type(ge=0, le=32) | None = None  # None → the instrument's (HRTEM only)


class Scan(_Strict):
    drift_px: float | None = Field(None, ge=0, le=1000)
    line_jitter_px: float | None = Field(None, ge=0, le=100)


class DetectorOverrides(_Strict):
    dose_e_per_a2: _range_type(gt=0, le=1e9) = (500.0, 2000.0)


class Labels(_Strict):
    names: list[Literal["particle", "instance"]] = ["particle", "instance"]
    radius_a: float = Field(1.4, gt=0, le=20,
                            description="dilation of each particle's projected convex hull, Å")

    @field_validator("names")
    @classmethod
    def _unique(cls, v):
        return unique_names(v)


class AtomicTEMRecipe(RecipeBase):
    """An HRTEM / STEM-HAADF nanoparticle recipe (see ``recipes/hrtem_au_nanoparticles.yaml``)."""

    pipeline: ClassVar[str] = "twin.pipeline_tem:AtomicTEMPipeline"

    pixel_size: PixelSize = PixelSize(value=0.4, unit="Å")
    instrument: str = "generic-tem-camera"
    specimen: AtomicSpecimen
    imaging: Imaging = Imaging()
    optics: Optics = Optics()
    scan: Scan = Scan()
    detector: DetectorOverrides = DetectorOverrides()
    labels: Labels = Labels()
    output: Output = Output()

    @property
    def pixel_size_a(self) -> float:
        """Image pixel size, Å."""
        return self.pixel_size.value * _TO_A[self.pixel_size.unit]

