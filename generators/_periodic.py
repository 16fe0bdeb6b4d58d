"""Minimum-image helpers for the per-pixel feature kernels (Numba, inlined).

Each returns the bits of the textbook expression it replaces and skips that expression's
division where its rounding cannot matter (offsets clearly inside half a period, points clearly
inside the period), the usual case on a specimen larger than its grains.
"""

from __future__ import annotations

import math

from numba import njit

__all__ = ["min_image", "nearest_period", "wrap_floor"]


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
