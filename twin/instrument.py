"""Instrument profiles: small YAML files describing a detector and its scan.

Schema (every key but ``name``, ``kind`` and the four basic detector keys is optional; an omitted
key is "off", which reproduces the basic Poisson–Gaussian model)::

    name: my-sem
    kind: sem                     # sem | stem | tem | optical
    detector:
      gain: 4.0                   # counts per electron
      readout_sigma: 6.0          # counts
      offset: 200.0               # counts
      bit_depth: 16
      saturation: null            # counts (null: 2**bit_depth - 1)
      fixed_pattern: {row_sigma: 0, col_sigma: 0, seed: null}   # counts; seed: same every frame
      lag_px: 0.0                 # detector lag along the fast scan (exponential), px
    scan:
      drift_px: 1.5               # linear drift per axis over the frame, 1 sigma, px
      line_jitter_px: 0.2         # per-line fast-scan offset, 1 sigma, px
      drift_walk_px: 0.0          # random-walk drift per axis at the frame end, 1 sigma, px
      dwell_time_s: 1.0e-6        # pixel dwell (needed by mains)
      flyback_s: 0.0              # line time = W * dwell + flyback
      mains: {frequency_hz: 50, amplitude_px: [0.3, 0.1]}
      fast_nonlinearity: {amplitude_px: 0.0, decay_px: 20}
      slow_nonlinearity: {amplitude_px: 0.0, decay_px: 20}
    optics:
      psf_sigma_px: [0.6, 1.2]    # Gaussian core, drawn per sample
      psf_kind: gaussian          # gaussian | lorentzian (Gaussian core + Lorentzian tail)
      psf_tail_fraction: 0.0      # weight of the tail
      psf_tail_gamma_px: 2.0      # half-width of the tail
      psf_follows_scan: false     # true: blur in specimen space (jitter moves the blurred line)
      vignetting: {x: 0, y: 0, xx: 0, xy: 0, yy: 0}
    tem: {voltage_kv: 300, cs_mm: 1.2, defocus_spread_nm: 3, convergence_mrad: 0.5}  # TEM only
    pixel_size: {value: 0.01, unit: nm}   # nominal, informative
    calibration: {...}            # written by `twin calibrate`: sources, methods, uncertainties

Shipped generic profiles live in ``twin/instruments/<name>.yaml``; a recipe's ``instrument:`` is
either such a name or a path to a user's profile (e.g. one written by ``twin calibrate``).
The profile text is stored verbatim in every dataset's provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from twin.errors import RecipeError
from twin.recipe import _range_type, validate_yaml

__all__ = ["Instrument", "load_instrument", "shipped_instruments", "parse_instrument"]

_DIR = Path(__file__).parent / "instruments"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FixedPatternProfile(_Strict):
    row_sigma: float = Field(0.0, ge=0, le=1e5, description="std of per-row offsets, counts")
    col_sigma: float = Field(0.0, ge=0, le=1e5, description="std of per-column offsets, counts")
    seed: int | None = Field(None, ge=0, lt=2**63,
                             description="fixed pattern key (same offsets every frame); "
                                         "null: a new pattern per frame")


class DetectorProfile(_Strict):
    gain: float = Field(gt=0, le=1e6, description="counts per electron")
    readout_sigma: float = Field(ge=0, le=1e6, description="counts")
    offset: float = Field(ge=-65535, le=65535,
                          description="counts (negative for offset-subtracted cameras; "
                                      "recorded values are clipped at 0)")
    bit_depth: int = Field(ge=1, le=16)
    saturation: float | None = Field(None, gt=0, le=65535,
                                     description="counts; null: 2**bit_depth - 1")
    fixed_pattern: FixedPatternProfile = FixedPatternProfile()
    lag_px: float = Field(0.0, ge=0, le=1000,
                          description="detector lag time constant along the fast scan, px")
    #: the exposure this detector is normally run at (electrons or photoelectrons per pixel at
    #: full signal): the dose of recipes that do not set ``detector.dose`` (None: the recipe
    #: schema's default, 50-200, an SEM's)
    dose: _range_type(gt=0, le=1e9) | None = None


def _xy_pair(v):
    """A number (both axes) or [x, y]; each within 0..100 px."""
    if isinstance(v, bool):
        raise ValueError("expected a number or [x, y]")
    if isinstance(v, (int, float)):
        v = (v, v)
    if not (isinstance(v, (list, tuple)) and len(v) == 2
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
        raise ValueError("expected a number (both axes) or a list [x, y]")
    if not all(0 <= x <= 100 for x in v):
        raise ValueError("each amplitude must be within 0..100 px")
    return (float(v[0]), float(v[1]))


class MainsProfile(_Strict):
    frequency_hz: float = Field(50.0, gt=0, le=1e6)
    amplitude_px: Annotated[tuple[float, float], BeforeValidator(_xy_pair)] = (0.0, 0.0)


class NonlinearityProfile(_Strict):
    amplitude_px: float = Field(0.0, ge=-1000, le=1000)
    decay_px: float = Field(20.0, gt=0, le=1e6)

    @model_validator(mode="after")
    def _monotonic(self):
        if abs(self.amplitude_px) >= self.decay_px:
            raise ValueError(f"|amplitude_px| ({self.amplitude_px:g}) must be < decay_px "
                             f"({self.decay_px:g}) for a monotonic scan")
        return self


class ScanProfile(_Strict):
    drift_px: float = Field(0.0, ge=0, le=1000)
    line_jitter_px: float = Field(0.0, ge=0, le=100)
    drift_walk_px: float = Field(0.0, ge=0, le=1000)
    dwell_time_s: float | None = Field(None, gt=0, le=100)
    flyback_s: float = Field(0.0, ge=0, le=100)
    mains: MainsProfile | None = None
    fast_nonlinearity: NonlinearityProfile = NonlinearityProfile()
    slow_nonlinearity: NonlinearityProfile = NonlinearityProfile()

    @model_validator(mode="after")
    def _mains_needs_timing(self):
        if self.mains is not None and any(self.mains.amplitude_px) and self.dwell_time_s is None:
            raise ValueError("mains interference needs scan.dwell_time_s (the pixel dwell time, "
                             "s): the mains phase of a pixel is set by dwell and line time")
        return self


class VignettingProfile(_Strict):
    """Coefficients of the centred field 1 + x·u + y·v + xx·(u²−ū²) + xy·u·v + yy·(v²−v̄²)."""

    x: float = Field(0.0, ge=-1, le=1)
    y: float = Field(0.0, ge=-1, le=1)
    xx: float = Field(0.0, ge=-1, le=1)
    xy: float = Field(0.0, ge=-1, le=1)
    yy: float = Field(0.0, ge=-1, le=1)

    def coefficients(self) -> tuple[float, float, float, float, float]:
        return (self.x, self.y, self.xx, self.xy, self.yy)


class OpticsProfile(_Strict):
    psf_sigma_px: _range_type(ge=0, le=32) = (0.6, 1.2)
    psf_kind: Literal["gaussian", "lorentzian"] = "gaussian"
    psf_tail_fraction: _range_type(ge=0, le=1) = (0.0, 0.0)
    psf_tail_gamma_px: _range_type(gt=0, le=256) = (2.0, 2.0)
    psf_follows_scan: bool = Field(
        False, description="true: the probe PSF blurs in specimen space, so line jitter and "
                           "mains move the blurred signal with each line (a scanned probe); false: "
                           "the PSF blurs the recorded image grid (the basic model)")
    vignetting: VignettingProfile = VignettingProfile()


class TEMProfile(_Strict):
    voltage_kv: float = Field(gt=0, le=3000)
    cs_mm: float = Field(1.2, ge=-100, le=100)
    defocus_spread_nm: float = Field(3.0, ge=0, le=1000)
    convergence_mrad: float = Field(0.5, ge=0, le=1000)


class PixelSizeProfile(_Strict):
    value: float = Field(gt=0)
    unit: str = "nm"


class Instrument(_Strict):
    """An instrument profile (detector, scan, optics; TEM optics for TEM cameras)."""

    name: str
    kind: Literal["sem", "stem", "tem", "optical"]
    detector: DetectorProfile
    scan: ScanProfile = ScanProfile()
    optics: OpticsProfile = OpticsProfile()
    tem: TEMProfile | None = None
    pixel_size: PixelSizeProfile | None = None
    calibration: dict[str, Any] | None = Field(
        None, description="provenance written by `twin calibrate` (files, methods, uncertainties)")


def shipped_instruments() -> list[str]:
    """Names of the profiles shipped with emtwin."""
    return sorted(p.stem for p in _DIR.glob("*.yaml"))


def load_instrument(ref: str, base_dir: Path | None = None) -> tuple[Instrument, str]:
    """Resolve a profile name or path; return the validated profile and its text.

    Parameters
    ----------
    ref : str
        A shipped profile name (``generic-sem``) or a path to a YAML file.
    base_dir : Path, optional
        Directory against which a relative path is resolved (the recipe's folder).

    Raises
    ------
    RecipeError
        Unknown name, unreadable file or invalid profile.
    """
    looks_like_path = ref.endswith((".yaml", ".yml")) or "/" in ref or "\\" in ref
    if looks_like_path:
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        if not path.is_file():
            raise RecipeError(f"instrument profile file '{ref}' not found")
    else:
        path = _DIR / f"{ref}.yaml"
        if not path.is_file():
            raise RecipeError(
                f"unknown instrument '{ref}': shipped profiles are "
                f"{', '.join(shipped_instruments())}, or give a path to a .yaml profile"
            )
    text = path.read_text(encoding="utf-8")
    return parse_instrument(text, str(path)), text


def parse_instrument(text: str, source: str = "<instrument>") -> Instrument:
    """Validate instrument-profile YAML text.

    Raises
    ------
    RecipeError
        Malformed YAML, a non-mapping document, unknown keys or out-of-range values.
    """
    return validate_yaml(text, Instrument, source, "instrument profile")
