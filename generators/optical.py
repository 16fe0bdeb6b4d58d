"""Optical colour contrast of a grain specimen: colour etching / polarised-light tints.

In colour-etched or polarised-light metallographs every grain takes its own tint (the interference
colour of an etch film, or the polarisation rotation of an anisotropic grain), so grain boundaries
are seen as a change of colour; a dark boundary strip is optional and usually weak.  The expected
signal at a pixel with grain id ``g`` and boundary distance ``d`` (px) is, per colour channel ``c``,

    s_c = clip(C_g,c · S(x, y) · B(d) · (1 + a_L F_L(x, y)) · (1 + a_C e_c F_C(x, y)), 0, 1)

- ``C_g`` : grain colour, RGB in [0, 1], drawn once per specimen (:meth:`sample_grains`);
- ``S = 1 + A · u``: illumination shading, a linear gradient of amplitude ``A`` along angle ``φ``,
  ``u = ((x − x_c) cos φ + (y − y_c) sin φ) / R`` with ``R`` half the frame diagonal (|u| ≤ 1);
- ``B = 1 − depth · exp(−d² / (2 σ²))``, ``σ = width / (2 √(2 ln 2))`` (width = FWHM, px): the
  optional boundary darkening, the same profile as the SEM groove (:mod:`generators.sem`);
- ``F_L``, ``F_C``: within-grain mottling, two independent smooth Gaussian random fields of unit
  variance at every pixel and correlation ``≈ exp(−τ² / (4 ℓ²))`` at lag ``τ`` px
  (:func:`smooth_noise`), drawn from a seed in the frame parameters; ``a_L`` is the relative
  luminance amplitude, ``a_C`` the relative chroma amplitude along the yellow–blue opponent
  direction ``e = (½, ½, −1)`` (R and G up where B goes down).

Colour values are linear in the recorded counts: the detector maps them to counts without any
gamma, so they are compared with the 8-bit values of real micrographs divided by 255 (which are
sRGB-encoded by the camera; CIELAB below is computed from them as sRGB).

Grain colours (specimen property) are drawn in HSV: each specimen draws weights for the hue bands
(``Dirichlet(band_concentration)``: some specimens are mostly one band), a hue shift and a value
shift; each grain draws a band by those weights, a hue uniformly in the band, saturation and value
uniformly in their ranges.  ``contrast < 1`` pulls every grain colour towards the specimen's mean
colour (a lower-contrast etch).

Defaults measured on ``real/tbm-grains`` (all 59 crops, 2,901 grains with ≥ 40 interior pixels
≥ 2 px from the mask's boundary band; grain colour = CIELAB of the mean sRGB of its interior):

===========================  ===================================  ================================
statistic                    real: 5 / 25 / 50 / 75 / 95 %        these defaults, same percentiles
===========================  ===================================  ================================
L*                           29.1 / 40.3 / 49.0 / 57.0 / 68.0     28.9 / 39.3 / 47.8 / 56.3 / 67.2
a*                           −8.5 / −2.5 / 1.5 / 5.6 / 11.5       −8.1 / −1.5 / 1.7 / 7.0 / 18.3
b*                           −38.6 / −22.8 / −2.0 / 15.0 / 36.4   −37.1 / −19.2 / −3.2 / 17.9 / 35.6
chroma C*ab                  4.1 / 10.9 / 19.5 / 31.0 / 42.1      4.3 / 11.2 / 19.8 / 29.6 / 43.6
ΔE76, neighbouring grains    7.0 / 14.3 / 21.7 / 31.4 / 47.6      (grains are drawn independently)
ΔE76, random pairs of crop   6.3 / 14.3 / 22.1 / 32.4 / 49.8      7.5 / 15.8 / 24.4 / 36.2 / 60.8
per-crop std of L*, a*, b*   9.8, 4.3, 15.5 (mean over crops)     10.1, 7.4, 18.2 (50 grains each)
per-crop mean L*             38.3 / 44.7 / 47.4 / 53.0 / 59.4     38.5 / 43.1 / 48.0 / 51.9 / 57.2
===========================  ===================================  ================================

Hues are bimodal (HSV hue: 45 % warm, quartiles 32/44/54°; 49 % cold, quartiles 212/218/229°;
6 % elsewhere) and the warm fraction varies widely between crops (5/25/50/75/95 %: 0, 0.18, 0.41,
0.76, 0.90), hence two bands and a low Dirichlet concentration.  Known deviation: the upper
tails of a* (purple and orange-red grains) and of the random-pair ΔE are wider than in the real
set.  Neighbouring grains differ as much as random pairs of the same crop (ΔE76 median 21.7
against 22.1), so grains are drawn independently.  Boundaries: mean L* on the mask's boundary
band is 0.5 below that of interiors ≥ 3 px away (per-crop 5–95 %: −3.4 to +2.3): no dark strip,
hence a default depth ≤ 0.05.  Within grains (interior, ≥ 3 px from boundaries; 15 crops) the
relative std of the HSV value is 0.096 and the std of L*, a*, b* 4.1, 2.5, 4.9 (all including
camera noise); the row/column autocorrelation of L* falls to 0.8 at 1 px (noise), then slowly
(0.5 at 3–4 px, 0.3 at 8 px): mottling amplitudes 0.02–0.07 with ℓ = 2–5 px leave room for the
detector's noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

__all__ = ["OpticalColourContrast", "OpticalParams", "hsv_to_rgb", "smooth_noise",
           "shading_field", "render_colour", "YELLOW_BLUE", "FWHM_TO_SIGMA"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
#: relative per-channel change (R, G, B) of the chroma mottling field
YELLOW_BLUE = (0.5, 0.5, -1.0)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """HSV → RGB (the hexcone model of :func:`colorsys.hsv_to_rgb`), vectorised.

    Parameters
    ----------
    hue : ndarray, turns (1 turn = 360°; taken modulo 1)
    saturation, value : ndarray in [0, 1], broadcastable with ``hue``

    Returns
    -------
    ndarray (..., 3) float64, RGB in [0, 1]
    """
    h, s, v = np.broadcast_arrays(np.mod(np.asarray(hue, dtype=np.float64), 1.0),
                                  np.asarray(saturation, dtype=np.float64),
                                  np.asarray(value, dtype=np.float64))
    h6 = h * 6.0
    sector = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    table = np.stack([np.stack([v, t, p], -1), np.stack([q, v, p], -1),
                      np.stack([p, v, t], -1), np.stack([p, q, v], -1),
                      np.stack([t, p, v], -1), np.stack([v, p, q], -1)], 0)
    return np.take_along_axis(table, sector[None, ..., None], 0)[0]


def _kernel_weights(n: int, length_px: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Taps of :func:`smooth_noise` on one axis: first index (n,), weights (n, K), lattice size."""
    spacing = 1.5 * length_px
    reach = 3.5 * length_px
    n_lat = int(math.ceil((n - 1 + 2 * reach) / spacing)) + 2
    taps = int(math.floor(2 * reach / spacing)) + 2
    pos = np.arange(n, dtype=np.float64) + reach          # lattice i sits at i * spacing - reach
    first = np.floor((pos - reach) / spacing).astype(np.int64)
    first = np.clip(first, 0, n_lat - taps)
    k = first[:, None] + np.arange(taps)[None, :]
    w = np.exp(-0.5 * ((pos[:, None] - k * spacing) / length_px) ** 2)
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))       # unit variance at every pixel
    return first, w, n_lat


