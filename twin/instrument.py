"""Instrument profiles: small YAML files describing a detector and its scan.

Shipped generic profiles live in ``twin/instruments/<name>.yaml``; a recipe's ``instrument:`` is
either such a name or a path to a user's profile (e.g. one written by ``twin calibrate``).
The profile text is stored verbatim in every dataset's provenance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from twin.errors import RecipeError
from twin.recipe import _range_type, format_validation_error

__all__ = ["Instrument", "load_instrument", "shipped_instruments"]

_DIR = Path(__file__).parent / "instruments"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DetectorProfile(_Strict):
    gain: float = Field(gt=0, le=1e6, description="counts per electron")
    readout_sigma: float = Field(ge=0, le=1e6, description="counts")
    offset: float = Field(ge=0, le=65535, description="counts")
    bit_depth: int = Field(ge=1, le=16)


class ScanProfile(_Strict):
    drift_px: float = Field(0.0, ge=0, le=1000)
    line_jitter_px: float = Field(0.0, ge=0, le=100)


class OpticsProfile(_Strict):
    psf_sigma_px: _range_type(ge=0, le=32) = (0.6, 1.2)


class Instrument(_Strict):
    """An instrument profile (detector, scan, optics)."""

    name: str
    kind: Literal["sem", "stem", "tem", "optical"]
    detector: DetectorProfile
    scan: ScanProfile = ScanProfile()
    optics: OpticsProfile = OpticsProfile()


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
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: malformed YAML in instrument profile: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: an instrument profile must be a YAML mapping")
    try:
        return Instrument.model_validate(data), text
    except ValidationError as exc:
        msg = format_validation_error(exc, str(path)).replace("invalid recipe", "invalid instrument profile")
        raise RecipeError(msg) from None
