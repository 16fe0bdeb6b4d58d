"""Minimum-image and scale helpers for the per-pixel feature kernels (Numba, inlined).

Each minimum-image helper returns the bits of the textbook expression it replaces and skips that
expression's division where its rounding cannot matter (offsets clearly inside half a period,
points clearly inside the period), the usual case on a specimen larger than its grains.
:func:`jt_norm` is the one expression of ``|Jᵀ n|`` that every image-space distance uses.
"""

from __future__ import annotations

import math

from numba import njit

__all__ = ["jt_norm", "min_image", "nearest_period", "wrap_floor"]


@njit(cache=True, inline="always")
def min_image(d: float, length: float) -> float:
    """``d − length · round(d / length)``, bit for bit (``|d| < 0.49 L``: ``round = ±0``, and
    ``d − (±0) = d + 0``)."""
    if abs(d) < 0.49 * length:
        return d + 0.0
    return d - length * round(d / length)


@njit(cache=True, inline="always")
def nearest_period(d: float, length: float) -> float:
    """``floor(d / length + 0.5)`` (float), bit for bit (``0`` for ``|d| < 0.49 L``)."""
    if abs(d) < 0.49 * length:
        return 0.0
    return math.floor(d / length + 0.5)


@njit(cache=True, inline="always")
def wrap_floor(x: float, length: float) -> float:
    """``x − length · floor(x / length)``, bit for bit (``0 ≤ x < 0.99 L``: ``floor = 0``)."""
    if 0.0 <= x < 0.99 * length:
        return x - length * 0.0
    return x - length * math.floor(x / length)


@njit(cache=True, inline="always")
def jt_norm(jac, i: int, nx: float, ny: float) -> float:
    """``|Jᵀ n|`` for row ``i`` of the Jacobians ``jac`` (m, 4) = (J00, J01, J10, J11) and the
    unit normal ``n = (nx, ny)``: ``√(a² + b²)``, not ``math.hypot``, whose overflow-safe libm
    call cost ~6 % of an all-features frame (a map Jacobian has entries of order 1: no overflow
    or underflow; within an ulp or two of ``hypot``)."""
    a = jac[i, 0] * nx + jac[i, 2] * ny
    b = jac[i, 1] * nx + jac[i, 3] * ny
    return math.sqrt(a * a + b * b)