@njit(parallel=True, cache=True)
def _rows_pass(lattice, fx, wx, tmp):
    # tmp[f, i, x] = sum_b wx[x, b] lattice[f, i, fx[x] + b]  (fixed summation order)
    nf, nl, nx = tmp.shape
    kx = wx.shape[1]
    for job in prange(nf * nl):
        f = job // nl
        i = job % nl
        for x in range(nx):
            acc = 0.0
            for b in range(kx):
                acc += wx[x, b] * lattice[f, i, fx[x] + b]
            tmp[f, i, x] = acc


@njit(parallel=True, cache=True)
def _cols_pass(tmp, fy, wy, out):
    # out[f, y, x] = sum_a wy[y, a] tmp[f, fy[y] + a, x]
    nf, ny, nx = out.shape
    ky = wy.shape[1]
    for job in prange(nf * ny):
        f = job // ny
        y = job % ny
        for x in range(nx):
            acc = 0.0
            for a in range(ky):
                acc += wy[y, a] * tmp[f, fy[y] + a, x]
            out[f, y, x] = np.float32(acc)


def smooth_noise(shape: tuple[int, int], length_px: float, seed: int, n_fields: int = 1
                 ) -> np.ndarray:
    """Smooth Gaussian random fields of unit variance at every pixel.

    Independent standard-normal values on a lattice of spacing ``1.5 ℓ`` (drawn from
    ``numpy.random.default_rng(seed)``) are combined with Gaussian weights of σ = ``ℓ`` truncated at
    3.5 ℓ, separably along rows and columns; the weights of every pixel are normalised so that
    ``Σ w² = 1`` per axis, which makes the variance exactly 1 everywhere.  The correlation at lag τ
    is ≈ ``exp(−τ² / (4 ℓ²))``.  Sums run in a fixed order: the result does not depend on the
    thread count.

    Parameters
    ----------
    shape : (H, W)
    length_px : float
        ℓ in px (> 0).
    seed : int
        Seed of the lattice values (≥ 0).
    n_fields : int
        Number of independent fields.

    Returns
    -------
    ndarray (n_fields, H, W) float32
    """
    h, w = (int(shape[0]), int(shape[1]))
    if h < 1 or w < 1 or n_fields < 1:
        raise ValueError(f"need shape >= (1, 1) and n_fields >= 1, got {shape}, {n_fields}")
    if not length_px > 0:
        raise ValueError(f"noise correlation length must be > 0 px, got {length_px}")
    fy, wy, ny = _kernel_weights(h, float(length_px))
    fx, wx, nx = _kernel_weights(w, float(length_px))
    lattice = np.random.default_rng(int(seed)).standard_normal((n_fields, ny, nx))
    tmp = np.empty((n_fields, ny, w), dtype=np.float64)
    _rows_pass(lattice, fx, wx, tmp)
    out = np.empty((n_fields, h, w), dtype=np.float32)
    _cols_pass(tmp, fy, wy, out)
    return out


