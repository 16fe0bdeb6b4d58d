"""Physics-gated augmentation: albumentations pipelines built from what the physics allows.

A user declares the symmetries and invariances of the *problem* (specimen + instrument + label) in
a :class:`Physics`; :func:`build_pipeline` turns that into an :class:`albumentations.Compose`
holding only transforms that keep image and label physically consistent, and refuses — with the
physical reason — any extra transform (or requested option) that the physics forbids
(:class:`ForbiddenTransform`). :func:`check_transform` applies the same gate to a pipeline a user
wrote by hand.

=========================  ========================================================================
declared physics           what it forbids (and why)
=========================  ========================================================================
``mirror=False``           flips, transposes, reflections (a chiral structure's mirror image is a
                           different specimen)
``rotation="none"``        any rotation or transpose (the image orientation is physical, e.g. a
                           scan, tilt or growth axis); ``"90"``: arbitrary angles (only quarter
                           turns are symmetries); ``"any"``: nothing
``polarity=True``          vertical flips and rotations (top and bottom differ: the surface of a
                           cross-section, a growth direction); needs ``rotation="none"``
``intensity_calibrated``   brightness, contrast, gamma, tone, equalisation, inversion, dropout
                           (the label is read from calibrated intensity, e.g. HAADF thickness)
``orientation_colour``     hue, saturation, channel shuffles/shifts, grey conversion (colour
                           encodes crystal orientation, as in EBSD IPF maps)
``metric=True``            scale, shear, elastic, grid and perspective warps, resizing crops (sizes
                           and shapes are the answer, e.g. grain size from the pixel size)
=========================  ========================================================================

Always refused: transforms that move image pixels without moving the labels (``GlassBlur``).

Noise and blur follow the instrument twin (:class:`NoiseModel`): :class:`PoissonGaussianNoise`
re-renders the image as ``counts = g·Poisson(d·s) + N(0, σ_r²) + o`` (quantised, clipped to the bit
depth) at a drawn dose ``d``, with gain ``g``, readout ``σ_r`` and offset ``o`` from an instrument
profile; blur is a Gaussian probe whose σ is drawn from the profile's ``optics.psf_sigma_px``.

Images are float32 in ``[0, 1]`` (``sdk.data`` hands the transform a percentile-scaled working
image) or uint8; geometric transforms interpolate the image bilinearly and every mask by nearest
neighbour, in one call: ``pipeline(image=image, mask=label)`` or ``masks=[...]``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Iterator, Mapping, Sequence

import albumentations as A
import cv2
import numpy as np
from pydantic import Field, model_validator

__all__ = [
    "ForbiddenTransform",
    "Physics",
    "NoiseModel",
    "PoissonGaussianNoise",
    "poisson_gaussian",
    "build_pipeline",
    "check_transform",
    "align_masks",
    "iter_transforms",
    "ROTATIONS",
    "STRENGTHS",
]

ROTATIONS = ("none", "90", "any")
STRENGTHS = ("none", "light", "medium", "strong")


class ForbiddenTransform(ValueError):
    """A transform (or requested option) contradicts the declared :class:`Physics`.

    The message names the transform and the physical reason.
    """


# --------------------------------------------------------------------------------------------
# Declared physics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Physics:
    """The symmetries and invariances of a segmentation problem.

    Parameters
    ----------
    mirror : bool
        The label is unchanged (moves with the image) under a mirror reflection. False for chiral
        structures. With ``rotation="none"`` only the two axis flips are used (never both at
        once, which would be a 180° rotation).
    rotation : {"none", "90", "any"}, optional
        Rotations that are symmetries: none, quarter turns, or any angle. Default ``"90"``, or
        ``"none"`` when ``polarity`` is set.
    intensity_calibrated : bool
        The label is read from calibrated intensity (e.g. thickness or atomic number from HAADF
        counts): brightness, contrast, gamma and tone changes are forbidden.
    polarity : bool
        Top and bottom of the image differ (cross-section surface, growth direction): vertical
        flips and rotations are forbidden; ``rotation`` must be ``"none"``.
    orientation_colour : bool
        Colour encodes crystal orientation (EBSD IPF/Euler maps): colour changes are forbidden.
        Rotating or flipping such a map does not recolour it, which is right only for colour keys
        along the viewing direction (IPF-Z): for IPF-X/Y maps declare ``rotation="none"`` and
        ``mirror=False`` too.
    metric : bool
        Sizes and shapes are the answer (grain size, particle size distribution): scale, shear
        and elastic warps are forbidden.

    Raises
    ------
    ForbiddenTransform
        If ``polarity`` is combined with ``rotation`` ``"90"`` or ``"any"``.
    ValueError
        If ``rotation`` is not one of :data:`ROTATIONS`.
    """

    mirror: bool = True
    rotation: str | None = None
    intensity_calibrated: bool = False
    polarity: bool = False
    orientation_colour: bool = False
    metric: bool = False

    def __post_init__(self) -> None:
        rot = self.rotation
        if rot is None:
            rot = "none" if self.polarity else "90"
        rot = str(rot).lower()
        if rot in ("0", "false"):
            rot = "none"
        if rot not in ROTATIONS:
            raise ValueError(f"Physics rotation {self.rotation!r} is not allowed "
                             f"(allowed: {', '.join(ROTATIONS)})")
        if self.polarity and rot != "none":
            raise ForbiddenTransform(
                f"Physics(polarity=True, rotation={rot!r}) contradicts itself: with polarity top and "
                "bottom differ (e.g. the surface of a cross-section), and a rotation moves the top "
                "edge to a side or the bottom; use rotation='none'")
        object.__setattr__(self, "rotation", rot)
        for name in ("mirror", "intensity_calibrated", "polarity", "orientation_colour", "metric"):
            object.__setattr__(self, name, bool(getattr(self, name)))


# --------------------------------------------------------------------------------------------
# Instrument noise model
# --------------------------------------------------------------------------------------------


def _pair(v: Any, what: str) -> tuple[float, float]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), float(v)
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number or a [low, high] pair, got {v!r}") from None
    if lo > hi:
        raise ValueError(f"{what} must have low <= high, got {v!r}")
    return lo, hi


@dataclass(frozen=True)
class NoiseModel:
    """Poisson–Gaussian detector and Gaussian probe of an instrument twin.

    ``counts = g · Poisson(d · s) + N(0, σ_r²) + o``, rounded and clipped to ``[0, 2^bits − 1]``,
    for a relative signal ``s ≥ 0`` and dose ``d``.

    Parameters
    ----------
    gain : float
        ``g``, counts per electron.
    readout_sigma : float
        ``σ_r``, counts.
    offset : float
        ``o``, counts.
    bit_depth : int
        Quantisation depth.
    dose_range : (float, float)
        Electrons per pixel at signal 1; augmentation draws ``d`` log-uniformly in this range.
    psf_sigma_px : (float, float)
        Gaussian probe σ range in px for the blur augmentation.
    """

    gain: float = 1.0
    readout_sigma: float = 0.0
    offset: float = 0.0
    bit_depth: int = 16
    dose_range: tuple[float, float] = (20.0, 500.0)
    psf_sigma_px: tuple[float, float] = (0.5, 1.2)

    def __post_init__(self) -> None:
        if not self.gain > 0:
            raise ValueError(f"NoiseModel gain must be > 0 counts/e-, got {self.gain}")
        if self.readout_sigma < 0:
            raise ValueError(f"NoiseModel readout_sigma must be >= 0 counts, got {self.readout_sigma}")
        if not 1 <= int(self.bit_depth) <= 32:
            raise ValueError(f"NoiseModel bit_depth must be in 1..32, got {self.bit_depth}")
        dose = _pair(self.dose_range, "NoiseModel dose_range")
        if dose[0] <= 0:
            raise ValueError(f"NoiseModel dose_range must be > 0 e-/px, got {self.dose_range}")
        psf = _pair(self.psf_sigma_px, "NoiseModel psf_sigma_px")
        if psf[0] < 0:
            raise ValueError(f"NoiseModel psf_sigma_px must be >= 0 px, got {self.psf_sigma_px}")
        object.__setattr__(self, "dose_range", dose)
        object.__setattr__(self, "psf_sigma_px", psf)
        object.__setattr__(self, "bit_depth", int(self.bit_depth))
        object.__setattr__(self, "gain", float(self.gain))
        object.__setattr__(self, "readout_sigma", float(self.readout_sigma))
        object.__setattr__(self, "offset", float(self.offset))

    @classmethod
    def from_profile(cls, profile: Any, *, dose_range: Any = None) -> "NoiseModel":
        """Noise model from an instrument profile.

        Parameters
        ----------
        profile : NoiseModel, mapping, str or os.PathLike, or None
            A whole profile mapping (``detector:``, optional ``optics:``), a ``detector:`` section
            alone (keys ``gain``, ``readout_sigma``, ``offset``, ``bit_depth``; optional
            ``dose``), a shipped profile name (``"generic-sem"``) or a path to a profile YAML, or
            a :class:`twin.instrument.Instrument`. None gives the defaults.
        dose_range : float or (float, float), optional
            Overrides the dose range (e⁻/px at signal 1).

        Raises
        ------
        ValueError
            If the profile lacks a detector or has out-of-range values.
        """
        if profile is None:
            base = cls()
        elif isinstance(profile, NoiseModel):
            base = profile
        else:
            if isinstance(profile, (str, os.PathLike)):
                from twin.instrument import load_instrument  # pydantic + yaml only, no Numba

                try:
                    inst, _text = load_instrument(os.fspath(profile))
                except Exception as exc:  # RecipeError: unknown name, bad file
                    raise ValueError(str(exc)) from exc
                profile = inst.model_dump()
            elif hasattr(profile, "model_dump"):
                profile = profile.model_dump()
            if not isinstance(profile, Mapping):
                raise ValueError(f"noise model: expected a profile mapping, name or path, got "
                                 f"{type(profile).__name__}")
            det = profile.get("detector", profile)
            if not isinstance(det, Mapping) or "gain" not in det:
                raise ValueError("noise model: the profile has no detector section with a 'gain' "
                                 "(counts per electron)")
            kw: dict[str, Any] = {k: det[k] for k in ("gain", "readout_sigma", "offset", "bit_depth")
                                  if det.get(k) is not None}
            if det.get("dose") is not None:
                kw["dose_range"] = _pair(det["dose"], "detector dose")
            optics = profile.get("optics") if isinstance(profile.get("optics"), Mapping) else None
            if optics and optics.get("psf_sigma_px") is not None:
                kw["psf_sigma_px"] = _pair(optics["psf_sigma_px"], "optics psf_sigma_px")
            base = cls(**kw)
        if dose_range is not None:
            base = replace(base, dose_range=_pair(dose_range, "dose_range"))
        return base

    @classmethod
    def from_dataset(cls, path: str | os.PathLike) -> "NoiseModel":
        """Noise model of the instrument that made an emtwin HDF5 dataset.

        Gain, readout, offset and bit depth come from the stored instrument profile, the dose
        range from the recipe's ``detector.dose`` and the PSF range from the recipe's or
        profile's ``optics.psf_sigma_px``.

        Raises
        ------
        ValueError
            If the file stores no instrument profile.
        """
        import yaml

        from twin.dataset import open_dataset

        with open_dataset(path) as ds:
            attrs = dict(ds.attrs)
        text = attrs.get("instrument")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: the dataset stores no instrument profile")
        profile = dict(yaml.safe_load(text) or {})
        recipe = yaml.safe_load(attrs.get("recipe") or "") or {}
        rdet = recipe.get("detector") if isinstance(recipe, Mapping) else None
        if isinstance(rdet, Mapping) and rdet.get("dose") is not None:
            profile["detector"] = {**profile.get("detector", {}), "dose": rdet["dose"]}
        ropt = recipe.get("optics") if isinstance(recipe, Mapping) else None
        if isinstance(ropt, Mapping) and ropt.get("psf_sigma_px") is not None:
            profile["optics"] = {**(profile.get("optics") or {}), "psf_sigma_px": ropt["psf_sigma_px"]}
        return cls.from_profile(profile)


def poisson_gaussian(signal: np.ndarray, dose: float, model: NoiseModel,
                     rng: np.random.Generator) -> np.ndarray:
    """Re-render a relative signal through the detector and return it in signal units.

    Parameters
    ----------
    signal : ndarray (H, W) or (H, W, C), float
        Relative signal ``s`` (negative values are treated as 0).
    dose : float
        ``d``, electrons per pixel at ``s = 1``.
    model : NoiseModel
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, float32, same shape
        ``(counts − o) / (g · d)`` with ``counts = clip(round(g·Poisson(d·s) + N(0, σ_r²) + o))``:
        mean ``s`` and variance ``s/d + (σ_r² + 1/12)/(g·d)²`` below saturation.
    """
    lam = np.maximum(np.asarray(signal, dtype=np.float64), 0.0) * dose
    counts = model.gain * rng.poisson(lam).astype(np.float64) + model.offset
    if model.readout_sigma > 0:
        counts += rng.normal(0.0, model.readout_sigma, size=lam.shape)
    np.clip(np.floor(counts + 0.5), 0.0, float(2 ** model.bit_depth - 1), out=counts)
    return ((counts - model.offset) / (model.gain * dose)).astype(np.float32)


class PoissonGaussianNoise(A.ImageOnlyTransform):
    """Lower-dose re-rendering of an image through the instrument twin's Poisson–Gaussian detector.

    The input is read as a relative signal ``s`` (float image, or uint8 scaled by 1/255), a dose
    ``d`` is drawn log-uniformly from ``dose_range``, and the output is
    ``(g·Poisson(d·s) + N(0, σ_r²) + o − o)/(g·d)`` after rounding and clipping the counts to the
    bit depth, so the mean is kept and the noise is signal dependent (shot noise) plus readout.
    A real or synthetic input already carries its own noise: the result looks like a lower dose.

    Parameters
    ----------
    gain, readout_sigma, offset, bit_depth
        Detector (counts per electron, counts, counts, bits), e.g. from
        :meth:`NoiseModel.from_profile`.
    dose_range : (float, float)
        Electrons per pixel at signal 1.
    p : float
        Probability of applying the transform.
    """

    class InitSchema(A.core.transforms_interface.BaseTransformInitSchema):
        gain: float = Field(gt=0)
        readout_sigma: float = Field(ge=0)
        offset: float
        bit_depth: int = Field(ge=1, le=32)
        dose_range: tuple[float, float]

        @model_validator(mode="after")
        def _dose(self):
            lo, hi = self.dose_range
            if not 0 < lo <= hi:
                raise ValueError(f"dose_range must satisfy 0 < low <= high, got {self.dose_range}")
            return self

    def __init__(self, gain: float = 1.0, readout_sigma: float = 0.0, offset: float = 0.0,
                 bit_depth: int = 16, dose_range: tuple[float, float] = (20.0, 500.0),
                 p: float = 0.5):
        super().__init__(p=p)
        self.gain = float(gain)
        self.readout_sigma = float(readout_sigma)
        self.offset = float(offset)
        self.bit_depth = int(bit_depth)
        self.dose_range = (float(dose_range[0]), float(dose_range[1]))

    @classmethod
    def from_model(cls, model: NoiseModel, p: float = 0.5,
                   dose_range: tuple[float, float] | None = None) -> "PoissonGaussianNoise":
        """The transform for a :class:`NoiseModel` (optionally another dose range)."""
        return cls(gain=model.gain, readout_sigma=model.readout_sigma, offset=model.offset,
                   bit_depth=model.bit_depth, dose_range=dose_range or model.dose_range, p=p)

    @property
    def model(self) -> NoiseModel:
        return NoiseModel(gain=self.gain, readout_sigma=self.readout_sigma, offset=self.offset,
                          bit_depth=self.bit_depth, dose_range=self.dose_range)

    def get_params(self) -> dict[str, Any]:
        lo, hi = self.dose_range
        dose = float(math.exp(self.random_generator.uniform(math.log(lo), math.log(hi))))
        return {"dose": dose, "noise_seed": int(self.random_generator.integers(0, 2**63 - 1))}

    def apply(self, img: np.ndarray, dose: float = 100.0, noise_seed: int = 0,
              **params: Any) -> np.ndarray:
        rng = np.random.default_rng(noise_seed)
        if img.dtype == np.uint8:
            out = poisson_gaussian(img.astype(np.float32) / 255.0, dose, self.model, rng)
            return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
        return poisson_gaussian(img, dose, self.model, rng).astype(img.dtype, copy=False)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("gain", "readout_sigma", "offset", "bit_depth", "dose_range")


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------

_REASON = {
    "mirror": ("mirror=False: the structure is chiral (its mirror image is a different specimen, "
               "e.g. handed twins or spirals), so {name} makes an image whose label is wrong"),
    "polarity": ("polarity=True: top and bottom differ (e.g. the surface of a cross-section, a "
                 "growth or beam direction); {name} turns the image so the top is no longer at the "
                 "top, which the instrument never records"),
    "rotation-none": ("rotation='none': the orientation of the image is physical (a scan, tilt or "
                      "growth axis), so {name} makes orientations the instrument never records"),
    "rotation-90": ("rotation='90': only quarter turns are declared symmetries (e.g. a lattice "
                    "aligned with the scan axes); {name} rotates by arbitrary angles"),
    "metric": ("metric=True: sizes and shapes are the answer (e.g. grain size from the pixel "
               "size); {name} changes sizes or shapes, so the labels would teach wrong sizes"),
    "intensity": ("intensity_calibrated=True: the label is read from calibrated intensity (e.g. "
                  "thickness or atomic number from HAADF counts); {name} changes intensities while "
                  "the label stays, teaching a wrong intensity-label relation"),
    "colour": ("orientation_colour=True: colour encodes crystal orientation (an EBSD IPF map); "
               "{name} changes colours, i.e. the orientations, while the label keeps the old ones"),
    "misalign": ("{name} moves image pixels without moving the labels: boundaries in the image "
                 "would no longer sit on the boundaries of the label"),
    "seams": ("metric=True: {name} cuts the image into tiles and shuffles them, creating seams "
              "(false boundaries) that the label does not mark and cutting grains into pieces"),
}

# Class name -> the physics checks that apply. Names (not classes) keep the table working across
# albumentations versions that add or drop transforms.
_FLIPS_H = {"HorizontalFlip", "TimeReverse"}
_FLIPS_V = {"VerticalFlip"}
_DIHEDRAL = {"D4", "SquareSymmetry", "CubicSymmetry", "Transpose"}
_ROT90 = {"RandomRotate90"}
_ROTATE = {"Rotate", "SafeRotate"}
_AFFINE = {"Affine", "ShiftScaleRotate"}
_WARPS = {"ElasticTransform", "GridDistortion", "OpticalDistortion", "PiecewiseAffine", "Perspective",
          "ThinPlateSpline", "GridElasticDeform", "RandomScale", "RandomResizedCrop",
          "RandomSizedCrop", "RandomSizedBBoxSafeCrop", "Resize", "LongestMaxSize",
          "SmallestMaxSize", "Morphological", "CropAndPad"}
# Transforms that resize with cv2.resize: OpenCV's INTER_NEAREST there takes floor(x / scale),
# not the pixel-centre rule of the bilinear image resize, so labels land up to one source pixel
# off; INTER_NEAREST_EXACT uses pixel centres. (Remap/warpAffine-based warps are centred already
# and do not accept INTER_NEAREST_EXACT.)
_RESIZING = {"Resize", "RandomResizedCrop", "RandomSizedCrop", "RandomSizedBBoxSafeCrop", "RandomScale",
             "LongestMaxSize", "SmallestMaxSize", "CropAndPad"}
_SAFE_GEOMETRY = {"RandomCrop", "CenterCrop", "Crop", "PadIfNeeded", "Pad", "CropNonEmptyMaskIfExists",
                  "RandomCropFromBorders", "RandomCropNearBBox", "BBoxSafeRandomCrop",
                  "AtLeastOneBBoxRandomCrop", "NoOp"}
_INTENSITY = {"RandomBrightnessContrast", "RandomGamma", "CLAHE", "Equalize", "RandomToneCurve",
              "Posterize", "Solarize", "InvertImg", "ColorJitter", "HueSaturationValue",
              "Illumination", "RandomShadow", "RandomSunFlare", "RandomFog", "RandomRain", "RandomSnow",
              "PlasmaBrightnessContrast", "PlasmaShadow", "AutoContrast", "MultiplicativeNoise",
              "Sharpen", "Emboss", "UnsharpMask", "Superpixels", "FancyPCA", "ToSepia", "RGBShift",
              "ChannelShuffle", "PlanckianJitter", "HEStain", "CoarseDropout", "GridDropout",
              "XYMasking", "Erasing", "ConstrainedCoarseDropout", "PixelDropout", "ChannelDropout",
              "SaltAndPepper", "Spatter", "TextImage", "RandomGravel", "ToGray", "FDA",
              "HistogramMatching", "PixelDistributionAdaptation", "OverlayElements", "MaskDropout",
              "TimeMasking", "FrequencyMasking"}
_COLOUR = {"HueSaturationValue", "ColorJitter", "ChannelShuffle", "RGBShift", "ToGray", "ToSepia",
           "FancyPCA", "PlanckianJitter", "ChannelDropout", "ChromaticAberration", "ISONoise",
           "HEStain", "InvertImg", "Solarize", "Equalize", "RandomGamma", "RandomToneCurve", "CLAHE",
           "Posterize", "FDA", "HistogramMatching", "PixelDistributionAdaptation"}
_MISALIGN = {"GlassBlur"}
_SEAMS = {"RandomGridShuffle", "Mosaic"}
# Image-only transforms that keep intensities on average and move no pixels: always allowed.
_SAFE_PIXEL = {"GaussNoise", "PoissonGaussianNoise", "ShotNoise", "GaussianBlur", "Blur", "MedianBlur",
               "MotionBlur", "Defocus", "ZoomBlur", "AdvancedBlur", "Downscale", "ImageCompression",
               "RingingOvershoot", "Normalize", "ToFloat", "FromFloat", "ToTensorV2",
               "AdditiveNoise", "ISONoise", "ChromaticAberration", "ToRGB"}
_KNOWN = (_FLIPS_H | _FLIPS_V | _DIHEDRAL | _ROT90 | _ROTATE | _AFFINE | _WARPS | _SAFE_GEOMETRY
          | _INTENSITY | _COLOUR | _MISALIGN | _SEAMS | _SAFE_PIXEL)


def iter_transforms(transform: Any) -> Iterator[Any]:
    """Every leaf transform of a pipeline (descending into Compose/OneOf/SomeOf/...)."""
    if transform is None:
        return
    if isinstance(transform, (list, tuple)):
        for t in transform:
            yield from iter_transforms(t)
        return
    children = getattr(transform, "transforms", None)
    if isinstance(transform, A.BaseCompose) or (children is not None and not isinstance(transform, A.BasicTransform)):
        for t in children or ():
            yield from iter_transforms(t)
        return
    yield transform


def _nonzero_range(v: Any) -> bool:
    """True unless ``v`` is 0 or a (0, 0) range (also per-axis dicts)."""
    if v is None:
        return False
    if isinstance(v, Mapping):
        return any(_nonzero_range(x) for x in v.values())
    if isinstance(v, (int, float)):
        return v != 0
    try:
        return any(float(x) != 0 for x in v)
    except TypeError:
        return True


def _not_unit_range(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, Mapping):
        return any(_not_unit_range(x) for x in v.values())
    if isinstance(v, (int, float)):
        return v != 1
    try:
        return any(float(x) != 1 for x in v)
    except TypeError:
        return True


def align_masks(transform: Any) -> Any:
    """Make resizing transforms resize labels by pixel centres, like the image (in place).

    Albumentations resizes masks with OpenCV's ``INTER_NEAREST``, which maps output pixel ``i``
    to source pixel ``floor(i · src/dst)``; the bilinear image resize maps pixel centres, so
    labels land up to one source pixel off. This switches every resizing transform (``Resize``,
    ``RandomResizedCrop``, ``RandomScale``, ...) still on ``INTER_NEAREST`` to
    ``INTER_NEAREST_EXACT``. :func:`build_pipeline` applies it to ``extra``.

    Returns
    -------
    The same transform or pipeline.
    """
    for t in iter_transforms(transform):
        if type(t).__name__ in _RESIZING and getattr(t, "mask_interpolation", None) == cv2.INTER_NEAREST:
            t.mask_interpolation = cv2.INTER_NEAREST_EXACT
    return transform


def _violations(physics: Physics, t: Any) -> list[str]:
    """Reason keys of :data:`_REASON` that forbid leaf transform ``t`` under ``physics``."""
    name = type(t).__name__
    out: list[str] = []
    rotates = False
    any_angle = False
    scales = False
    if name in _FLIPS_H:
        if not physics.mirror:
            out.append("mirror")
    elif name in _FLIPS_V:
        if not physics.mirror:
            out.append("mirror")
        if physics.polarity:
            out.append("polarity")
    elif name in _DIHEDRAL:
        if not physics.mirror:
            out.append("mirror")
        rotates = True
    elif name in _ROT90:
        rotates = True
    elif name in _ROTATE:
        rotates = any_angle = _nonzero_range(getattr(t, "limit", (1, 1)))
        scales = name == "SafeRotate" and rotates  # it shrinks the rotated image to fit the frame
    elif name in _AFFINE:
        rotates = any_angle = _nonzero_range(getattr(t, "rotate", 1))
        scales = _not_unit_range(getattr(t, "scale", 2)) or _nonzero_range(getattr(t, "shear", 1))
    elif name in _WARPS:
        scales = True
        if name == "CropAndPad" and not getattr(t, "keep_size", True):
            scales = False
    if rotates:
        if physics.rotation == "none":
            out.append("rotation-none")
        elif physics.rotation == "90" and any_angle:
            out.append("rotation-90")
        if physics.polarity:
            out.append("polarity")
    if scales and physics.metric:
        out.append("metric")
    if name in _INTENSITY and physics.intensity_calibrated:
        out.append("intensity")
    if name == "GaussNoise" and physics.intensity_calibrated and _nonzero_range(getattr(t, "mean_range", 0)):
        out.append("intensity")
    if name in _COLOUR and physics.orientation_colour:
        out.append("colour")
    if name in _MISALIGN:
        out.append("misalign")
    if name in _SEAMS and physics.metric:
        out.append("seams")
    return out


def check_transform(physics: Physics, transform: Any, *, allow_unknown: bool = False) -> None:
    """Refuse a transform or pipeline that the declared physics forbids.

    Parameters
    ----------
    physics : Physics
    transform : albumentations transform, Compose (any nesting) or a list of them
    allow_unknown : bool
        Accept transforms this module does not know (your own, ``Lambda``). By default an
        unknown geometric (dual) transform is refused, and so is an unknown image-only
        transform when the physics constrains intensity or colour.

    Raises
    ------
    ForbiddenTransform
        For the first forbidden transform, with every physical reason that forbids it.
    """
    for t in iter_transforms(transform):
        name = type(t).__name__
        reasons = _violations(physics, t)
        if reasons:
            text = "; ".join(_REASON[r].format(name=name) for r in dict.fromkeys(reasons))
            raise ForbiddenTransform(f"{name} is forbidden by the declared physics: {text}")
        if name in _KNOWN or allow_unknown:
            continue
        if isinstance(t, A.DualTransform):
            raise ForbiddenTransform(
                f"{name} is not a transform sdk.augment knows: it cannot tell whether it keeps "
                "labels valid under the declared physics; pass allow_unknown=True to accept it "
                "on your own judgement")
        if physics.intensity_calibrated or physics.orientation_colour:
            what = "intensities" if physics.intensity_calibrated else "colours"
            raise ForbiddenTransform(
                f"{name} is not a transform sdk.augment knows, and the physics declares calibrated "
                f"{what}: it cannot tell whether {name} changes them; pass allow_unknown=True to "
                "accept it on your own judgement")


# --------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------

_STRENGTH = {
    #         p_rot  scale     p_scale  b/c   p_int  gamma      p_blur p_noise dose_div
    "light":  (0.3, (0.95, 1.05), 0.2, 0.10, 0.3, (90, 110), 0.1, 0.3, 1.0),
    "medium": (0.5, (0.85, 1.18), 0.3, 0.20, 0.5, (80, 125), 0.2, 0.5, 2.0),
    "strong": (0.7, (0.75, 1.33), 0.5, 0.30, 0.7, (70, 143), 0.3, 0.7, 4.0),
}


def _border(physics: Physics) -> dict[str, Any]:
    # Reflection at the border mirrors content: only where mirror images are physical.
    if physics.mirror:
        return {"border_mode": cv2.BORDER_REFLECT_101}
    return {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}


def _geometric(physics: Physics, strength: str) -> list[Any]:
    p_rot, scale, p_scale = _STRENGTH[strength][:3]
    out: list[Any] = []
    if physics.rotation in ("90", "any"):
        if physics.mirror:
            sym = getattr(A, "SquareSymmetry", None) or A.D4
            out.append(sym(p=1.0))  # uniform over the 8 elements of the dihedral group D4
        else:
            out.append(A.RandomRotate90(p=1.0))  # proper rotations only
    elif physics.mirror:
        if physics.polarity:
            out.append(A.HorizontalFlip(p=0.5))
        else:  # one reflection at a time: two would be a 180° rotation
            out.append(A.OneOf([A.HorizontalFlip(p=1.0), A.VerticalFlip(p=1.0)], p=2 / 3))
    if physics.rotation == "any":
        out.append(A.Rotate(limit=(-180, 180), interpolation=cv2.INTER_LINEAR, p=p_rot,
                            **_border(physics)))
    if not physics.metric and strength != "light":
        out.append(A.Affine(scale=scale, keep_ratio=True, rotate=0, shear=0,
                            interpolation=cv2.INTER_LINEAR, p=p_scale, **_border(physics)))
    return out


def build_pipeline(physics: Physics | None = None, *, strength: str = "medium",
                   noise_model: Any = None, extra: Sequence[Any] | Any = None,
                   colour: bool = False, allow_unknown: bool = False,
                   seed: int | None = None) -> A.Compose:
    """An albumentations pipeline holding only transforms the physics allows.

    Order: symmetries (flips/quarter turns per ``mirror``/``rotation``), arbitrary rotation
    (``rotation="any"``), scale (unless ``metric``), ``extra``, brightness/contrast/gamma (unless
    ``intensity_calibrated``), colour jitter (``colour=True``), instrument blur, instrument
    Poisson–Gaussian noise.

    Parameters
    ----------
    physics : Physics, optional
        Declared physics (default ``Physics()``: mirror, quarter turns, nothing calibrated).
    strength : {"none", "light", "medium", "strong"}
        Probabilities and ranges; ``"none"`` gives an empty pipeline (plus ``extra``).
    noise_model : NoiseModel, mapping, str or path, optional
        The instrument twin used for noise and blur (see :meth:`NoiseModel.from_profile`; a path
        ending in ``.h5`` is read with :meth:`NoiseModel.from_dataset`). None: defaults (gain 1,
        no readout noise, dose 20–500 e⁻/px, σ 0.5–1.2 px). The lower end of the dose range is
        divided by 1 (light), 2 (medium) or 4 (strong).
    extra : transform or sequence of transforms, optional
        Further transforms, checked against the physics and inserted after the geometric part.
    colour : bool
        Add hue/saturation jitter for RGB inputs (refused under ``orientation_colour``).
    allow_unknown : bool
        Passed to :func:`check_transform` for ``extra``.
    seed : int, optional
        Seed of the Compose (``sdk.data`` datasets reseed it per DataLoader worker anyway).

    Returns
    -------
    albumentations.Compose
        Call it once with the image and all labels: ``out = pipe(image=img, mask=label)`` or
        ``pipe(image=img, masks=[a, b])``.

    Raises
    ------
    ForbiddenTransform
        If ``extra`` or ``colour`` conflicts with the physics (the message gives the reason).
    ValueError
        Unknown ``strength`` or a bad noise model.
    """
    physics = Physics() if physics is None else physics
    if not isinstance(physics, Physics):
        raise TypeError(f"physics must be a sdk.augment.Physics, got {type(physics).__name__}")
    if strength not in STRENGTHS:
        raise ValueError(f"strength {strength!r} is not allowed (allowed: {', '.join(STRENGTHS)})")
    extras = [] if extra is None else (list(extra) if isinstance(extra, (list, tuple)) else [extra])
    check_transform(physics, extras, allow_unknown=allow_unknown)
    align_masks(extras)
    if colour and physics.orientation_colour:
        raise ForbiddenTransform("colour=True (hue/saturation jitter) is forbidden by the declared "
                                 "physics: " + _REASON["colour"].format(name="colour jitter"))
    if isinstance(noise_model, (str, os.PathLike)) and str(noise_model).endswith((".h5", ".hdf5")):
        model = NoiseModel.from_dataset(noise_model)
    else:
        model = NoiseModel.from_profile(noise_model)

    steps: list[Any] = []
    if strength != "none":
        (_, _, _, bc, p_int, gamma, p_blur, p_noise, dose_div) = _STRENGTH[strength]
        steps += _geometric(physics, strength)
        steps += extras
        if not physics.intensity_calibrated:
            steps.append(A.RandomBrightnessContrast(brightness_limit=bc, contrast_limit=bc, p=p_int))
            if not physics.orientation_colour and strength != "light":
                steps.append(A.RandomGamma(gamma_limit=gamma, p=p_int / 2))
        if colour:
            steps.append(A.HueSaturationValue(hue_shift_limit=int(60 * bc), sat_shift_limit=int(100 * bc),
                                              val_shift_limit=0, p=p_int))
        lo, hi = model.psf_sigma_px
        if hi > 0:
            steps.append(A.GaussianBlur(sigma_limit=(max(lo, 0.1), max(hi, 0.1)), blur_limit=0, p=p_blur))
        d_lo, d_hi = model.dose_range
        steps.append(PoissonGaussianNoise.from_model(model, p=p_noise, dose_range=(d_lo / dose_div, d_hi)))
    else:
        steps += extras
    pipe = A.Compose(steps, seed=seed)
    check_transform(physics, pipe, allow_unknown=True)  # our own steps obey the gate by construction
    return pipe
