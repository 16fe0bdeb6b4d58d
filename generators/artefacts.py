"""Image artefacts that change the image but never the labels.

Specimen-preparation and instrument artefacts of real micrographs, each a switch with a
probability per frame and ranges of density and size:

- **scratches**: polishing lines, long and straight or slightly curved (circular arcs of
  curvature κ), bright or dark, near-parallel within a frame (angles scattered about one
  polishing direction).  Signal factor ``1 + s · exp(−d² / (2 σ²))`` with ``d`` the distance to
  the arc (px), σ from the FWHM width and ``s`` the signed strength (``s ≥ −1``).
- **pits**, **dust**, **contamination**: round spots, factor ``1 + s · exp(−r² / (2 σ²))`` with
  ``r`` the distance to the spot centre; pits are small and dark, dust small and bright or dark,
  contamination spots large soft dark halos.  Counts are Poisson with a density (per 10⁴ px²)
  drawn per frame.
- **charging streaks** (SEM): bright streaks along the fast-scan direction (+x, along rows), added
  to the signal: ``a · exp(−(x − x₀)/λ) · exp(−(y − y₀)² / (2 h²))`` for ``x ≥ x₀``.
- **data bar**: the instrument's strip at the bottom of the recorded image (rows
  ``H − bar_rows … H − 1``): a black/grey background with a white scale bar and text-like blocks
  of 5×7 glyphs; it overwrites the recorded counts.

Stage pattern: :meth:`Artefacts.sample` draws everything (a frozen :class:`ArtefactParams`),
:meth:`Artefacts.apply_signal` changes the expected signal (before optics and detector) and
:meth:`Artefacts.apply_recorded` overlays the data bar on the recorded counts; both are pure.
Every artefact type draws from its own child generator (seeded from a fixed number of draws of
the frame's generator), so switching one type off leaves the draws of the others unchanged.
Coordinates: ``x`` = column, ``y`` = row, pixel centres at integers; angles in radians from +x
towards +y.  Rendering kernels loop over image rows in parallel with a fixed order of artefacts
per pixel: the result does not depend on the thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

__all__ = ["Scratches", "Spots", "ChargingStreaks", "DataBar", "Artefacts", "ArtefactParams",
           "DataBarParams", "scratch_polyline", "data_bar_pattern", "FWHM_TO_SIGMA",
           "SCRATCH_COLUMNS", "SPOT_COLUMNS", "STREAK_COLUMNS"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: columns of the scratch table: midpoint (px), tangent angle at the midpoint (rad), length (px),
#: signed curvature (1/px), FWHM width (px), signed strength
SCRATCH_COLUMNS = ("y", "x", "angle_rad", "length_px", "curvature_per_px", "width_px", "strength")
#: columns of a spot table: centre (px), Gaussian σ (px), signed strength
SPOT_COLUMNS = ("y", "x", "sigma_px", "strength")
#: columns of the streak table: row (px), start column (px), σ across rows (px), decay length
#: along the row (px), amplitude (signal units)
STREAK_COLUMNS = ("y", "x0", "height_px", "decay_px", "amplitude")
_REACH_SIGMAS = 4.0          # profiles are cut at 4 σ (exp(−8) ≈ 3e-4)
_STREAK_DECAYS = 9.0         # streaks are cut after 9 decay lengths (exp(−9) ≈ 1e-4)
_SEGMENT_PX = 16.0           # arcs are rendered as polylines of chords ≤ this long ...
_SAGITTA_PX = 0.02           # ... that stray at most this far from the arc


def _range(name: str, r, lo: float = 0.0, hi: float = math.inf) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"{name} must be a (low, high) range within [{lo}, {hi}], got {r}")


def _prob(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {p}")


# --------------------------------------------------------------------------------------------
# switches (recipe knobs)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scratches:
    """Polishing scratches.

    Parameters
    ----------
    probability : float
        Chance that a frame has scratches (0 = off).
    count : (low, high)
        Number of scratches in a scratched frame, uniform integers.
    length_frac : (low, high)
        Length as a fraction of the frame diagonal.
    width_px : (low, high)
        FWHM of the line profile, px.
    strength : (low, high)
        Magnitude of the relative signal change on the line (0–1).
    bright_fraction : float
        Chance that a scratch is bright (else dark).
    angle_spread_deg : float
        Standard deviation of the scratch angles about the frame's polishing direction (degrees).
    curvature_per_px : (low, high)
        Magnitude of the curvature (1/px), sign random; 0 gives straight lines.
    """

    probability: float = 0.0
    count: tuple[int, int] = (1, 12)
    length_frac: tuple[float, float] = (0.2, 1.2)
    width_px: tuple[float, float] = (0.6, 2.0)
    strength: tuple[float, float] = (0.05, 0.3)
    bright_fraction: float = 0.5
    angle_spread_deg: float = 6.0
    curvature_per_px: tuple[float, float] = (0.0, 5e-4)

    def __post_init__(self) -> None:
        _prob("scratches.probability", self.probability)
        _range("scratches.count", self.count, 0, 100000)
        _range("scratches.length_frac", self.length_frac, 0.0, 10.0)
        _range("scratches.width_px", self.width_px, 0.0)
        if not self.width_px[0] > 0:
            raise ValueError(f"scratches.width_px must be > 0 px, got {self.width_px}")
        _range("scratches.strength", self.strength, 0.0, 1.0)
        _prob("scratches.bright_fraction", self.bright_fraction)
        if not 0.0 <= self.angle_spread_deg <= 180.0:
            raise ValueError(f"scratches.angle_spread_deg must be within [0, 180], got "
                             f"{self.angle_spread_deg}")
        _range("scratches.curvature_per_px", self.curvature_per_px, 0.0, 0.1)

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """Scratch table (n, 7), columns :data:`SCRATCH_COLUMNS`."""
        if self.probability == 0.0 or rng.random() >= self.probability:
            return np.zeros((0, len(SCRATCH_COLUMNS)))
        h, w = shape
        n = int(rng.integers(self.count[0], self.count[1] + 1))
        direction = rng.uniform(0.0, math.pi)
        u = rng.random((6, n))
        angle = direction + math.radians(self.angle_spread_deg) * rng.standard_normal(n)
        diag = math.hypot(h, w)
        length = diag * (self.length_frac[0] + u[0] * (self.length_frac[1] - self.length_frac[0]))
        kappa = self.curvature_per_px[0] + u[1] * (self.curvature_per_px[1]
                                                   - self.curvature_per_px[0])
        kappa = np.where(u[2] < 0.5, -kappa, kappa)
        width = self.width_px[0] + u[3] * (self.width_px[1] - self.width_px[0])
        strength = self.strength[0] + u[4] * (self.strength[1] - self.strength[0])
        strength = np.where(u[5] < self.bright_fraction, strength, -strength)
        y = rng.uniform(0.0, h, n) - 0.5
        x = rng.uniform(0.0, w, n) - 0.5
        return np.stack([y, x, np.mod(angle, math.pi), length, kappa, width, strength], axis=1)


@dataclass(frozen=True)
class Spots:
    """Round spots: pits, dust or contamination.

    Parameters
    ----------
    probability : float
        Chance that a frame has this kind of spot (0 = off).
    density : (low, high)
        Mean number of spots per 10⁴ px², drawn per frame; the count is Poisson.
    sigma_px : (low, high)
        Gaussian σ of the spot profile, px.
    strength : (low, high)
        Magnitude of the relative signal change at the centre (0–1).
    bright_fraction : float
        Chance that a spot is bright (else dark).
    """

    probability: float = 0.0
    density: tuple[float, float] = (0.5, 4.0)
    sigma_px: tuple[float, float] = (0.5, 1.5)
    strength: tuple[float, float] = (0.3, 0.8)
    bright_fraction: float = 0.0

    def __post_init__(self) -> None:
        _prob("spots.probability", self.probability)
        _range("spots.density", self.density, 0.0, 1e4)
        _range("spots.sigma_px", self.sigma_px, 0.0)
        if not self.sigma_px[0] > 0:
            raise ValueError(f"spots.sigma_px must be > 0 px, got {self.sigma_px}")
        _range("spots.strength", self.strength, 0.0, 1.0)
        _prob("spots.bright_fraction", self.bright_fraction)

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """Spot table (n, 4), columns :data:`SPOT_COLUMNS`."""
        if self.probability == 0.0 or rng.random() >= self.probability:
            return np.zeros((0, len(SPOT_COLUMNS)))
        h, w = shape
        density = rng.uniform(*self.density)
        n = int(rng.poisson(density * h * w / 1e4))
        u = rng.random((3, n))
        y = rng.uniform(0.0, h, n) - 0.5
        x = rng.uniform(0.0, w, n) - 0.5
        sigma = self.sigma_px[0] + u[0] * (self.sigma_px[1] - self.sigma_px[0])
        strength = self.strength[0] + u[1] * (self.strength[1] - self.strength[0])
        strength = np.where(u[2] < self.bright_fraction, strength, -strength)
        return np.stack([y, x, sigma, strength], axis=1)


@dataclass(frozen=True)
class ChargingStreaks:
    """Charging streaks along the fast-scan lines (SEM).

    Parameters
    ----------
    probability : float
        Chance that a frame has streaks (0 = off).
    count : (low, high)
        Number of streaks, uniform integers.
    amplitude : (low, high)
        Signal added at the streak's start (signal units, ≥ 0).
    decay_px : (low, high)
        Decay length along the row (px, > 0).
    height_px : (low, high)
        Gaussian σ across rows (px, > 0).
    """

    probability: float = 0.0
    count: tuple[int, int] = (1, 6)
    amplitude: tuple[float, float] = (0.1, 0.6)
    decay_px: tuple[float, float] = (10.0, 150.0)
    height_px: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        _prob("charging.probability", self.probability)
        _range("charging.count", self.count, 0, 100000)
        _range("charging.amplitude", self.amplitude, 0.0)
        _range("charging.decay_px", self.decay_px, 0.0)
        _range("charging.height_px", self.height_px, 0.0)
        if not (self.decay_px[0] > 0 and self.height_px[0] > 0):
            raise ValueError(f"charging.decay_px and height_px must be > 0 px, got "
                             f"{self.decay_px}, {self.height_px}")

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """Streak table (n, 5), columns :data:`STREAK_COLUMNS`."""
        if self.probability == 0.0 or rng.random() >= self.probability:
            return np.zeros((0, len(STREAK_COLUMNS)))
        h, w = shape
        n = int(rng.integers(self.count[0], self.count[1] + 1))
        y = rng.uniform(0.0, h, n) - 0.5
        x0 = rng.uniform(0.0, w, n) - 0.5
        height = rng.uniform(*self.height_px, n)
        decay = rng.uniform(*self.decay_px, n)
        amp = rng.uniform(*self.amplitude, n)
        return np.stack([y, x0, height, decay, amp], axis=1)


@dataclass(frozen=True)
class DataBarParams:
    """Drawn data bar of one frame (pixel rows/columns are integers, half-open ranges).

    Attributes
    ----------
    rows : int
        Height of the bar: it covers image rows ``H − rows … H − 1``.
    background, foreground : float
        Levels as fractions of the maximum count.
    scale_bar : (y0, y1, x0, x1)
        The scale bar rectangle in bar coordinates (row 0 = first bar row).
    glyph_size : (height, width)
        Size of one glyph cell, px.
    glyphs : tuple of (y0, x0, bits)
        Glyph cells (bar coordinates) and their 5×7 bitmaps (bit ``5·r + c`` = row r, column c).
    """

    rows: int
    background: float
    foreground: float
    scale_bar: tuple[int, int, int, int]
    glyph_size: tuple[int, int]
    glyphs: tuple[tuple[int, int, int], ...]

    def to_dict(self) -> dict:
        return {"rows": self.rows, "background": self.background, "foreground": self.foreground,
                "scale_bar": list(self.scale_bar), "glyph_size": list(self.glyph_size),
                "glyphs": [list(g) for g in self.glyphs]}


@dataclass(frozen=True)
class DataBar:
    """The instrument's data bar (scale bar and text strip) at the bottom of the recorded image.

    Parameters
    ----------
    probability : float
        Chance that a frame carries a bar (0 = off).
    height_frac : (low, high)
        Bar height as a fraction of the image height (at least 4 rows, fewer than H).
    background : (low, high)
        Background level, fraction of the maximum count (black/grey).
    foreground : (low, high)
        Level of the scale bar and glyphs, fraction of the maximum count (white).
    scale_bar_frac : (low, high)
        Scale bar length as a fraction of the image width.
    words : (low, high)
        Number of text-like words of 2–8 glyphs.
    """

    probability: float = 0.0
    height_frac: tuple[float, float] = (0.06, 0.12)
    background: tuple[float, float] = (0.0, 0.25)
    foreground: tuple[float, float] = (0.85, 1.0)
    scale_bar_frac: tuple[float, float] = (0.1, 0.3)
    words: tuple[int, int] = (2, 6)

    def __post_init__(self) -> None:
        _prob("data_bar.probability", self.probability)
        _range("data_bar.height_frac", self.height_frac, 0.0, 0.9)
        _range("data_bar.background", self.background, 0.0, 1.0)
        _range("data_bar.foreground", self.foreground, 0.0, 1.0)
        _range("data_bar.scale_bar_frac", self.scale_bar_frac, 0.0, 0.9)
        _range("data_bar.words", self.words, 0, 1000)

    def draw(self, rng: np.random.Generator, shape: tuple[int, int]) -> DataBarParams | None:
        if self.probability == 0.0 or rng.random() >= self.probability:
            return None
        h, w = shape
        if h < 5:
            raise ValueError(f"image of {h} rows is too small for a data bar (need >= 5)")
        rows = int(np.clip(round(rng.uniform(*self.height_frac) * h), 4, h - 1))
        bg = float(rng.uniform(*self.background))
        fg = float(rng.uniform(*self.foreground))
        # one text line, vertically centred; glyphs 5x7 scaled to about half the bar height
        gh = max(3, int(round(0.5 * rows)))
        gw = max(2, int(round(gh * 5 / 7)))
        gy = (rows - gh) // 2
        margin = max(1, gw // 2)
        bar_len = max(2, int(round(rng.uniform(*self.scale_bar_frac) * w)))
        bar_len = min(bar_len, max(2, w - 2 * margin))
        thick = max(1, rows // 6)
        left = rng.random() < 0.5                      # scale bar at the left or right end
        x0 = margin if left else w - margin - bar_len
        sy0 = (rows - thick) // 2
        scale_bar = (sy0, sy0 + thick, max(0, x0), min(w, x0 + bar_len))
        # text fills the other side, word by word, until it runs out of room
        start = scale_bar[3] + 2 * gw if left else margin
        stop = w - margin if left else scale_bar[2] - 2 * gw
        glyphs = []
        n_words = int(rng.integers(self.words[0], self.words[1] + 1))
        x = start
        for _ in range(n_words):
            n_chars = int(rng.integers(2, 9))
            if x + n_chars * (gw + 1) > stop:
                break
            bits = rng.integers(1, 2**35, n_chars)
            for b in bits:
                glyphs.append((gy, int(x), int(b)))
                x += gw + max(1, gw // 4)
            x += gw                                    # a space between words
        return DataBarParams(rows=rows, background=bg, foreground=fg, scale_bar=scale_bar,
                             glyph_size=(gh, gw), glyphs=tuple(glyphs))


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------

def scratch_polyline(y: float, x: float, angle: float, length: float, curvature: float
                     ) -> np.ndarray:
    """Vertices (m, 2) as (y, x) px of a scratch: an arc of the given signed curvature (1/px)
    through the midpoint ``(y, x)`` with tangent ``angle`` there, as chords ≤ 16 px long and
    short enough that they stray ≤ 0.02 px from the arc (sagitta ``c² |κ| / 8``)."""
    chord = _SEGMENT_PX
    if curvature != 0:
        chord = min(chord, math.sqrt(8.0 * _SAGITTA_PX / abs(curvature)))
    n_seg = max(1, int(math.ceil(length / chord)))
    t = np.linspace(-0.5 * length, 0.5 * length, n_seg + 1)
    c, s = math.cos(angle), math.sin(angle)
    if abs(curvature) * length < 1e-9:
        along, across = t, np.zeros_like(t)
    else:
        along = np.sin(curvature * t) / curvature
        across = (1.0 - np.cos(curvature * t)) / curvature
    return np.stack([y + along * s + across * c, x + along * c - across * s], axis=1)


@njit(cache=True)
def _row_range(y, w, seg, j0, j1, reach):
    """Columns [lo, hi] of row y within ``reach`` of the bounding boxes of chords j0..j1-1."""
    lo = w
    hi = -1
    for j in range(j0, j1):
        ay, ax, by, bx = seg[j, 0], seg[j, 1], seg[j, 2], seg[j, 3]
        if y < min(ay, by) - reach or y > max(ay, by) + reach:
            continue
        lo = min(lo, max(0, int(math.floor(min(ax, bx) - reach))))
        hi = max(hi, min(w - 1, int(math.ceil(max(ax, bx) + reach))))
    return lo, hi


@njit(parallel=True, cache=True)
def _factor_kernel(h, w, seg, seg_start, seg_sigma, seg_strength, spots, out):
    # seg: (m, 4) y0, x0, y1, x1 of all chords; chords of scratch k are seg_start[k]:seg_start[k+1]
    n_scr = seg_start.shape[0] - 1
    n_spot = spots.shape[0]
    for y in prange(h):
        dmin = np.empty(w)
        for x in range(w):
            out[y, x] = 1.0
        for k in range(n_scr):
            sig = seg_sigma[k]
            reach = _REACH_SIGMAS * sig
            lo, hi = _row_range(y, w, seg, seg_start[k], seg_start[k + 1], reach)
            if hi < lo:
                continue
            for x in range(lo, hi + 1):
                dmin[x] = 1e300
            for j in range(seg_start[k], seg_start[k + 1]):
                ay, ax, by, bx = seg[j, 0], seg[j, 1], seg[j, 2], seg[j, 3]
                if y < min(ay, by) - reach or y > max(ay, by) + reach:
                    continue
                xa = max(0, int(math.floor(min(ax, bx) - reach)))
                xb = min(w - 1, int(math.ceil(max(ax, bx) + reach)))
                dy = by - ay
                dx = bx - ax
                l2 = dy * dy + dx * dx
                for x in range(xa, xb + 1):
                    py = y - ay
                    px = x - ax
                    t = (py * dy + px * dx) / l2 if l2 > 0 else 0.0
                    t = min(max(t, 0.0), 1.0)
                    ey = py - t * dy
                    ex = px - t * dx
                    d2 = ey * ey + ex * ex
                    if d2 < dmin[x]:
                        dmin[x] = d2
            inv = 0.5 / (sig * sig)
            s = seg_strength[k]
            r2 = reach * reach
            for x in range(lo, hi + 1):
                d2 = dmin[x]
                if d2 < r2:
                    out[y, x] *= 1.0 + s * math.exp(-d2 * inv)
        for k in range(n_spot):
            cy, cx, sig, s = spots[k, 0], spots[k, 1], spots[k, 2], spots[k, 3]
            reach = _REACH_SIGMAS * sig
            if abs(y - cy) > reach:
                continue
            inv = 0.5 / (sig * sig)
            xa = max(0, int(math.floor(cx - reach)))
            xb = min(w - 1, int(math.ceil(cx + reach)))
            for x in range(xa, xb + 1):
                d2 = (y - cy) ** 2 + (x - cx) ** 2
                if d2 < reach * reach:
                    out[y, x] *= 1.0 + s * math.exp(-d2 * inv)


_NO_FIELD = np.zeros((1, 1))  # an absent factor or offset of :func:`_combine_kernel` (not read)


@njit(parallel=True, cache=True)
def _combine_kernel(x, f, a, use_f, use_a, out):
    """``out = ((float64(x) · f) + a)`` cast to ``out``'s dtype, per pixel (H, W): the bits of
    ``x.astype(float64)``, ``*= f``, ``+= a``, ``.astype(dtype)`` in one pass (absent terms
    left out)."""
    h, w = x.shape
    for y in prange(h):
        for i in range(w):
            v = np.float64(x[y, i])
            if use_f:
                v = v * f[y, i]
            if use_a:
                v = v + a[y, i]
            out[y, i] = v


@njit(parallel=True, cache=True)
def _streak_kernel(h, w, streaks, out):
    n = streaks.shape[0]
    for y in prange(h):
        for x in range(w):
            out[y, x] = 0.0
        for k in range(n):
            cy, x0, hh, lam, a = (streaks[k, 0], streaks[k, 1], streaks[k, 2], streaks[k, 3],
                                  streaks[k, 4])
            if abs(y - cy) > _REACH_SIGMAS * hh:
                continue
            ay = a * math.exp(-0.5 * ((y - cy) / hh) ** 2)
            xa = max(0, int(math.ceil(x0)))
            xb = min(w - 1, int(math.floor(x0 + _STREAK_DECAYS * lam)))
            for x in range(xa, xb + 1):
                out[y, x] += ay * math.exp(-(x - x0) / lam)


def data_bar_pattern(width: int, params: DataBarParams) -> np.ndarray:
    """Foreground mask of the bar, (rows, width) bool: scale bar and glyph pixels."""
    mask = np.zeros((params.rows, int(width)), dtype=bool)
    y0, y1, x0, x1 = params.scale_bar
    mask[y0:y1, x0:x1] = True
    gh, gw = params.glyph_size
    ri = np.minimum((np.arange(gh) * 7) // gh, 6)
    ci = np.minimum((np.arange(gw) * 5) // gw, 4)
    bit = (5 * ri[:, None] + ci[None, :]).astype(np.int64)
    for gy, gx, bits in params.glyphs:
        cell = ((int(bits) >> bit) & 1).astype(bool)
        ys = slice(gy, min(gy + gh, params.rows))
        xs = slice(gx, min(gx + gw, int(width)))
        mask[ys, xs] |= cell[: ys.stop - ys.start, : xs.stop - xs.start]
    return mask


# --------------------------------------------------------------------------------------------
# params and stage
# --------------------------------------------------------------------------------------------

def _table_dict(table: np.ndarray, columns: tuple[str, ...]) -> dict:
    return {c: table[:, i].tolist() for i, c in enumerate(columns)}


@dataclass(frozen=True, eq=False)
class ArtefactParams:
    """Drawn artefacts of one frame (tables of floats; px, radians, signal units).

    Tables are read-only arrays; compare two draws by :meth:`to_dict`.

    Attributes
    ----------
    shape : (H, W)
    scratches : ndarray (n, 7), columns :data:`SCRATCH_COLUMNS`
    pits, dust, contamination : ndarray (n, 4), columns :data:`SPOT_COLUMNS`
    streaks : ndarray (n, 5), columns :data:`STREAK_COLUMNS`
    data_bar : DataBarParams or None
    """

    shape: tuple[int, int]
    scratches: np.ndarray = field(default_factory=lambda: np.zeros((0, 7)))
    pits: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    dust: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    contamination: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    streaks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5)))
    data_bar: DataBarParams | None = None

    def __post_init__(self) -> None:
        for name, ncol in (("scratches", 7), ("pits", 4), ("dust", 4), ("contamination", 4),
                           ("streaks", 5)):
            t = np.array(getattr(self, name), dtype=np.float64).reshape(-1, ncol)
            t.flags.writeable = False
            object.__setattr__(self, name, t)

    @property
    def changes_signal(self) -> bool:
        """True when :meth:`Artefacts.apply_signal` changes anything."""
        return any(len(t) for t in (self.scratches, self.pits, self.dust, self.contamination,
                                    self.streaks))

    @property
    def data_bar_rows(self) -> tuple[int, int]:
        """Half-open row range ``(start, stop)`` of the data bar; ``(H, H)`` without one."""
        h = self.shape[0]
        return (h - self.data_bar.rows, h) if self.data_bar is not None else (h, h)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape),
                "scratches": _table_dict(self.scratches, SCRATCH_COLUMNS),
                "pits": _table_dict(self.pits, SPOT_COLUMNS),
                "dust": _table_dict(self.dust, SPOT_COLUMNS),
                "contamination": _table_dict(self.contamination, SPOT_COLUMNS),
                "charging_streaks": _table_dict(self.streaks, STREAK_COLUMNS),
                "data_bar": None if self.data_bar is None else self.data_bar.to_dict()}


def _check_shape(shape) -> tuple[int, int]:
    if len(shape) != 2 or int(shape[0]) < 1 or int(shape[1]) < 1:
        raise ValueError(f"shape must be (H, W) with H, W >= 1, got {shape}")
    return int(shape[0]), int(shape[1])


@dataclass(frozen=True)
class Artefacts:
    """Artefact stage: every artefact type is a switch (``probability = 0`` is off).

    Parameters
    ----------
    scratches : Scratches
    pits : Spots
        Small dark pits (default: σ 0.5–1.5 px, 0.5–4 per 10⁴ px², 30–80 % darker).
    dust : Spots
        Small bright or dark particles (σ 1–3 px).
    contamination : Spots
        Large soft dark halos (σ 8–40 px).
    charging : ChargingStreaks
    data_bar : DataBar
    """

    scratches: Scratches = Scratches()
    pits: Spots = Spots()
    dust: Spots = Spots(density=(0.1, 1.0), sigma_px=(1.0, 3.0), strength=(0.1, 0.5),
                        bright_fraction=0.5)
    contamination: Spots = Spots(density=(0.005, 0.04), sigma_px=(8.0, 40.0),
                                 strength=(0.1, 0.4), bright_fraction=0.0)
    charging: ChargingStreaks = ChargingStreaks()
    data_bar: DataBar = DataBar()

    @property
    def active(self) -> bool:
        """False when every artefact is switched off (then no stage call is needed)."""
        return any(a.probability > 0 for a in (self.scratches, self.pits, self.dust,
                                               self.contamination, self.charging, self.data_bar))

    def sample(self, rng: np.random.Generator, shape: tuple[int, int]) -> ArtefactParams:
        """Draw the artefacts of one frame of ``shape`` (H, W).

        Six child seeds are always drawn from ``rng`` (scratches, pits, dust, contamination,
        charging, data bar), each type drawing only from its own child generator.
        """
        h, w = _check_shape(shape)
        keys = rng.integers(0, 2**63 - 1, size=6)
        child = [np.random.default_rng(int(k)) for k in keys]
        return ArtefactParams(
            shape=(h, w),
            scratches=self.scratches.draw(child[0], (h, w)),
            pits=self.pits.draw(child[1], (h, w)),
            dust=self.dust.draw(child[2], (h, w)),
            contamination=self.contamination.draw(child[3], (h, w)),
            streaks=self.charging.draw(child[4], (h, w)),
            data_bar=self.data_bar.draw(child[5], (h, w)),
        )

    @staticmethod
    def signal_factor(params: ArtefactParams) -> np.ndarray:
        """Multiplicative factor (H, W) float64 of scratches, pits, dust and contamination."""
        h, w = params.shape
        polylines = [scratch_polyline(*row[:5]) for row in params.scratches]
        seg = (np.concatenate([np.concatenate([p[:-1], p[1:]], axis=1) for p in polylines])
               if polylines else np.zeros((0, 4)))
        start = np.zeros(len(polylines) + 1, dtype=np.int64)
        start[1:] = np.cumsum([len(p) - 1 for p in polylines])
        spots = np.concatenate([params.pits, params.dust, params.contamination])
        out = np.empty((h, w), dtype=np.float64)
        _factor_kernel(h, w, np.ascontiguousarray(seg), start,
                       np.ascontiguousarray(params.scratches[:, 5] * FWHM_TO_SIGMA),
                       np.ascontiguousarray(params.scratches[:, 6]),
                       np.ascontiguousarray(spots), out)
        return out

    @staticmethod
    def signal_offset(params: ArtefactParams) -> np.ndarray:
        """Additive charging-streak signal (H, W) float64."""
        h, w = params.shape
        out = np.empty((h, w), dtype=np.float64)
        _streak_kernel(h, w, np.ascontiguousarray(params.streaks), out)
        return out

    def apply_signal(self, signal: np.ndarray, params: ArtefactParams) -> np.ndarray:
        """Expected signal with the specimen/beam artefacts (before optics and detector).

        Parameters
        ----------
        signal : ndarray (H, W) or (H, W, C), float
        params : ArtefactParams

        Returns
        -------
        ndarray, same shape and dtype: ``signal · factor + offset`` (every channel alike); a copy
        of ``signal`` when nothing was drawn.
        """
        x = np.asarray(signal)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"signal must be a float array, got {x.dtype}")
        if x.ndim not in (2, 3) or tuple(x.shape[:2]) != tuple(params.shape):
            raise ValueError(f"signal must be (H, W) or (H, W, C) with (H, W) = {params.shape}, "
                             f"got {x.shape}")
        if not params.changes_signal:
            return np.array(x, copy=True)
        has_mult = len(params.scratches) + len(params.pits) + len(params.dust) + len(
            params.contamination) > 0
        if x.ndim == 2 and x.dtype in (np.float32, np.float64):  # one pass, the same bits
            f = self.signal_factor(params) if has_mult else _NO_FIELD
            a = self.signal_offset(params) if len(params.streaks) else _NO_FIELD
            fused = np.empty(x.shape, dtype=x.dtype)
            _combine_kernel(x, f, a, has_mult, len(params.streaks) > 0, fused)
            return fused
        out = x.astype(np.float64)
        has_mult = len(params.scratches) + len(params.pits) + len(params.dust) + len(
            params.contamination) > 0
        if has_mult:
            f = self.signal_factor(params)
            out *= f if x.ndim == 2 else f[..., None]
        if len(params.streaks):
            a = self.signal_offset(params)
            out += a if x.ndim == 2 else a[..., None]
        return out.astype(x.dtype)

    def apply_recorded(self, image: np.ndarray, params: ArtefactParams, max_value: int
                       ) -> np.ndarray:
        """Recorded image with the data bar overlaid (rows ``params.data_bar_rows``).

        Parameters
        ----------
        image : ndarray (H, W) or (H, W, C), integer counts
        params : ArtefactParams
        max_value : int
            Largest count of the recording (e.g. ``2**bit_depth − 1``); bar levels are fractions
            of it.

        Returns
        -------
        ndarray, same shape and dtype; a copy of ``image`` without a bar.
        """
        x = np.asarray(image)
        if not np.issubdtype(x.dtype, np.integer):
            raise ValueError(f"recorded image must have an integer dtype, got {x.dtype}")
        if x.ndim not in (2, 3) or tuple(x.shape[:2]) != tuple(params.shape):
            raise ValueError(f"image must be (H, W) or (H, W, C) with (H, W) = {params.shape}, "
                             f"got {x.shape}")
        info = np.iinfo(x.dtype)
        if not 1 <= int(max_value) <= info.max:
            raise ValueError(f"max_value must be within [1, {info.max}] for {x.dtype}, got "
                             f"{max_value}")
        out = np.array(x, copy=True)
        bar = params.data_bar
        if bar is None:
            return out
        fg = int(round(bar.foreground * int(max_value)))
        bg = int(round(bar.background * int(max_value)))
        levels = np.where(data_bar_pattern(x.shape[1], bar), fg, bg).astype(x.dtype)
        r0, r1 = params.data_bar_rows
        out[r0:r1] = levels if x.ndim == 2 else levels[..., None]
        return out