def shading_field(shape: tuple[int, int], amplitude: float, angle_deg: float) -> np.ndarray:
    """Linear illumination gradient ``1 + A · u`` (see module docstring), shape (H, W) float64."""
    h, w = int(shape[0]), int(shape[1])
    r = 0.5 * math.hypot(h - 1, w - 1) or 1.0
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    yy = (np.arange(h, dtype=np.float64) - 0.5 * (h - 1))[:, None]
    xx = (np.arange(w, dtype=np.float64) - 0.5 * (w - 1))[None, :]
    return 1.0 + amplitude * (xx * c + yy * s) / r


@njit(parallel=True, cache=True)
def _render_kernel(gid, dist, colours, f_lum, f_chr, a_lum, a_chr, e, shade_a, shade_c, shade_s,
                   r_inv, depth, inv2s2, out):
    h, w = gid.shape
    mottle = f_lum.shape[0] == h
    cy = 0.5 * (h - 1)
    cx = 0.5 * (w - 1)
    for y in prange(h):
        for x in range(w):
            g = gid[y, x]
            f = 1.0 + shade_a * ((x - cx) * shade_c + (y - cy) * shade_s) * r_inv
            if depth > 0.0:
                d = dist[y, x]
                f *= 1.0 - depth * math.exp(-d * d * inv2s2)
            if mottle:
                f *= 1.0 + a_lum * f_lum[y, x]
            for c in range(3):
                v = colours[g, c] * f
                if mottle:
                    v *= 1.0 + a_chr * e[c] * f_chr[y, x]
                out[y, x, c] = min(max(v, 0.0), 1.0)


