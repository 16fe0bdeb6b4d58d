"""Instrument calibration: estimate a detector/scan profile from a user's own micrographs.

``calibrate(images, dark=...)`` returns a :class:`Calibration`; :meth:`Calibration.profile` turns it
into an instrument profile (``twin/instrument.py`` schema) that drives generation, and
:func:`diagnostic_figure` draws the evidence.  ``twin calibrate`` (``twin/calibrate_cmd.py``) is
the command line.  The model is that of :mod:`generators.detector` and :mod:`generators.scan`.

**Offset and read noise from dark frames** (``dark=``): offset = mean; per frame, the white read
noise is the variance left after removing row and column means, the row/column offset variances
are those of the means minus the white share; with several frames, the pattern is *fixed* when
the means of different frames correlate.  For integer data the rounding variance 1/12 is removed
(Sheppard), as the generator adds its rounding after the readout noise.

**Gain (photon transfer) from structured images.**  ``var = g·(mean − o) + σ_r²`` holds pixel by
pixel, and a block's average variance against its average mean stays on that line even when the
block mixes several signal levels, so no flat field is needed.  The noise of every pixel is
isolated by the separable second difference ``K = [1 −2 1]ᵀ[1 −2 1]`` (Immerkær 1996), which
removes any signal linear along x or along y (and row/column offsets); ``E[(K∗I)²] = 36·var`` for
white noise.  Edges and grooves leave large residuals: after normalising every residual by its
predicted standard deviation (two passes), values beyond 3.5 σ are dropped and the truncation is
corrected for, so blocks whose variance changes from pixel to pixel are not biased.  A weighted
line through the binned blocks gives slope and intercept; with dark frames the line is pinned at
``(o, σ_r²)`` and only the gain is fitted.  Several frames of one field (detected, or
``repeated=True``) give the noise from frame differences instead, free of any structure.

**Offset without dark frames** is not identifiable from the variance (the intercept is
``σ_r² − g·o``): give ``dark=`` or ``offset=``; otherwise the offset is set to the line's
zero-variance intercept with ``σ_r = 0`` (stated in the result as "assumed").

**Detector lag** (exponential along the fast scan) correlates the shot noise along x, not along y.
Whether there is lag: the lag-1 autocorrelation of the normalised K residual on flat pixels
along x minus the same along y (structure shows up on both axes; the x second difference also
removes the smooth residue that line jitter leaves on lattices), significant at 5 σ over strips of
lines.  How much: the vertical second difference combines independent lines only, so its
correlation along x is the noise's own, ``ρ_k = f·aᵏ``: ``a = ρ₁/f`` with the shot share ``f``
from dark frames, else ``a = ρ₂/ρ₁``; if that disagrees with the K statistic (structure), the K
statistic is inverted instead.  Lag reduces the K residual's shot variance by
``(1−a)(3−a)/3`` and the pixel shot variance by ``(1−a)/(1+a)``; both are corrected for in the
gain (steeply: an error δa in the pole moves the gain by about −3.7 δa).

**Line jitter** (row-to-row registration): each line is registered along x against the mean of
its two neighbours (Gauss–Newton on exact Fourier shifts, so noise does not lock shifts to the
pixel grid); the shift ``δ_r = j_r − (j_{r−1} + j_{r+1})/2`` has variance ``1.5 σ_j²`` for white
jitter.  It is estimated twice, from two interleaved disjoint sets of columns whose noise is
independent, so the covariance of the two estimates measures the jitter without noise bias
(weighted, outlier-clipped over lines).  Smooth drift cancels in ``δ``.

**PSF**: from edges — windows across strong, thinned edges fitted with the closed-form profile of a
step (optionally with a groove, as at grain boundaries) blurred by a Gaussian of σ; the median over
good fits (reduced χ² < 1.5, contrast > 2.5 noise σ), less the line-jitter broadening
``σ_j² cos²θ``.  Without edges, on a lattice of bright blobs (atomic columns): anisotropic
Gaussians fitted to the blobs, σ across the lines (free of jitter) reported (an upper bound of the
probe).  Otherwise the radially averaged power spectrum above the white-noise floor is fitted with
``A k^−β exp(−4π²σ²k²)`` (method "spectrum", an effective blur).

**Vignetting**: a robust least-squares fit of the centred low-order field of
:func:`generators.optics.vignetting_basis` to block medians (offset removed) averaged over the
images, standard errors by a spatial jackknife; coefficients within 3 standard errors of zero are
dropped, and from a single field of view none is used (specimen gradients look the same).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, special

from generators.optics import VIGNETTING_TERMS, vignetting_basis
from twin.errors import EmtwinError
from twin.io import ImageData, as_frames, read_image

__all__ = [
    "CalibrationError", "Calibration", "DarkEstimate", "NoiseEstimate", "LagEstimate",
    "JitterEstimate", "PSFEstimate", "VignettingEstimate", "calibrate", "estimate_dark",
    "estimate_noise", "estimate_lag", "estimate_jitter", "estimate_psf", "estimate_vignetting",
    "profile_yaml", "write_profile", "diagnostic_figure",
]


class CalibrationError(EmtwinError):
    """Calibration impossible with the data given (says what is missing and how to supply it)."""


# --------------------------------------------------------------------------------------------
# constants
# --------------------------------------------------------------------------------------------

_KT = 3.5  # truncation of normalised residuals, in standard deviations
_ERF_KT = special.erf(_KT / math.sqrt(2.0))
_TRUNC = (_ERF_KT - 2.0 * _KT * math.exp(-0.5 * _KT * _KT) / math.sqrt(2.0 * math.pi)) / _ERF_KT
_MAD = 1.482602218505602
_SHEPPARD = 1.0 / 12.0
_MIN_BLOCKS = 24


def _lag_factors(a: float) -> tuple[float, float]:
    """(pixel-variance factor (1−a)/(1+a), K-residual factor (1−a)(3−a)/3) of lag pole ``a``."""
    return (1.0 - a) / (1.0 + a), (1.0 - a) * (3.0 - a) / 3.0


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------

@dataclass
class DarkEstimate:
    """Offset and read noise from dark frames (counts)."""

    offset: float
    readout_sigma: float
    row_sigma: float
    col_sigma: float
    n_frames: int
    mean: float  # direct statistics of the frames, for comparison
    std: float
    quantised: bool
    pattern_fixed: bool | None = None  # None: one frame, cannot tell

    def to_dict(self) -> dict:
        return {"offset": self.offset, "readout_sigma": self.readout_sigma,
                "row_sigma": self.row_sigma, "col_sigma": self.col_sigma,
                "pattern_fixed": self.pattern_fixed,
                "n_frames": self.n_frames, "direct_mean": self.mean, "direct_std": self.std,
                "rounding_variance_removed": self.quantised}


@dataclass
class LagEstimate:
    """Detector lag from the noise autocorrelation along x (pole ``a = exp(−1/τ)``)."""

    a: float = 0.0
    stderr: float = 0.0
    applied: bool = False
    q_x: tuple[float, float] = (-2 / 3, 1 / 6)
    q_y: tuple[float, float] = (-2 / 3, 1 / 6)

    @property
    def lag_px(self) -> float:
        return 0.0 if not self.applied or self.a <= 0 else -1.0 / math.log(self.a)

    def to_dict(self) -> dict:
        return {"pole": self.a, "pole_stderr": self.stderr, "applied": self.applied,
                "lag_px": self.lag_px, "residual_autocorr_x": list(self.q_x),
                "residual_autocorr_y": list(self.q_y)}


@dataclass
class NoiseEstimate:
    """Photon-transfer result.

    ``slope``/``intercept`` are those of the pixel variance against the mean
    (``var = slope·mean + intercept``); ``gain`` is corrected for lag.
    """

    gain: float
    gain_stderr: float
    readout_sigma: float
    offset: float
    slope: float
    intercept: float
    offset_source: str
    readout_source: str
    method: str
    n_blocks: int
    lag: LagEstimate
    quantised: bool
    block_mean: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    block_var: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    bin_mean: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    bin_var: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    bin_err: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    free_fit: tuple[float, float] = (0.0, 0.0)  # slope, intercept of the unconstrained line

    def pixel_variance(self, mean: np.ndarray) -> np.ndarray:
        """Predicted pixel variance at ``mean`` counts (counts²)."""
        return np.maximum(self.slope * np.asarray(mean, dtype=np.float64) + self.intercept, 1e-6)

    def to_dict(self) -> dict:
        return {"gain": self.gain, "gain_stderr": self.gain_stderr,
                "readout_sigma": self.readout_sigma, "offset": self.offset,
                "variance_slope": self.slope, "variance_intercept": self.intercept,
                "free_fit": {"slope": self.free_fit[0], "intercept": self.free_fit[1]},
                "offset_source": self.offset_source, "readout_source": self.readout_source,
                "method": self.method, "n_blocks": self.n_blocks, "lag": self.lag.to_dict()}


@dataclass
class JitterEstimate:
    """Per-line fast-scan jitter (1σ, px) and the measured line shifts."""

    sigma_px: float
    stderr: float
    n_lines: int
    noise_sd_px: float
    trace: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return {"sigma_px": self.sigma_px, "stderr_px": self.stderr, "n_lines": self.n_lines,
                "shift_noise_sd_px": self.noise_sd_px}


@dataclass
class PSFEstimate:
    """PSF Gaussian σ (px) and how it was measured."""

    sigma_px: float
    stderr: float
    method: str
    n_used: int
    profile_t: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    profile_v: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    spectrum: tuple[np.ndarray, np.ndarray, np.ndarray] | None = field(repr=False, default=None)
    sigma_x_px: float | None = None  # atomic columns: width along the scan lines (with jitter)

    def to_dict(self) -> dict:
        d = {"sigma_px": self.sigma_px, "stderr_px": self.stderr, "method": self.method,
             "n_used": self.n_used}
        if self.sigma_x_px is not None:
            d["column_sigma_x_px"] = self.sigma_x_px
        return d


@dataclass
class VignettingEstimate:
    """Vignetting coefficients (``x, y, xx, xy, yy``), their standard errors and the maps."""

    coefficients: np.ndarray
    stderr: np.ndarray
    significant: np.ndarray
    block_map: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))
    fit_map: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    def as_profile(self) -> dict:
        return {t: float(round(c, 5)) if s else 0.0
                for t, c, s in zip(VIGNETTING_TERMS, self.coefficients, self.significant)}

    def to_dict(self) -> dict:
        return {"fitted": {t: float(c) for t, c in zip(VIGNETTING_TERMS, self.coefficients)},
                "stderr": {t: float(c) for t, c in zip(VIGNETTING_TERMS, self.stderr)},
                "used": self.as_profile()}


@dataclass
class Calibration:
    """Everything estimated from the images, with provenance."""

    noise: NoiseEstimate
    dark: DarkEstimate | None
    jitter: JitterEstimate | None
    psf: PSFEstimate | None
    vignetting: VignettingEstimate | None
    bit_depth: int
    saturation: float | None
    kind: str
    sources: list[str]
    dark_sources: list[str]
    shape: tuple[int, int]
    pixel_size_nm: float | None = None
    dwell_time_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        """JSON-ready summary of all estimates."""
        out: dict[str, Any] = {
            "sources": self.sources, "dark_frames": self.dark_sources,
            "image_shape": list(self.shape), "kind": self.kind, "bit_depth": self.bit_depth,
            "saturation": self.saturation, "noise": self.noise.to_dict(),
        }
        if self.dark is not None:
            out["dark"] = self.dark.to_dict()
        if self.jitter is not None:
            out["line_jitter"] = self.jitter.to_dict()
        if self.psf is not None:
            out["psf"] = self.psf.to_dict()
        if self.vignetting is not None:
            out["vignetting"] = self.vignetting.to_dict()
        if self.pixel_size_nm is not None:
            out["pixel_size_nm"] = self.pixel_size_nm
        if self.dwell_time_s is not None:
            out["dwell_time_s"] = self.dwell_time_s
        out["warnings"] = list(self.warnings)
        out["seconds"] = self.seconds
        return out

    def profile(self, name: str = "calibrated", base=None) -> dict:
        """An instrument profile (a dict valid for :class:`twin.instrument.Instrument`).

        Estimated values replace those of ``base`` (an :class:`Instrument`, default the shipped
        generic profile of the same kind); what is not estimated (drift, mains, ...) is kept.
        """
        from twin.instrument import load_instrument

        if base is None:
            ref = {"sem": "generic-sem", "stem": "generic-stem-haadf",
                   "tem": "generic-tem-camera", "optical": "generic-optical"}[self.kind]
            base, _ = load_instrument(ref)
        prof = base.model_dump(mode="json", exclude_none=True)
        prof["name"] = name
        prof["kind"] = self.kind
        det = prof["detector"]
        n = self.noise
        det.update(gain=_r(n.gain), readout_sigma=_r(n.readout_sigma), offset=_r(n.offset),
                   bit_depth=int(self.bit_depth), lag_px=_r(n.lag.lag_px))
        if self.saturation is not None:
            det["saturation"] = float(self.saturation)
        else:
            det.pop("saturation", None)
        if self.dark is not None:
            det["fixed_pattern"] = {"row_sigma": _r(self.dark.row_sigma),
                                    "col_sigma": _r(self.dark.col_sigma)}
            if self.dark.pattern_fixed:  # the same (statistically equivalent) pattern every frame
                det["fixed_pattern"]["seed"] = 0
        scan = prof.setdefault("scan", {})
        if self.jitter is not None:
            scan["line_jitter_px"] = _r(self.jitter.sigma_px)
        if self.dwell_time_s is not None:
            scan["dwell_time_s"] = float(self.dwell_time_s)
        opt = prof.setdefault("optics", {})
        if self.psf is not None:
            opt["psf_sigma_px"] = _r(self.psf.sigma_px)
        if self.vignetting is not None:
            opt["vignetting"] = self.vignetting.as_profile()
        if self.kind in ("sem", "stem"):
            opt["psf_follows_scan"] = True
        if self.pixel_size_nm is not None:
            prof["pixel_size"] = {"value": float(f"{self.pixel_size_nm:.6g}"), "unit": "nm"}
        prof["calibration"] = _jsonable(self.summary())
        return prof


def _r(x: float, digits: int = 5) -> float:
    return float(f"{float(x):.{digits}g}")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return float(f"{v:.6g}") if math.isfinite(v) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# input preparation and checks
# --------------------------------------------------------------------------------------------

@dataclass
class _Frame:
    data: np.ndarray  # float64 (H, W)
    source: str
    clip_lo: float | None
    clip_hi: float | None
    integer: bool
    dtype: np.dtype


def _to_imagedata(item, what: str) -> ImageData:
    if isinstance(item, ImageData):
        return item
    if isinstance(item, (str, Path)):
        return read_image(item)
    return ImageData(frames=as_frames(item, f"{what} array"), path=f"<{what} array>")


def _check_frame(a: np.ndarray, source: str, *, dark: bool = False) -> _Frame:
    f = a.astype(np.float64)
    lo, hi = float(f.min()), float(f.max())
    if lo == hi:
        raise CalibrationError(
            f"{source}: the image is constant ({lo:g} everywhere): there is no noise to measure; "
            "give raw detector frames (not a processed or synthetic constant image)")
    integer = a.dtype.kind in "iu" or bool(np.all(f == np.round(f)))
    n = f.size
    frac_hi = float(np.count_nonzero(f == hi)) / n
    frac_lo = float(np.count_nonzero(f == lo)) / n
    clip_hi = clip_lo = None
    if not dark:
        full = a.dtype.kind in "iu" and hi == float(np.iinfo(a.dtype).max)
        if frac_hi > 0.2:
            raise CalibrationError(
                f"{source}: {100 * frac_hi:.0f} % of the pixels are saturated at {hi:g}: "
                "the noise cannot be measured in clipped pixels; acquire with a lower dose, "
                "brightness or detector gain so that fewer than a few % of pixels saturate")
        if frac_lo > 0.2 and lo <= 0:
            raise CalibrationError(
                f"{source}: {100 * frac_lo:.0f} % of the pixels are clipped at {lo:g}: raise the "
                "detector offset (black level) so that the dark signal is not cut at zero")
        if frac_hi > 1e-4 and (full or frac_hi > 1e-3):
            clip_hi = hi
        if frac_lo > 1e-3 and lo <= 0:
            clip_lo = lo
    return _Frame(f, source, clip_lo, clip_hi, integer, a.dtype)


def _bit_depth(dtype: np.dtype, vmax: float) -> int:
    if dtype.kind in "iu":
        return int(min(max(np.iinfo(dtype).bits, 1), 16))
    return 16 if vmax > 255 else 8


# --------------------------------------------------------------------------------------------
# dark frames
# --------------------------------------------------------------------------------------------

def estimate_dark(frames: Sequence[np.ndarray]) -> DarkEstimate:
    """Offset, read noise and row/column offsets from dark frames (same shape).

    Per frame, the white read noise is the variance left after removing the row and column
    means (corrected for the degrees of freedom), and the row/column offset variances are those
    of the row/column means minus the white share.  With several frames, the pattern is *fixed*
    when the column (or row) means of different frames correlate; otherwise it is drawn anew
    for every frame (as for the real Ceta frames in ../shared/data/real/native-em).
    """
    fs = [np.asarray(f, dtype=np.float64) for f in frames]
    if not fs:
        raise CalibrationError("no dark frames given")
    shape = fs[0].shape
    if any(f.shape != shape for f in fs):
        raise CalibrationError("dark frames must all have the same shape; got "
                               + ", ".join(str(f.shape) for f in fs))
    quant = all(bool(np.all(f == np.round(f))) for f in fs)
    h, w = shape
    whites, rvars, cvars, rms, cms = [], [], [], [], []
    for f in fs:
        rm = f.mean(1)
        cm = f.mean(0)
        resid = f - rm[:, None] - cm[None, :] + f.mean()
        white = float(resid.var()) * (h * w) / ((h - 1) * (w - 1))
        whites.append(white)
        rvars.append(max(float(rm.var()) - white / w, 0.0))
        cvars.append(max(float(cm.var()) - white / h, 0.0))
        rms.append(rm - rm.mean())
        cms.append(cm - cm.mean())
    white = float(np.mean(whites))
    fixed = None
    if len(fs) >= 2:
        def corr(v):
            cs = [np.corrcoef(v[i], v[i + 1])[0, 1] for i in range(len(v) - 1)]
            return float(np.nanmean(cs))
        fixed = max(corr(rms), corr(cms)) > 0.5
    stack = np.stack(fs)
    read_var = white - (_SHEPPARD if quant else 0.0)
    return DarkEstimate(offset=float(stack.mean()), readout_sigma=math.sqrt(max(read_var, 0.0)),
                        row_sigma=math.sqrt(float(np.mean(rvars))),
                        col_sigma=math.sqrt(float(np.mean(cvars))), n_frames=len(fs),
                        mean=float(stack.mean()), std=float(stack.std()), quantised=quant,
                        pattern_fixed=fixed)


# --------------------------------------------------------------------------------------------
# photon transfer
# --------------------------------------------------------------------------------------------

def _residual(img: np.ndarray) -> np.ndarray:
    """Separable second difference K∗I on the valid region (H−2, W−2)."""
    d = img[:, :-2] - 2.0 * img[:, 1:-1] + img[:, 2:]
    return d[:-2] - 2.0 * d[1:-1] + d[2:]


def _blocks(a: np.ndarray, b: int) -> np.ndarray:
    h, w = a.shape
    nh, nw = h // b, w // b
    return (a[:nh * b, :nw * b].reshape(nh, b, nw, b).transpose(0, 2, 1, 3)
            .reshape(nh * nw, b * b))


def _valid_mask(fr: _Frame) -> np.ndarray | None:
    """Pixels usable for noise (False where clipped, grown by the residual's 3x3 support)."""
    bad = np.zeros(fr.data.shape, bool)
    if fr.clip_hi is not None:
        bad |= fr.data >= fr.clip_hi
    if fr.clip_lo is not None:
        bad |= fr.data <= fr.clip_lo
    if not bad.any():
        return None
    return ~ndimage.binary_dilation(bad, np.ones((3, 3), bool))


@dataclass
class _BlockData:
    mean: np.ndarray
    var: np.ndarray  # residual-domain variance (E[R²]/36)


def _pass1(fr: _Frame, b: int) -> _BlockData:
    r = _blocks(_residual(fr.data), b)
    m = _blocks(fr.data[1:-1, 1:-1], b)
    valid = _valid_mask(fr)
    a = np.abs(r)
    s0 = _MAD * np.median(a, axis=1)
    keep = a < _KT * s0[:, None]
    ok = keep.mean(1) > 0.9
    if valid is not None:
        vb = _blocks(valid[1:-1, 1:-1], b)
        ok &= vb.all(1)
    v = (r * r * keep).sum(1) / np.maximum(keep.sum(1), 1) / _TRUNC / 36.0
    ok &= s0 > 0
    return _BlockData(m.mean(1)[ok], v[ok])


def _pass2(fr: _Frame, b: int, s: float, c: float,
           flat: bool = True) -> tuple[_BlockData, np.ndarray, np.ndarray]:
    """Blocks with residuals normalised by the predicted σ.

    Returns also the normalised residual ``z`` and the mask of *flat* kept pixels (no gradient of
    the local mean above the noise within 2 px), used for the lag statistic: near edges, line
    jitter leaves residuals elongated along x that would mimic lag.
    """
    r = _residual(fr.data)
    loc = ndimage.uniform_filter(fr.data, 3, mode="reflect")
    p = np.maximum(s * loc[1:-1, 1:-1] + c, 1e-6 * max(abs(c), 1.0) + 1e-12)
    z = r / np.sqrt(36.0 * p)
    keep = np.abs(z) < _KT
    valid = _valid_mask(fr)
    if valid is not None:
        keep &= valid[1:-1, 1:-1]
    zb, pb, kb = _blocks(z, b), _blocks(p, b), _blocks(keep, b)
    mb = _blocks(fr.data[1:-1, 1:-1], b)
    frac = kb.mean(1)
    ok = frac > 0.9
    if valid is not None:
        ok &= _blocks(valid[1:-1, 1:-1], b).all(1)
    kappa = (zb * zb * kb).sum(1) / np.maximum(kb.sum(1), 1) / _TRUNC
    if not flat:
        return _BlockData(mb.mean(1)[ok], (kappa * pb.mean(1))[ok]), z, keep
    # flat pixels: the 3x3 mean's gradient (noise var ≈ p/9 · 1/2 per component) below 4 σ
    gx = loc[1:-1, 2:] - loc[1:-1, :-2]
    gy = loc[2:, 1:-1] - loc[:-2, 1:-1]
    steep = (gx * gx + gy * gy) > 16.0 * (2.0 * p / 9.0 / 3.0) * 2.0
    steep = ndimage.maximum_filter(steep.view(np.uint8), size=5).view(bool)
    d = fr.data
    rv = (d[:-2, 1:-1] - 2.0 * d[1:-1, 1:-1] + d[2:, 1:-1]) / np.sqrt(6.0 * p)
    flat = ~steep
    if valid is not None:
        flat &= valid[1:-1, 1:-1]
    scale = _MAD * float(np.median(np.abs(rv[flat]))) if flat.any() else 1.0
    return (_BlockData(mb.mean(1)[ok], (kappa * pb.mean(1))[ok]), (z, p, rv),
            (keep & flat, (np.abs(rv) < 4.0 * scale) & flat))


def _fit_line(m: np.ndarray, v: np.ndarray, nbins: int = 24, anchor=None):
    """Weighted line through binned (mean, var); ``anchor=(x0, y0)`` pins it (slope only).

    Returns slope, intercept, slope stderr, bins (mean, var, err) and the bins kept.
    """
    nb = int(min(nbins, max(len(m) // 8, 3)))
    order = np.argsort(m)
    groups = [g for g in np.array_split(order, nb) if len(g) >= 3]
    bm = np.array([m[g].mean() for g in groups])
    bv = np.array([v[g].mean() for g in groups])
    be = np.array([v[g].std(ddof=1) / math.sqrt(len(g)) for g in groups])
    be = np.maximum(be, 1e-9 * np.maximum(np.abs(bv), 1e-12))
    keep = np.ones(len(bm), bool)
    slope = icpt = se = float("nan")
    for _ in range(4):
        w = 1.0 / be[keep] ** 2
        if anchor is None:
            A = np.vstack([bm[keep], np.ones(keep.sum())]).T
            cov = np.linalg.pinv(A.T @ (A * w[:, None]))
            slope, icpt = cov @ (A.T @ (w * bv[keep]))
            se = math.sqrt(max(cov[0, 0], 0.0))
            pred = slope * bm + icpt
        else:
            x0, y0 = anchor
            dx = bm[keep] - x0
            den = float(np.sum(w * dx * dx))
            slope = float(np.sum(w * dx * (bv[keep] - y0)) / den) if den > 0 else float("nan")
            se = 1.0 / math.sqrt(den) if den > 0 else float("inf")
            icpt = y0 - slope * x0
            pred = slope * bm + icpt
        z = (bv - pred) / be
        chi = np.sqrt(np.mean(z[keep] ** 2)) if keep.sum() else 1.0
        new = np.abs(z) < 4.0 * max(chi, 1.0)
        if np.array_equal(new, keep) or new.sum() < 3:
            break
        keep = new
    # inflate the slope error by the scatter beyond the bin errors
    dof = max(int(keep.sum()) - (1 if anchor is not None else 2), 1)
    rchi = float(np.sum(((bv - pred) / be)[keep] ** 2) / dof)
    se *= math.sqrt(max(rchi, 1.0))
    return float(slope), float(icpt), float(se), (bm, bv, be), keep


def _k_autocorr(a: np.ndarray | float, f: float) -> tuple[np.ndarray, np.ndarray]:
    """Lag-1 and lag-2 x-autocorrelation of the K residual for noise with a shot share ``f``
    whose x-correlation is ``aᵏ`` (lagged shot noise) and a white rest."""
    a = np.asarray(a, dtype=np.float64)
    c0 = 6 - 8 * a + 2 * a * a
    c1 = -4 + 7 * a - 4 * a * a + a ** 3
    c2 = (1 - a) ** 4
    den = f * c0 + 6 * (1 - f)
    return (f * c1 - 4 * (1 - f)) / den, (f * c2 + (1 - f)) / den


def _strip_autocorr(arrs, masks, pairs):
    """Per strip of lines: [n, autocorr for each (axis, lag) in pairs]."""
    strips = []
    for z, m in zip(arrs, masks):
        zz = np.where(m, z, 0.0)
        h = zz.shape[0]
        step = max(h // 16, 8)
        for r0 in range(0, h - 2, step):
            s_, k_ = zz[r0:r0 + step], m[r0:r0 + step]
            n0 = float(k_.sum())
            if n0 < 100 or s_.shape[0] < 3:
                continue
            v0 = float(np.sum(s_ * s_)) / n0
            out = [n0]
            for ax, lag in pairs:
                if ax == 1:
                    num = float(np.sum(s_[:, :-lag] * s_[:, lag:]))
                    nk = float(np.sum(k_[:, :-lag] & k_[:, lag:]))
                else:
                    num = float(np.sum(s_[:-lag] * s_[lag:]))
                    nk = float(np.sum(k_[:-lag] & k_[lag:]))
                out.append(num / max(nk, 1.0) / v0)
            strips.append(out)
    return np.array(strips)


def estimate_lag(z_list: Sequence[np.ndarray], mask_list: Sequence[np.ndarray],
                 shot_fraction: float | None = None, rv_list=None, rv_masks=None,
                 read_var: float | None = None, p_list=None) -> LagEstimate:
    """Lag pole from the x-autocorrelation of the normalised K residual on flat pixels.

    For white noise the K residual has the lag-1/lag-2 autocorrelations −2/3 and 1/6 along both
    axes.  Lag correlates the shot noise along x only; structure (and noise along y, which is
    white) shows up along y as well, so the y values correct the x values.  The structure-corrected
    lag-1 value is solved for ``a`` with the shot share ``f`` of the pixel variance (from dark
    frames; 1 without them, consistent with the zero read noise then assumed).  The second
    differences along x also remove smooth residual structure that line jitter leaves on
    lattice images.  Standard errors from the spread over strips of lines.
    """
    st = _strip_autocorr(z_list, mask_list, [(1, 1), (1, 2), (0, 1), (0, 2)])
    if len(st) < 4:
        return LagEstimate()
    wts = st[:, 0]
    q = (st[:, 1:] * wts[:, None]).sum(0) / wts.sum()
    dq = st[:, 1] - st[:, 3]  # x − y, per strip
    dmean = float((dq * wts).sum() / wts.sum())
    dse = max(math.sqrt(float(((dq - dmean) ** 2 * wts).sum() / wts.sum() / (len(st) - 1))), 1e-4)
    qx, qy = (float(q[0]), float(q[1])), (float(q[2]), float(q[3]))
    if not dmean > 5.0 * dse:
        return LagEstimate(a=0.0, stderr=float(dse / 0.26), applied=False, q_x=qx, q_y=qy)
    # how much: the vertical second difference (independent lines) has the noise's own
    # x-correlation f·aᵏ, well conditioned for any pole
    a = se = float("nan")
    if rv_list is not None:
        sv = _strip_autocorr(rv_list, rv_masks, [(1, 1), (1, 2)])
        if len(sv) >= 4:
            wv = sv[:, 0]
            r = (sv[:, 1:] * wv[:, None]).sum(0) / wv.sum()
            rse = np.sqrt(((sv[:, 1:] - r) ** 2 * wv[:, None]).sum(0) / wv.sum() / (len(sv) - 1))
            if read_var is not None and p_list is not None:
                a = float(np.clip(r[1] / max(r[0], 1e-6), 0.0, 0.95))
                for _ in range(5):  # f = shot share of the pixel variance (K-domain p → pixel)
                    kap = _lag_factors(a)[1]
                    fs = []
                    for pk, mk in zip(p_list, rv_masks):
                        pp = pk[mk]
                        sp = np.maximum(pp - read_var, 0.0) / kap
                        fs.append(float(np.mean(sp / np.maximum(sp + read_var, 1e-12))))
                    f = float(np.clip(np.mean(fs), 0.05, 1.0))
                    a = float(np.clip(r[0] / f, 0.0, 0.95))
                se = float(rse[0] / f)
            else:
                a = float(np.clip(r[1] / max(r[0], 1e-6), 0.0, 0.95))
                se = float(math.hypot(rse[1], a * rse[0]) / max(r[0], 1e-6))
    fk = 1.0 if shot_fraction is None else float(np.clip(shot_fraction, 0.05, 1.0))
    grid = np.linspace(0.0, 0.95, 1901)
    q1g, _ = _k_autocorr(grid, fk)
    target = -2.0 / 3.0 + dmean
    ik = int(np.argmax(q1g >= target)) if np.any(q1g >= target) else len(grid) - 1
    a_k = float(grid[ik])
    se_k = float(dse / max(float(np.gradient(q1g, grid)[ik]), 1e-6))
    if math.isfinite(a):
        # the two must agree: structure along x inflates the vertical residual's correlation
        pred = float(_k_autocorr(a, fk)[0])
        if abs(pred - target) > 5.0 * dse + 0.01:
            a, se = a_k, se_k
    else:
        a, se = a_k, se_k
    return LagEstimate(a=a, stderr=se, applied=a >= 0.02, q_x=qx, q_y=qy)


def _same_field(frames: Sequence[_Frame]) -> bool:
    """Are these frames repeated exposures of one field (structure identical up to noise)?"""
    if len(frames) < 2 or any(f.data.shape != frames[0].data.shape for f in frames):
        return False
    a, b = frames[0].data, frames[1].data
    ra, rb = _residual(a), _residual(b)
    noise = 0.5 * (np.median(np.abs(ra)) + np.median(np.abs(rb))) * _MAD / 6.0
    diff = (a - b) / math.sqrt(2.0)
    d_sd = _MAD * float(np.median(np.abs(diff - np.median(diff))))
    struct = float(np.std(ndimage.uniform_filter(a, 8)))
    return d_sd < 1.5 * noise and struct > 0.5 * noise


def estimate_noise(images: Sequence, *, dark: DarkEstimate | None = None,
                   offset: float | None = None, repeated: bool | None = None,
                   block: int | None = None) -> NoiseEstimate:
    """Photon-transfer estimate (gain, read noise, offset) from images (arrays or frames).

    Parameters
    ----------
    images : sequence of 2-D arrays
        Structured micrographs of one detector setting (or repeated frames of one field).
    dark : DarkEstimate, optional
        Pins the photon-transfer line at ``(offset, σ_r²)``.
    offset : float, optional
        Known offset (counts) when no dark frames are given; the read noise then comes from the
        line's intercept.
    repeated : bool, optional
        The images are frames of the same field (default: detected).
    """
    frames = [f if isinstance(f, _Frame) else _check_frame(np.asarray(f, float), "<array>")
              for f in images]
    return _estimate_noise(frames, dark, offset, repeated, block)[0]


def _estimate_noise(frames: list[_Frame], dark: DarkEstimate | None, offset: float | None,
                    repeated: bool | None, block: int | None):
    quant = all(f.integer for f in frames)
    sheppard = _SHEPPARD if quant else 0.0
    h, w = frames[0].data.shape
    b = block or (16 if min(h, w) >= 256 else 8)
    if repeated is None:
        repeated = _same_field(frames)
    z_list: list[np.ndarray] = []
    k_list: list[np.ndarray] = []
    if repeated and len(frames) >= 2:
        method = f"repeated frames ({len(frames)})"
        ms, vs = [], []
        for f0, f1 in zip(frames[:-1], frames[1:]):
            d = (f1.data - f0.data) / math.sqrt(2.0)
            db = _blocks(d, b)
            mb = _blocks(0.5 * (f0.data + f1.data), b)
            med = np.median(db, axis=1, keepdims=True)
            s0 = _MAD * np.median(np.abs(db - med), axis=1)
            kp = np.abs(db - med) < _KT * s0[:, None]
            ok = (kp.mean(1) > 0.9) & (s0 > 0)
            for fr in (f0, f1):
                vm = _valid_mask(fr)
                if vm is not None:
                    ok &= _blocks(vm, b).all(1)
            dm = (db * kp).sum(1) / np.maximum(kp.sum(1), 1)
            v = ((db - dm[:, None]) ** 2 * kp).sum(1) / np.maximum(kp.sum(1) - 1, 1) / _TRUNC
            ms.append(mb.mean(1)[ok])
            vs.append(v[ok])
            # x-correlation of the difference (pure noise) gives the lag directly
            z_list.append(d / max(float(np.std(d)), 1e-12))
            dev = np.abs(d - np.median(d))
            k_list.append(dev < _KT * _MAD * np.median(dev))
        m = np.concatenate(ms)
        v = np.concatenate(vs)
        lag = _lag_from_differences(z_list, k_list)
        k_factor = 1.0
    else:
        method = "single-image blocks" + (f" ({len(frames)} images)" if len(frames) > 1 else "")
        d1 = [_pass1(f, b) for f in frames]
        m = np.concatenate([d.mean for d in d1])
        v = np.concatenate([d.var for d in d1])
        if len(m) < _MIN_BLOCKS:
            raise CalibrationError(_too_few_msg(len(m), frames))
        s, c, *_ = _fit_line(m, v)
        for it in range(2):
            res = [_pass2(f, b, s, c, flat=it == 1) for f in frames]
            m = np.concatenate([r[0].mean for r in res])
            v = np.concatenate([r[0].var for r in res])
            if len(m) < _MIN_BLOCKS:
                raise CalibrationError(_too_few_msg(len(m), frames))
            s, c, *_ = _fit_line(m, v)
        z_list = [r[1][0] for r in res]
        k_list = [r[2][0] for r in res]
        rv_list = [r[1][2] for r in res]
        rv_masks = [r[2][1] for r in res]
        p_list = [r[1][1] for r in res]
        shot = None
        if dark is not None:  # shot share of the K-domain variance on the pixels used
            rvar = dark.readout_sigma ** 2 + sheppard
            fr_ = []
            for r, kp in zip(res, k_list):
                pp = r[1][1][kp]
                if pp.size:
                    fr_.append(float(np.mean(np.clip((pp - rvar) / pp, 0.0, 1.0))))
            if fr_:
                # K-domain shot share f_K = fκ/(fκ + 1 − f): solved for f below, per pole
                shot = float(np.mean(fr_))
        lag = estimate_lag(z_list, k_list, shot, rv_list, rv_masks,
                           (dark.readout_sigma ** 2 + sheppard) if dark is not None else None,
                           p_list)
        k_factor = _lag_factors(lag.a)[1] if lag.applied else 1.0
    if len(m) < _MIN_BLOCKS:
        raise CalibrationError(_too_few_msg(len(m), frames))
    # residual-domain variances → pixel-domain: the shot part is divided by the K factor
    pix_factor = _lag_factors(lag.a)[0] if lag.applied else 1.0
    s_free, c_free, se_free, bins, _ = _fit_line(m, v)
    spread = float(np.percentile(m, 95) - np.percentile(m, 5))
    if dark is not None:
        o = dark.offset
        rv = dark.readout_sigma ** 2 + sheppard
        s_k, c_k, se_k, bins, _ = _fit_line(m, v, anchor=(o, rv))
        readout = dark.readout_sigma
        o_src, r_src = "dark frames", "dark frames"
    elif offset is not None:
        o = float(offset)
        s_k, c_k, se_k = s_free, c_free, se_free
        rv = c_k + s_k * o
        if rv < sheppard:
            readout = 0.0
        else:
            readout = math.sqrt(rv - sheppard)
        o_src, r_src = "given", "photon-transfer intercept at the given offset"
    else:
        s_k, c_k, se_k = s_free, c_free, se_free
        o = -c_k / s_k if s_k > 0 else float("nan")
        readout = 0.0
        o_src = "assumed: zero-variance intercept of the photon-transfer line"
        r_src = "assumed 0: not separable from the offset without dark frames"
    if not math.isfinite(s_k) or not math.isfinite(se_k) or se_k > 0.25 * abs(s_k):
        raise CalibrationError(
            f"the images span too narrow a range of signal levels ({spread:.3g} counts between "
            f"the 5th and 95th percentile of flat regions) to fit the photon-transfer slope "
            f"(gain {s_k:.3g} ± {se_k:.2g}): give dark frames (--dark), or images at several "
            "doses / with brighter and darker regions")
    if not s_k > 0:
        raise CalibrationError(
            "the variance does not grow with the signal in these images (photon-transfer slope "
            f"{s_k:.3g}): they are not raw detector counts (processed, rescaled or denoised?); "
            "give raw frames at several signal levels, or repeated frames plus dark frames")
    # shot-noise slope in pixel variance, then the gain (lag undoes (1-a)/(1+a))
    s_pix = s_k / k_factor
    gain = s_pix / pix_factor
    gain_se = se_k / k_factor / pix_factor
    if dark is not None:
        intercept = rv - s_pix * o
    elif offset is not None:
        intercept = c_k + s_k * o - s_pix * o
    else:
        intercept = -s_pix * o
    bm, bv, be = bins
    est = NoiseEstimate(
        gain=float(gain), gain_stderr=float(gain_se), readout_sigma=float(readout),
        offset=float(o), slope=float(s_pix), intercept=float(intercept),
        offset_source=o_src, readout_source=r_src, method=method, n_blocks=int(len(m)),
        lag=lag, quantised=quant, block_mean=m, block_var=v / k_factor if k_factor != 1 else v,
        bin_mean=bm, bin_var=bv / k_factor, bin_err=be / k_factor,
        free_fit=(float(s_free / k_factor), float(c_free)),
    )
    return est, z_list, k_list


def _lag_from_differences(z_list, k_list) -> LagEstimate:
    """Lag from the x-autocorrelation of frame differences (pure noise)."""
    num1 = num2 = n1 = n2 = 0.0
    ny1 = nny = 0.0
    den = nden = 0.0
    for z, k in zip(z_list, k_list):
        zz = np.where(k, z, 0.0)
        den += float(np.sum(zz * zz))
        nden += float(k.sum())
        num1 += float(np.sum(zz[:, :-1] * zz[:, 1:]))
        n1 += float(np.sum(k[:, :-1] & k[:, 1:]))
        num2 += float(np.sum(zz[:, :-2] * zz[:, 2:]))
        n2 += float(np.sum(k[:, :-2] & k[:, 2:]))
        ny1 += float(np.sum(zz[:-1] * zz[1:]))
        nny += float(np.sum(k[:-1] & k[1:]))
    var = den / max(nden, 1)
    r1 = num1 / max(n1, 1) / var
    r2 = num2 / max(n2, 1) / var
    ry = ny1 / max(nny, 1) / var
    se = 1.0 / math.sqrt(max(n1, 1))
    significant = (r1 - ry) > 5 * se and r1 > 0.02
    a = float(np.clip(r2 / r1, 0.0, 0.95)) if significant and r1 > 0 else 0.0
    return LagEstimate(a=a, stderr=float(se / max(r1, 1e-3)), applied=bool(significant and a > 0),
                       q_x=(float(r1), float(r2)), q_y=(float(ry), 0.0))


def _too_few_msg(n: int, frames: Sequence[_Frame]) -> str:
    return (f"{', '.join(f.source for f in frames)}: too few locally flat regions to fit the noise "
            f"({n} usable blocks, need at least {_MIN_BLOCKS}): the images are too small or "
            "structured everywhere; give larger images, several frames of the same field, "
            "or dark frames (--dark) together with a flatter image")


# --------------------------------------------------------------------------------------------
# line jitter
# --------------------------------------------------------------------------------------------

def _line_shifts(img: np.ndarray, pvar: np.ndarray | None, *, smooth: float = 0.7,
                 iters: int = 5, margin: int = 12, block: int = 16, guard: int = 3):
    """Shift of every inner line against its neighbours' mean, from two disjoint column sets.

    Returns ``(dA, dB, info)``: the two estimates and a per-line information (Σ G²).
    """
    h, w = img.shape
    x = np.concatenate([img, img[:, ::-1]], axis=1)
    n = x.shape[1]
    spec = sfft.rfft(x, axis=1, workers=-1)
    kx = np.fft.rfftfreq(n)
    hs = np.exp(-2.0 * np.pi ** 2 * smooth ** 2 * kx ** 2)
    spec *= hs
    fa = 0.5 * (spec[:-2] + spec[2:])
    bb = sfft.irfft(spec[1:-1], n=n, axis=1, workers=-1)[:, :w]
    ik = 2j * np.pi * kx
    cols = np.arange(w)
    inner = (cols >= margin) & (cols < w - margin)
    pos = (cols - margin) % (2 * block)
    sets = [inner & (pos >= guard) & (pos < block - guard),
            inner & (pos >= block + guard) & (pos < 2 * block - guard)]
    gnoise = None
    if pvar is not None:
        kd = np.fft.irfft(hs * ik, n=n)
        gnoise = 0.25 * (pvar[:-2] + pvar[2:]) * float(np.sum(kd * kd))
    out = []
    info = None
    for sel in sets:
        d = np.zeros(h - 2)
        for _ in range(iters):
            fs = fa * np.exp(ik[None, :] * d[:, None])
            a_s = sfft.irfft(fs, n=n, axis=1, workers=-1)[:, :w][:, sel]
            g = sfft.irfft(fs * ik[None, :], n=n, axis=1, workers=-1)[:, :w][:, sel]
            num = np.sum(g * (bb[:, sel] - a_s), axis=1)
            den = np.sum(g * g, axis=1)
            if gnoise is not None:
                den = np.maximum(den - gnoise[:, sel].sum(1), 0.3 * den)
            d = d + num / np.maximum(den, 1e-300)
            d = np.clip(d, -5.0, 5.0)
        out.append(d)
        info = den if info is None else info + den
    return out[0], out[1], info


def estimate_jitter(img: np.ndarray, noise: NoiseEstimate | None = None,
                    max_lines: int = 512, max_cols: int = 1024) -> JitterEstimate:
    """Line-jitter σ (px) of one image (see the module docstring)."""
    a = np.asarray(img, dtype=np.float64)
    h, w = a.shape
    if h > max_lines + 2:
        r0 = (h - max_lines - 2) // 2
        a = a[r0:r0 + max_lines + 2]
    if w > max_cols:
        c0 = (w - max_cols) // 2
        a = a[:, c0:c0 + max_cols]
    pvar = None
    if noise is not None:
        pvar = noise.pixel_variance(ndimage.uniform_filter(a, 5, mode="reflect"))
    da, db, info = _line_shifts(a, pvar)
    diff = da - db
    ok = np.isfinite(diff) & (info > 0)
    if ok.sum() < 16:
        return JitterEstimate(0.0, float("inf"), int(ok.sum()), float("nan"), np.zeros(0))
    kappa = float(np.median(diff[ok] ** 2 * info[ok])) / 0.455 / 2.0
    vnoise = kappa / np.maximum(info, 1e-300)
    mid = 0.5 * (da + db)
    center = float(np.median(mid[ok]))
    prod = (da - center) * (db - center)
    s2 = max(float(np.median(prod[ok])), 1e-6)
    keep = ok
    wgt = np.ones(1)
    for _ in range(60):
        tot = s2 + vnoise
        keep = ok & (diff ** 2 < 25 * 2 * vnoise) & ((mid - center) ** 2 < 25 * (s2 + vnoise / 2))
        wgt = 1.0 / tot[keep] ** 2
        new = max(float(np.sum(wgt * prod[keep]) / np.sum(wgt)), 0.0)
        if abs(new - s2) < 1e-12:
            break
        s2 = new
    tot = s2 + vnoise
    se_s2 = (math.sqrt(float(np.sum(wgt ** 2 * (tot[keep] ** 2 + vnoise[keep] ** 2))))
             / float(np.sum(wgt)))
    sig = math.sqrt(s2 / 1.5)
    se_sig = (se_s2 / 1.5) / (2 * sig) if sig > 0 else math.sqrt(se_s2 / 1.5)
    return JitterEstimate(sigma_px=sig, stderr=se_sig, n_lines=int(keep.sum()),
                          noise_sd_px=float(math.sqrt(np.median(vnoise[ok]))), trace=mid)


# --------------------------------------------------------------------------------------------
# PSF
# --------------------------------------------------------------------------------------------

_SQ2 = math.sqrt(2.0)


def _edge_model(p: np.ndarray, t: np.ndarray, o: float) -> np.ndarray:
    """Step (a ± b) with an optional groove (amplitude c, width σg) blurred by a Gaussian σ."""
    a, b, c, sg, s, t0 = (p[:, i:i + 1] for i in range(6))
    u = t - t0
    ww = np.sqrt(sg * sg + s * s)
    g = (sg / ww) * np.exp(-u * u / (2.0 * ww * ww))
    am = a - o
    depth = c / np.where(np.abs(am) > 1e-9, am, 1e-9)
    return a + b * special.erf(u / (_SQ2 * s)) - c * g - b * depth * g * special.erf(
        u * sg / (_SQ2 * s * ww))


def _find_edges(img: np.ndarray, pvar: np.ndarray, n_max: int, radius: int, cell: int = 10,
                smooth: float = 1.5):
    sm = ndimage.gaussian_filter(img, smooth)
    gx = ndimage.sobel(sm, axis=1) / 8.0
    gy = ndimage.sobel(sm, axis=0) / 8.0
    mag = np.hypot(gx, gy)
    noise = math.sqrt(float(np.median(pvar))) * math.sqrt(1.0 / (8.0 * math.pi * smooth ** 4))
    h, w = img.shape
    # thinning along the quantised gradient direction (slices, no fancy indexing)
    ang = np.mod(np.round(np.arctan2(gy, gx) / (np.pi / 4)), 4).astype(np.int8)
    pad = np.pad(mag, 1, mode="edge")
    nbr = {0: ((1, 2), (1, 0)), 1: ((2, 2), (0, 0)), 2: ((2, 1), (0, 1)), 3: ((2, 0), (0, 2))}
    thin = np.zeros_like(mag, dtype=bool)
    for k, ((y1, x1), (y2, x2)) in nbr.items():
        n1 = pad[y1:y1 + h, x1:x1 + w]
        n2 = pad[y2:y2 + h, x2:x2 + w]
        thin |= (ang == k) & (mag >= n1) & (mag >= n2)
    cand = thin & (mag > 5.0 * noise)
    r = radius + 1
    cand[:r] = cand[-r:] = False
    cand[:, :r] = cand[:, -r:] = False
    m = np.where(cand, mag, 0.0)
    hc, wc = h // cell, w // cell
    mb = m[:hc * cell, :wc * cell].reshape(hc, cell, wc, cell).transpose(0, 2, 1, 3).reshape(
        hc, wc, cell * cell)
    k = mb.argmax(-1)
    v = mb.max(-1)
    cy, cx = np.nonzero(v > 0)
    py = cy * cell + k[cy, cx] // cell
    px = cx * cell + k[cy, cx] % cell
    order = np.argsort(-v[cy, cx])
    if len(order) > n_max:  # strongest half, then an even spread of the rest
        rest = order[n_max // 2:]
        order = np.concatenate([order[:n_max // 2],
                                rest[:: max(len(rest) // (n_max // 2), 1)]])[:n_max]
    py, px = py[order], px[order]
    return py, px, gx[py, px], gy[py, px]


def _fit_edges(img, pvar, o, py, px, gx, gy, radius=7, half_len=4.0, iters=20):
    n = len(py)
    off = np.arange(-radius, radius + 1)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy = oy.ravel()
    ox = ox.ravel()
    vals = img[py[:, None] + oy[None, :], px[:, None] + ox[None, :]]
    var = pvar[py[:, None] + oy[None, :], px[:, None] + ox[None, :]]
    nrm = np.hypot(gx, gy)
    nx = (gx / nrm)[:, None]
    ny = (gy / nrm)[:, None]
    t = ox[None, :] * nx + oy[None, :] * ny
    u = -ox[None, :] * ny + oy[None, :] * nx
    mask = (np.abs(t) <= radius - 1.0) & (np.abs(u) <= half_len)
    wt = mask / np.maximum(var, 1e-9)
    left = mask & (t < -2.5)
    right = mask & (t > 2.5)
    mid = mask & (np.abs(t) < 1.0)
    m_l = (vals * left).sum(1) / np.maximum(left.sum(1), 1)
    m_r = (vals * right).sum(1) / np.maximum(right.sum(1), 1)
    m_m = (vals * mid).sum(1) / np.maximum(mid.sum(1), 1)
    a0 = 0.5 * (m_l + m_r)
    b0 = 0.5 * (m_r - m_l)
    c0 = np.maximum(a0 - m_m, 0.0)
    p = np.stack([a0, b0, c0, np.full(n, 1.0), np.full(n, 1.0), np.zeros(n)], 1)
    lam = np.full(n, 1e-2)

    def chi2(q):
        r = vals - _edge_model(q, t, o)
        return (wt * r * r).sum(1)

    c2 = chi2(p)
    a_mat = np.zeros((n, 6, 6))
    for _ in range(iters):
        f0 = _edge_model(p, t, o)
        jac = np.empty((n, 6, t.shape[1]))
        for i in range(6):
            hstep = (1e-3 * np.maximum(np.abs(p[:, i]), 1.0)) if i < 3 else np.full(n, 1e-4)
            pp = p.copy()
            pp[:, i] += hstep
            jac[:, i] = (_edge_model(pp, t, o) - f0) / hstep[:, None]
        a_mat = np.einsum("nik,njk,nk->nij", jac, jac, wt)
        grad = np.einsum("nik,nk->ni", jac, wt * (vals - f0))
        dg = np.einsum("nii->ni", a_mat)
        dg = dg + 1e-9 * dg.max(1, keepdims=True) + 1e-300
        ad = a_mat + (lam[:, None] * dg)[:, :, None] * np.eye(6)[None]
        try:
            step = np.linalg.solve(ad, grad[..., None])[..., 0]
        except np.linalg.LinAlgError:
            step = np.zeros_like(p)
        pn = p + step
        pn[:, 3] = np.clip(np.abs(pn[:, 3]), 0.3, 5.0)
        pn[:, 4] = np.clip(np.abs(pn[:, 4]), 0.05, 10.0)
        pn[:, 5] = np.clip(pn[:, 5], -2.0, 2.0)
        c2n = chi2(pn)
        better = c2n < c2
        p[better] = pn[better]
        c2[better] = c2n[better]
        lam = np.where(better, lam * 0.3, lam * 10.0)
    dof = np.maximum(mask.sum(1) - 6, 1)
    contrast = np.abs(p[:, 1]) / np.sqrt(np.maximum(var[:, var.shape[1] // 2], 1e-9))
    return p, c2 / dof, contrast, np.abs(nx[:, 0]), t, vals


def _psf_spectrum(img: np.ndarray, noise: NoiseEstimate) -> PSFEstimate:
    """Effective Gaussian blur from the radially averaged power spectrum (Welch, 256² tiles)."""
    a = np.asarray(img, dtype=np.float64)
    tile = min(256, a.shape[0], a.shape[1])
    win = np.outer(np.hanning(tile), np.hanning(tile))
    acc = np.zeros((tile, tile))
    cnt = 0
    for r0 in range(0, a.shape[0] - tile + 1, tile):
        for c0 in range(0, a.shape[1] - tile + 1, tile):
            t = a[r0:r0 + tile, c0:c0 + tile]
            t = (t - t.mean()) * win
            acc += np.abs(np.fft.fft2(t)) ** 2
            cnt += 1
    acc /= cnt * float(np.sum(win * win))
    ky = np.fft.fftfreq(tile)[:, None]
    kx = np.fft.fftfreq(tile)[None, :]
    k = np.sqrt(kx * kx + ky * ky)
    edges = np.linspace(0.0, 0.5, tile // 4 + 1)
    idx = np.digitize(k.ravel(), edges) - 1
    ok = (idx >= 0) & (idx < len(edges) - 1)
    ps = np.bincount(idx[ok], weights=acc.ravel()[ok], minlength=len(edges) - 1)
    nn = np.bincount(idx[ok], minlength=len(edges) - 1)
    kc = 0.5 * (edges[1:] + edges[:-1])
    ps = ps / np.maximum(nn, 1)
    floor = float(noise.pixel_variance(np.array([a.mean()]))[0])
    # the white floor from the data: median of the top band (above 0.45 cycles/px)
    top = kc > 0.45
    floor = float(np.median(ps[top])) if np.median(ps[top]) < 3 * floor else floor
    sig = ps - floor
    use = (kc > 0.03) & (sig > 3.0 * floor / np.sqrt(np.maximum(nn * cnt, 1)))
    if use.sum() < 5:
        return PSFEstimate(float("nan"), float("inf"), "spectrum", 0,
                           spectrum=(kc, ps, np.full_like(kc, floor)))
    x = kc[use]
    y = np.log(sig[use])
    A = np.vstack([np.ones_like(x), -np.log(x), -4.0 * np.pi ** 2 * x * x]).T
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    s2 = max(float(coef[2]), 0.0)
    resid = y - A @ coef
    cov = np.linalg.pinv(A.T @ A) * float(np.var(resid)) if len(y) > 3 else np.full((3, 3), np.inf)
    se = math.sqrt(abs(cov[2, 2])) / (2 * math.sqrt(s2)) if s2 > 0 else float("inf")
    fit = np.exp(coef[0] - coef[1] * np.log(np.maximum(kc, 1e-6))
                 - 4 * np.pi ** 2 * s2 * kc * kc) + floor
    return PSFEstimate(math.sqrt(s2), se, "spectrum", int(use.sum()), spectrum=(kc, ps, fit))


def _psf_columns(img: np.ndarray, noise: NoiseEstimate, max_peaks: int = 400) -> PSFEstimate | None:
    """Width of bright blobs on a lattice (atomic columns): anisotropic Gaussians fitted to the
    local maxima; σ_y (across the scan lines, free of line jitter) is the effective PSF."""
    from scipy.spatial import cKDTree

    a = np.asarray(img, dtype=np.float64)
    found = None
    for sigma in (1.5, 2.5, 4.0):  # the smallest smoothing that gives a regular array
        sm = ndimage.gaussian_filter(a, sigma)
        pv = noise.pixel_variance(sm)
        size = 2 * int(round(1.5 * sigma)) + 3
        mx = ndimage.maximum_filter(sm, size=size)
        mn = ndimage.minimum_filter(sm, size=3 * size)
        peak = (sm == mx) & ((sm - mn) > 4.0 * np.sqrt(pv / (4 * np.pi * sigma * sigma)))
        ys, xs = np.nonzero(peak)
        if len(ys) < 30:
            continue
        pts = np.column_stack([ys, xs]).astype(float)
        d, _ = cKDTree(pts).query(pts, k=2)
        dnn = float(np.median(d[:, 1]))
        if 4.0 <= dnn <= 80.0 and np.std(d[:, 1]) < 0.25 * dnn:
            found = (ys, xs, dnn, pv)
            break
    if found is None:
        return None
    ys, xs, dnn, pv = found
    pv = noise.pixel_variance(ndimage.uniform_filter(a, 3))
    r = int(np.clip(round(0.4 * dnn), 2, 10))
    h, w = a.shape
    inside = (ys >= r) & (ys < h - r) & (xs >= r) & (xs < w - r)
    ys, xs = ys[inside], xs[inside]
    if len(ys) > max_peaks:
        sel = np.linspace(0, len(ys) - 1, max_peaks).astype(int)
        ys, xs = ys[sel], xs[sel]
    off = np.arange(-r, r + 1, dtype=float)
    oy, ox = np.meshgrid(off, off, indexing="ij")
    oy, ox = oy.ravel(), ox.ravel()
    vals = a[ys[:, None] + oy.astype(int)[None, :], xs[:, None] + ox.astype(int)[None, :]]
    wt = 1.0 / np.maximum(pv[ys[:, None] + oy.astype(int)[None, :],
                             xs[:, None] + ox.astype(int)[None, :]], 1e-9)
    n = len(ys)
    bkg0 = np.percentile(vals, 10, axis=1)
    p = np.stack([vals.max(1) - bkg0, np.zeros(n), np.zeros(n), np.full(n, r / 2.0),
                  np.full(n, r / 2.0), bkg0], 1)

    def model(q):
        return (q[:, 0:1] * np.exp(-0.5 * ((ox[None] - q[:, 1:2]) / q[:, 3:4]) ** 2
                                   - 0.5 * ((oy[None] - q[:, 2:3]) / q[:, 4:5]) ** 2) + q[:, 5:6])

    lam = np.full(n, 1e-2)
    c2 = (wt * (vals - model(p)) ** 2).sum(1)
    for _ in range(25):
        f0 = model(p)
        jac = np.empty((n, 6, ox.size))
        for i in range(6):
            hs = 1e-4 * np.maximum(np.abs(p[:, i]), 1.0)
            pp = p.copy()
            pp[:, i] += hs
            jac[:, i] = (model(pp) - f0) / hs[:, None]
        am = np.einsum("nik,njk,nk->nij", jac, jac, wt)
        gr = np.einsum("nik,nk->ni", jac, wt * (vals - f0))
        dg = np.einsum("nii->ni", am) + 1e-300
        try:
            step = np.linalg.solve(am + (lam[:, None] * dg)[:, :, None] * np.eye(6)[None],
                                   gr[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break
        pn = p + step
        pn[:, 3:5] = np.clip(np.abs(pn[:, 3:5]), 0.3, 2.0 * r)
        pn[:, 1:3] = np.clip(pn[:, 1:3], -r / 2.0, r / 2.0)
        c2n = (wt * (vals - model(pn)) ** 2).sum(1)
        better = c2n < c2
        p[better] = pn[better]
        c2[better] = c2n[better]
        lam = np.where(better, lam * 0.3, lam * 10.0)
    good = (p[:, 0] > 0) & (p[:, 3] < 0.9 * r) & (p[:, 4] < 0.9 * r) & (np.abs(p[:, 1]) < r / 3) \
        & (np.abs(p[:, 2]) < r / 3)
    if good.sum() < 20:
        return None
    sy = float(np.median(p[good, 4]))
    sx = float(np.median(p[good, 3]))
    se = 1.2533 * _MAD * float(np.median(np.abs(p[good, 4] - sy))) / math.sqrt(good.sum())
    return PSFEstimate(sy, se, "atomic columns", int(good.sum()), sigma_x_px=sx)


def estimate_psf(img: np.ndarray, noise: NoiseEstimate, jitter: JitterEstimate | None = None,
                 n_edges: int = 200, min_edges: int = 20) -> PSFEstimate:
    """Gaussian PSF σ (px) from edges, or from the power spectrum without enough edges."""
    a = np.asarray(img, dtype=np.float64)
    if noise.lag.applied and noise.lag.a > 0:  # undo the lag along x before looking at edges
        la = noise.lag.a
        a = a.copy()
        a[:, 1:] = (a[:, 1:] - la * a[:, :-1]) / (1.0 - la)
    h, w = a.shape
    if h > 1024 or w > 1024:  # edges of the central 1024² are plenty
        r0, c0 = max((h - 1024) // 2, 0), max((w - 1024) // 2, 0)
        a = a[r0:r0 + 1024, c0:c0 + 1024]
    pvar = noise.pixel_variance(ndimage.uniform_filter(a, 5, mode="reflect"))
    radius = 7
    py, px, gx, gy = _find_edges(a, pvar, n_edges, radius)
    if len(py) >= min_edges:
        p, rchi, contrast, cosx, t, vals = _fit_edges(a, pvar, noise.offset, py, px, gx, gy,
                                                      radius=radius)
        s = np.abs(p[:, 4])
        good = (rchi < 1.5) & (contrast > 2.5) & (s > 0.06) & (s < 9.9)
        if good.sum() >= min_edges:
            jit2 = 0.0
            if jitter is not None and math.isfinite(jitter.sigma_px):
                jit2 = jitter.sigma_px ** 2
            s2 = s[good] ** 2 - jit2 * cosx[good] ** 2
            med = float(np.median(s2))
            sig = math.sqrt(max(med, 1e-4))
            mad = _MAD * float(np.median(np.abs(np.sqrt(np.maximum(s2, 1e-4)) - sig)))
            se = 1.2533 * mad / math.sqrt(good.sum())
            # a normalised, aligned edge-spread sample for the figure
            sel = np.nonzero(good)[0][:60]
            tt = (t[sel] - p[sel, 5:6]).ravel()
            bb = np.where(np.abs(p[sel, 1:2]) > 0, p[sel, 1:2], 1.0)
            vv = ((vals[sel] - p[sel, 0:1]) / bb).ravel()
            inwin = np.abs(tt) < radius - 1
            return PSFEstimate(sig, se, "edges", int(good.sum()), profile_t=tt[inwin],
                               profile_v=vv[inwin])
    cols = _psf_columns(a, noise)
    if cols is not None:
        return cols
    return _psf_spectrum(a, noise)


# --------------------------------------------------------------------------------------------
# vignetting
# --------------------------------------------------------------------------------------------

def estimate_vignetting(images: Sequence[np.ndarray], offset: float,
                        grid: int = 24) -> VignettingEstimate:
    """Low-order multiplicative background (see the module docstring)."""
    maps = []
    for img in images:
        a = np.asarray(img, dtype=np.float64) - offset
        h, w = a.shape
        g = int(min(grid, h // 8, w // 8))
        bh, bw = h // g, w // g
        blk = a[:g * bh, :g * bw].reshape(g, bh, g, bw).transpose(0, 2, 1, 3).reshape(g, g, bh * bw)
        med = np.median(blk, axis=-1)
        mu = float(np.mean(med))
        if mu <= 0:
            continue
        maps.append(med / mu)
    if not maps:
        return VignettingEstimate(np.zeros(5), np.full(5, np.inf), np.zeros(5, bool))
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        maps = [m for m in maps if m.shape == maps[0].shape]
    bmap = np.mean(maps, axis=0)
    g1, g2 = bmap.shape
    basis = vignetting_basis((g1, g2)).reshape(5, -1).T
    y = bmap.ravel()
    X = np.hstack([np.ones((y.size, 1)), basis])
    keep = np.ones(y.size, bool)
    for _ in range(5):
        coef, *_ = np.linalg.lstsq(X[keep], y[keep], rcond=None)
        res = y - X @ coef
        sd = _MAD * float(np.median(np.abs(res[keep])))
        new = np.abs(res) < 3.0 * max(sd, 1e-12)
        if np.array_equal(new, keep):
            break
        keep = new
    c = coef[1:] / coef[0]
    # standard errors by a delete-one-group jackknife over 4x4 groups of blocks: the structure
    # of a specimen is correlated over many blocks, which an independent-residual error ignores
    gi = (np.arange(g1)[:, None] * 4 // g1) * 4 + (np.arange(g2)[None, :] * 4 // g2)
    gi = gi.ravel()
    reps = []
    for k in range(16):
        sel = keep & (gi != k)
        if sel.sum() < 12:
            continue
        ck, *_ = np.linalg.lstsq(X[sel], y[sel], rcond=None)
        reps.append(ck[1:] / ck[0])
    if len(reps) >= 8:
        reps = np.array(reps)
        se = np.sqrt((len(reps) - 1) / len(reps) * np.sum((reps - reps.mean(0)) ** 2, axis=0))
    else:
        se = np.full(5, np.inf)
    sig = np.abs(c) > 3.0 * se
    fit = (X @ coef).reshape(g1, g2)
    return VignettingEstimate(c, se, sig, block_map=bmap, fit_map=fit)


# --------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------

def calibrate(images: Iterable, dark: Iterable | None = None, *, offset: float | None = None,
              repeated: bool | None = None, kind: str | None = None,
              estimate: Sequence[str] = ("noise", "jitter", "psf", "vignetting")) -> Calibration:
    """Estimate an instrument's detector and scan parameters from its images.

    Parameters
    ----------
    images : iterable of paths, arrays (2-D image or 3-D stack) or :class:`twin.io.ImageData`
        Micrographs of one detector setting.  Several frames of the same field are detected and
        used as repeated frames (override with ``repeated``).
    dark : iterable, optional
        Dark / offset-only frames of the same detector (no beam): offset, read noise, fixed pattern.
    offset : float, optional
        Known offset (counts), when no dark frames are given.
    kind : {"sem", "stem", "tem", "optical"}, optional
        Instrument kind (default: from the file metadata, else "sem").
    estimate : sequence of str
        Which estimates to make besides the noise (``jitter``, ``psf``, ``vignetting``).

    Raises
    ------
    CalibrationError, twin.io.ImageReadError
        Unreadable input, wrong dtype, constant or saturated images, too few flat regions, a
        signal range too narrow without dark frames.
    """
    t0 = time.perf_counter()
    items = [_to_imagedata(x, "image") for x in images]
    if not items:
        raise CalibrationError("no images given: give at least one micrograph of the detector")
    frames: list[_Frame] = []
    for it in items:
        for i, fr in enumerate(it.frames):
            src = it.path if len(it.frames) == 1 else f"{it.path}[{i}]"
            frames.append(_check_frame(fr, src))
    shapes = {f.data.shape for f in frames}
    dark_est = None
    dark_src: list[str] = []
    if dark is not None:
        ditems = [_to_imagedata(x, "dark") for x in dark]
        dframes = []
        for it in ditems:
            for fr in it.frames:
                dframes.append(_check_frame(fr, it.path, dark=True).data)
            dark_src.append(it.path)
        if dframes:
            dshape = {d.shape for d in dframes}
            if len(dshape) > 1:
                raise CalibrationError("dark frames must all have the same shape; got "
                                       + ", ".join(str(s) for s in sorted(dshape)))
            dark_est = estimate_dark(dframes)
    warns: list[str] = []
    if len(shapes) > 1 and (repeated is True):
        raise CalibrationError("repeated frames must all have the same shape")
    noise, _, _ = _estimate_noise(frames, dark_est, offset, repeated, None)
    if not noise.offset_source.startswith(("dark", "given")):
        warns.append("offset and read noise are not separable from the variance alone: the "
                     "offset is the zero-variance intercept and the read noise 0; give dark "
                     "frames (--dark) or the offset (--offset) to measure them")
    if noise.offset < 0:
        warns.append(f"offset {noise.offset:.3g} < 0 (an offset-subtracted camera): recorded "
                     "uint16 values are clipped at 0 when generating")
    jit = psf = vig = None
    repeated_mode = noise.method.startswith("repeated")
    first = np.mean([f.data for f in frames], axis=0) if repeated_mode else None
    singles = [first] if repeated_mode else [f.data for f in frames]
    if "jitter" in estimate:
        ests = [estimate_jitter(im, noise) for im in singles]
        ok = [e for e in ests if math.isfinite(e.stderr) and e.stderr > 0]
        if ok:
            w = np.array([1.0 / max(e.stderr, 1e-6) ** 2 for e in ok])
            s2 = float(np.sum(w * np.array([e.sigma_px ** 2 for e in ok])) / w.sum())
            se = float(np.sqrt(1.0 / w.sum()))
            jit = JitterEstimate(math.sqrt(max(s2, 0.0)), se, sum(e.n_lines for e in ok),
                                 float(np.median([e.noise_sd_px for e in ok])), ok[0].trace)
            if jit.sigma_px < 2 * jit.stderr:
                warns.append(f"line jitter {jit.sigma_px:.3g} px is not significant "
                             f"(±{jit.stderr:.2g}): the noise hides it at this dose")
    if "psf" in estimate:
        ests = [estimate_psf(im, noise, jit) for im in singles[:4]]
        ests = [e for e in ests if math.isfinite(e.sigma_px)]
        if ests:
            rank = {"edges": 2, "atomic columns": 1}
            best = max(ests, key=lambda e: (rank.get(e.method, 0), e.n_used))
            sig = float(np.median([e.sigma_px for e in ests if e.method == best.method]))
            psf = PSFEstimate(sig, best.stderr, best.method, sum(e.n_used for e in ests),
                              best.profile_t, best.profile_v, best.spectrum, best.sigma_x_px)
            if best.method == "atomic columns":
                warns.append("no sharp edges: the PSF is the width of the atomic columns "
                             "(σ along y, free of line jitter): the probe convolved with the "
                             "columns, an upper bound of the probe PSF")
            elif best.method != "edges":
                warns.append("too few sharp edges for the edge PSF fit: the PSF is the effective "
                             "Gaussian blur of the power spectrum")
        else:
            warns.append("PSF not measurable (no edges and no spectral decay above the noise)")
    if "vignetting" in estimate:
        vig = estimate_vignetting(singles, noise.offset)
        if len(singles) < 2 and vig.significant.any():
            warns.append("vignetting from a single field of view is confounded with specimen "
                         "gradients: fitted " + ", ".join(
                             f"{t}={c:.3g}" for t, c, g in zip(VIGNETTING_TERMS, vig.coefficients,
                                                              vig.significant) if g)
                         + " is reported but not used; give several fields of view")
            vig.significant[:] = False
    sat = None
    clips = [f.clip_hi for f in frames if f.clip_hi is not None]
    if clips:
        sat = float(min(clips))
    vmax = max(float(f.data.max()) for f in frames)
    bit_depth = _bit_depth(frames[0].dtype, vmax)
    px = next((it.pixel_size_nm for it in items if it.pixel_size_nm), None)
    dwell = next((it.metadata.get("dwell_time_s") for it in items
                  if it.metadata.get("dwell_time_s")), None)
    if kind is None:
        kind = next((it.metadata.get("kind_hint") for it in items
                     if it.metadata.get("kind_hint")), "sem")
    if kind not in ("sem", "stem", "tem", "optical"):
        raise CalibrationError(f"kind must be sem, stem, tem or optical, got {kind!r}")
    if kind in ("tem", "optical"):
        jit = None  # a camera has no scan lines
    return Calibration(
        noise=noise, dark=dark_est, jitter=jit, psf=psf, vignetting=vig, bit_depth=bit_depth,
        saturation=sat, kind=kind, sources=[it.path for it in items], dark_sources=dark_src,
        shape=frames[0].data.shape, pixel_size_nm=px, dwell_time_s=dwell, warnings=warns,
        seconds=time.perf_counter() - t0,
    )


def profile_yaml(cal: Calibration, name: str = "calibrated", base=None) -> str:
    """The profile as YAML text, with a comment header; validated against the schema."""
    import yaml

    from twin.instrument import parse_instrument

    prof = cal.profile(name=name, base=base)
    head = ("# Instrument profile written by `twin calibrate` from:\n"
            + "".join(f"#   {s}\n" for s in cal.sources)
            + ("# dark frames:\n" + "".join(f"#   {s}\n" for s in cal.dark_sources)
               if cal.dark_sources else "# no dark frames: offset/readout "
               + ("given" if cal.noise.offset_source == "given" else "assumed (see calibration)")
               + "\n")
            + "# Values not estimated (drift, mains, nonlinearity, ...) come from the base "
            "profile.\n")
    text = head + yaml.safe_dump(prof, sort_keys=False, allow_unicode=True, width=100)
    parse_instrument(text, f"<profile {name}>")  # never write a profile the loader refuses
    return text


def write_profile(cal: Calibration, path: str | Path, name: str | None = None, base=None) -> Path:
    """Write the profile YAML (atomically: temporary name, then rename)."""
    p = Path(path)
    text = profile_yaml(cal, name=name or p.stem, base=base)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)
    return p


# --------------------------------------------------------------------------------------------
# diagnostic figure
# --------------------------------------------------------------------------------------------

def diagnostic_figure(cal: Calibration, path: str | Path, dpi: int = 80) -> Path:
    """Mean–variance scatter with the fit, the jitter trace, the residual background and the PSF."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = cal.noise
    fig, axs = plt.subplots(2, 2, figsize=(10, 7.5))
    ax = axs[0, 0]
    k = len(n.block_mean)
    step = max(k // 4000, 1)
    ax.plot(n.block_mean[::step], n.block_var[::step], ".", ms=2, alpha=0.3, color="0.5",
            label=f"blocks ({k})")
    ax.errorbar(n.bin_mean, n.bin_var, yerr=n.bin_err, fmt="o", ms=4, color="C0", label="binned")
    xs = np.linspace(min(n.offset, float(np.min(n.block_mean))), float(np.max(n.block_mean)), 50)
    ax.plot(xs, n.slope * xs + n.intercept, "C3-",
            label=f"var = {n.slope:.4g}·mean {n.intercept:+.4g}")
    if cal.dark is not None:
        ax.plot([cal.dark.offset], [cal.dark.readout_sigma ** 2], "ks", label="dark frames")
    ax.set_xlabel("block mean (counts)")
    ax.set_ylabel("noise variance (counts²)")
    ax.set_title(f"photon transfer: gain {n.gain:.4g} ± {n.gain_stderr:.2g} counts/e⁻, "
                 f"σ_r {n.readout_sigma:.3g}", fontsize=9)
    ax.legend(fontsize=7)
    ax = axs[0, 1]
    if cal.jitter is not None and cal.jitter.trace.size:
        tr = cal.jitter.trace
        ax.plot(np.arange(1, tr.size + 1), tr, lw=0.6)
        ax.set_title(f"line shift vs neighbours: jitter σ = {cal.jitter.sigma_px:.3g} ± "
                     f"{cal.jitter.stderr:.2g} px", fontsize=9)
        ax.set_xlabel("line")
        ax.set_ylabel("δ = j_r − (j_r−1 + j_r+1)/2 (px)")
    else:
        ax.text(0.5, 0.5, "no scan lines (camera)", ha="center", va="center")
        ax.set_axis_off()
    ax = axs[1, 0]
    if cal.vignetting is not None and cal.vignetting.block_map.size:
        im = ax.imshow(cal.vignetting.block_map - cal.vignetting.fit_map + 1.0, cmap="RdBu_r")
        fig.colorbar(im, ax=ax, fraction=0.046)
        used = cal.vignetting.as_profile()
        ax.set_title("background / fit (residual); vignetting "
                     + ", ".join(f"{k}={v:.3g}" for k, v in used.items() if v) if any(used.values())
                     else "background residual (no significant vignetting)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.set_axis_off()
    ax = axs[1, 1]
    p = cal.psf
    if p is not None and p.method == "edges" and p.profile_t.size:
        ax.plot(p.profile_t, p.profile_v, ".", ms=1.5, alpha=0.3, color="0.4")
        tt = np.linspace(p.profile_t.min(), p.profile_t.max(), 200)
        ax.plot(tt, special.erf(tt / (_SQ2 * p.sigma_px)), "C3-",
                label=f"erf, σ = {p.sigma_px:.3g} px")
        ax.set_xlabel("distance across edge (px)")
        ax.set_ylabel("normalised signal")
        ax.set_title(f"PSF from {p.n_used} edges: σ = {p.sigma_px:.3g} ± {p.stderr:.2g} px",
                     fontsize=9)
        ax.legend(fontsize=7)
    elif p is not None and p.method == "atomic columns":
        ax.text(0.5, 0.5, f"PSF from {p.n_used} atomic columns\nσ_y = {p.sigma_px:.3g} ± "
                f"{p.stderr:.2g} px (across lines)\nσ_x = {p.sigma_x_px:.3g} px (along lines, "
                "incl. jitter)", ha="center", va="center", fontsize=10)
        ax.set_axis_off()
    elif p is not None and p.spectrum is not None:
        kc, ps, fit = p.spectrum
        ax.loglog(kc[1:], ps[1:], "o", ms=3, label="radial power")
        ax.loglog(kc[1:], fit[1:], "C3-", label=f"fit, σ = {p.sigma_px:.3g} px")
        ax.set_xlabel("spatial frequency (cycles/px)")
        ax.set_ylabel("power")
        ax.set_title("PSF from the power spectrum (effective blur)", fontsize=9)
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    fig.suptitle(", ".join(Path(s).name for s in cal.sources)[:120], fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