def render_colour(grain_id: np.ndarray, distance: np.ndarray, colours: np.ndarray,
                  params: "OpticalParams") -> np.ndarray:
    """Expected RGB signal (H, W, 3) float32 in [0, 1] (formula in the module docstring).

    Parameters
    ----------
    grain_id : ndarray (H, W) int
    distance : ndarray (H, W) float, px
        Distance to the nearest grain boundary.
    colours : ndarray (n_grains, 3) float, RGB in [0, 1]
    params : OpticalParams
    """
    gid = np.asarray(grain_id)
    dist = np.asarray(distance)
    col = np.asarray(colours, dtype=np.float64)
    if gid.ndim != 2 or dist.shape != gid.shape:
        raise ValueError(f"grain_id and distance must be equal (H, W) arrays, got {gid.shape} "
                         f"and {dist.shape}")
    if not np.issubdtype(gid.dtype, np.integer):
        raise ValueError(f"grain_id must be integer, got {gid.dtype}")
    if col.ndim != 2 or col.shape[1] != 3:
        raise ValueError(f"colours must be (n_grains, 3), got {col.shape}")
    if gid.size and (gid.min() < 0 or gid.max() >= col.shape[0]):
        raise ValueError("grain ids out of range of the colour table")
    h, w = gid.shape
    if params.mottle_amplitude > 0 or params.mottle_chroma > 0:
        fields = smooth_noise((h, w), params.mottle_length_px, params.mottle_seed, 2)
        f_lum, f_chr = fields[0], fields[1]
    else:
        f_lum = f_chr = np.zeros((0, 0), dtype=np.float32)
    r = 0.5 * math.hypot(h - 1, w - 1) or 1.0
    sigma = params.boundary_width_px * FWHM_TO_SIGMA
    depth = params.boundary_depth if sigma > 0 else 0.0
    inv2s2 = 0.5 / (sigma * sigma) if sigma > 0 else 0.0
    ang = math.radians(params.shading_angle_deg)
    out = np.empty((h, w, 3), dtype=np.float32)
    _render_kernel(np.ascontiguousarray(gid, dtype=np.int32),
                   np.ascontiguousarray(dist, dtype=np.float32), np.ascontiguousarray(col),
                   f_lum, f_chr, float(params.mottle_amplitude), float(params.mottle_chroma),
                   np.asarray(YELLOW_BLUE, dtype=np.float64), float(params.shading_amplitude),
                   math.cos(ang), math.sin(ang), 1.0 / r, float(depth), inv2s2, out)
    return out


# --------------------------------------------------------------------------------------------
# stage
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpticalParams:
    """Drawn parameters of one optical frame.

    Attributes
    ----------
    boundary_depth : float
        Fractional darkening at the boundary, 0–1.
    boundary_width_px : float
        FWHM of the darkening, px.
    shading_amplitude : float
        Illumination gradient amplitude ``A`` (fraction, centre to the farthest point).
    shading_angle_deg : float
        Direction ``φ`` of increasing illumination, degrees from +x (columns) towards +y (rows).
    mottle_amplitude, mottle_chroma : float
        Relative std of the luminance and yellow–blue mottling.
    mottle_length_px : float
        Mottling correlation length ℓ, px.
    mottle_seed : int
        Seed of the mottling fields.
    """

    boundary_depth: float
    boundary_width_px: float
    shading_amplitude: float
    shading_angle_deg: float
    mottle_amplitude: float
    mottle_chroma: float
    mottle_length_px: float
    mottle_seed: int

    def to_dict(self) -> dict:
        return {"boundary_depth": self.boundary_depth,
                "boundary_width_px": self.boundary_width_px,
                "shading_amplitude": self.shading_amplitude,
                "shading_angle_deg": self.shading_angle_deg,
                "mottle_amplitude": self.mottle_amplitude,
                "mottle_chroma": self.mottle_chroma,
                "mottle_length_px": self.mottle_length_px,
                "mottle_seed": self.mottle_seed}


def _check_range(name: str, r, lo: float, hi: float) -> None:
    if len(r) != 2 or not (lo <= r[0] <= r[1] <= hi):
        raise ValueError(f"{name} must be a (low, high) range within [{lo}, {hi}], got {r}")


@dataclass(frozen=True)
class OpticalColourContrast:
    """Optical colour contrast stage (colour etching / polarised light); defaults fit tbm-grains.

    Parameters
    ----------
    hue_bands_deg : tuple of (low, high)
        HSV hue intervals in degrees (the palette); ``((0, 360),)`` allows every hue.  A band may
        run past 360 (e.g. ``(340, 380)``); hues are taken modulo 360.
    band_concentration : float
        Dirichlet concentration of the per-specimen band weights (> 0; large → every specimen
        uses all bands alike, small → specimens dominated by one band).
    saturation, value : (low, high)
        HSV saturation and value ranges in [0, 1], drawn uniformly per grain.
    specimen_hue_shift_deg : float
        Per-specimen hue shift, uniform in ± this (degrees).
    specimen_value_shift : float
        Per-specimen value shift, uniform in ± this (value clipped to [0, 1]).
    contrast : float
        In [0, 1]: fraction of each grain's deviation from the specimen's mean colour that is
        kept (1 = as drawn; smaller = a lower-contrast etch).
    boundary_depth, boundary_width_px : (low, high)
        Optional boundary darkening: depth 0–1 and FWHM in px, drawn per frame.
    shading : (low, high)
        Illumination gradient amplitude (fraction), drawn per frame; direction uniform.
    mottle_amplitude, mottle_chroma : (low, high)
        Relative std of the within-grain luminance and yellow–blue mottling, drawn per frame.
    mottle_length_px : (low, high)
        Mottling correlation length ℓ in px (> 0), drawn per frame.
    """

    hue_bands_deg: tuple[tuple[float, float], ...] = ((15.0, 65.0), (205.0, 240.0))
    band_concentration: float = 0.7
    saturation: tuple[float, float] = (0.05, 0.65)
    value: tuple[float, float] = (0.38, 0.70)
    specimen_hue_shift_deg: float = 10.0
    specimen_value_shift: float = 0.10
    contrast: float = 1.0
    boundary_depth: tuple[float, float] = (0.0, 0.05)
    boundary_width_px: tuple[float, float] = (1.0, 3.0)
    shading: tuple[float, float] = (0.0, 0.10)
    mottle_amplitude: tuple[float, float] = (0.02, 0.07)
    mottle_chroma: tuple[float, float] = (0.01, 0.05)
    mottle_length_px: tuple[float, float] = (2.0, 5.0)

    def __post_init__(self) -> None:
        if len(self.hue_bands_deg) < 1:
            raise ValueError("hue_bands_deg needs at least one (low, high) band")
        for band in self.hue_bands_deg:
            if len(band) != 2 or not (band[0] <= band[1] <= band[0] + 360.0):
                raise ValueError(f"hue band must be (low, high) with low <= high <= low + 360 "
                                 f"degrees, got {band}")
        if not self.band_concentration > 0:
            raise ValueError(f"band_concentration must be > 0, got {self.band_concentration}")
        _check_range("saturation", self.saturation, 0.0, 1.0)
        _check_range("value", self.value, 0.0, 1.0)
        if not 0.0 <= self.specimen_hue_shift_deg <= 180.0:
            raise ValueError(f"specimen_hue_shift_deg must be within [0, 180], got "
                             f"{self.specimen_hue_shift_deg}")
        if not 0.0 <= self.specimen_value_shift <= 1.0:
            raise ValueError(f"specimen_value_shift must be within [0, 1], got "
                             f"{self.specimen_value_shift}")
        if not 0.0 <= self.contrast <= 1.0:
            raise ValueError(f"contrast must be within [0, 1], got {self.contrast}")
        _check_range("boundary_depth", self.boundary_depth, 0.0, 1.0)
        _check_range("boundary_width_px", self.boundary_width_px, 0.0, math.inf)
        _check_range("shading", self.shading, 0.0, 0.999)
        _check_range("mottle_amplitude", self.mottle_amplitude, 0.0, 1.0)
        _check_range("mottle_chroma", self.mottle_chroma, 0.0, 1.0)
        _check_range("mottle_length_px", self.mottle_length_px, 0.0, math.inf)
        if not self.mottle_length_px[0] > 0:
            raise ValueError(f"mottle_length_px must be > 0 px, got {self.mottle_length_px}")

    def sample_grains(self, rng: np.random.Generator, n_grains: int) -> np.ndarray:
        """Per-grain colours of one specimen.

        Parameters
        ----------
        rng : numpy.random.Generator
        n_grains : int (≥ 0)

        Returns
        -------
        ndarray (n_grains, 3) float64, RGB in [0, 1] (linear in recorded counts)
        """
        n = int(n_grains)
        if n < 0:
            raise ValueError(f"n_grains must be >= 0, got {n_grains}")
        bands = np.asarray(self.hue_bands_deg, dtype=np.float64)
        weights = rng.dirichlet(np.full(len(bands), self.band_concentration))
        hue_shift = rng.uniform(-self.specimen_hue_shift_deg, self.specimen_hue_shift_deg)
        value_shift = rng.uniform(-self.specimen_value_shift, self.specimen_value_shift)
        u_band, u_hue, u_sat, u_val = rng.random((4, n))
        cum = np.cumsum(weights)
        band = np.minimum(np.searchsorted(cum / cum[-1], u_band, side="right"), len(bands) - 1)
        hue_deg = bands[band, 0] + u_hue * (bands[band, 1] - bands[band, 0]) + hue_shift
        sat = self.saturation[0] + u_sat * (self.saturation[1] - self.saturation[0])
        val = np.clip(self.value[0] + u_val * (self.value[1] - self.value[0]) + value_shift,
                      0.0, 1.0)
        rgb = hsv_to_rgb(hue_deg / 360.0, sat, val)
        if self.contrast < 1.0 and n > 0:
            mean = rgb.mean(axis=0, keepdims=True)
            rgb = mean + self.contrast * (rgb - mean)
        return np.clip(rgb, 0.0, 1.0)

    def sample(self, rng: np.random.Generator) -> OpticalParams:
        """Frame parameters (a fixed number of draws whatever the settings)."""
        u = rng.random(7)
        seed = int(rng.integers(0, 2**63 - 1))

        def pick(r, x):
            return float(r[0] + x * (r[1] - r[0]))

        return OpticalParams(
            boundary_depth=pick(self.boundary_depth, u[0]),
            boundary_width_px=pick(self.boundary_width_px, u[1]),
            shading_amplitude=pick(self.shading, u[2]),
            shading_angle_deg=float(360.0 * u[3]),
            mottle_amplitude=pick(self.mottle_amplitude, u[4]),
            mottle_chroma=pick(self.mottle_chroma, u[5]),
            mottle_length_px=pick(self.mottle_length_px, u[6]),
            mottle_seed=seed,
        )

    def reach_px(self) -> float:
        """Boundary distance (px) beyond which the darkening changes the signal by < 1e-4."""
        if self.boundary_depth[1] == 0:
            return 1e-3
        sigma = self.boundary_width_px[1] * FWHM_TO_SIGMA
        return max(sigma * math.sqrt(2 * math.log(1e4)), 1e-3)

    def apply(self, grain_id: np.ndarray, distance: np.ndarray, colours: np.ndarray,
              params: OpticalParams) -> np.ndarray:
        """Expected RGB signal (H, W, 3) float32 in [0, 1]; see :func:`render_colour`."""
        return render_colour(grain_id, distance, colours, params)
